"""The one training state and its checkpoint: parameters, AdamW moments, step, RNG, history.

Every loop of refimpl (pretraining, SFT, GRPO, GKD, sequence-level KD) carries a
:class:`TrainState` and writes it with :func:`save_checkpoint`; :func:`load_checkpoint` gives it
back so the same loop continues *bit for bit* as if it had never stopped: the only randomness of a
run is the ``numpy.random.Generator`` in the state (batches, rollouts, GKD's coin), and its
bit-generator state is saved with the rest. Method-specific pieces ride along: ``frozen`` holds
parameter trees that the loop reads but never updates (GRPO's π_ref), ``extra`` JSON-able values
(GRPO's evaluations, SFT's token count).

A checkpoint is one ``.npz`` file read with ``allow_pickle=False`` and written atomically
(:func:`refimpl.fileio.atomic_write`): until the new file is complete the previous checkpoint at
the path stays intact, so a run killed during a save resumes from it.
"""

from __future__ import annotations

import json
import zipfile
from typing import NamedTuple

import numpy as np

from .._validate import check_integer
from ..fileio import atomic_write
from ..optim import AdamWState, adamw_init
from ..tree import tree_flatten, tree_paths
from .history import History


class TrainState(NamedTuple):
    """Everything a training loop needs to continue: see the module docstring."""
    params: dict
    opt: AdamWState
    step: int                 # optimisation steps done
    rng: np.random.Generator  # the run's only source of randomness
    history: History          # one metrics dict per step done
    frozen: dict = {}         # name -> parameter tree read but not trained (never mutated in place)
    extra: dict = {}          # name -> JSON-able value the method carries between steps


def init_state(params, seed=0, *, frozen=None, extra=None) -> TrainState:
    """Step 0: fresh AdamW moments, ``default_rng(seed)``, an empty :class:`History`."""
    return TrainState(params, adamw_init(params), 0, np.random.default_rng(seed), History(), dict(frozen or {}),
                      dict(extra or {}))


def resume_state(resume, config) -> TrainState:
    """The state a method continues from: ``resume`` itself if it is a :class:`TrainState`, else the
    checkpoint at that path (:func:`load_checkpoint`), whose model config must equal ``config``."""
    if isinstance(resume, TrainState):
        return resume
    state, stored = load_checkpoint(resume)
    if stored != config:
        raise ValueError(f"resume: the checkpoint {resume} was written for another model config")
    return state


def append_row(state, row) -> History:
    """A new :class:`History`: ``state.history`` and ``row`` (the state's own history is left as it was)."""
    return History([*state.history, row])


def _builtin(x):
    """JSON for NumPy scalars and arrays in a history row (as Python numbers and lists)."""
    if isinstance(x, np.generic | np.ndarray):
        return x.tolist()
    raise TypeError(f"state: a history row or extra value of type {type(x).__name__} cannot be stored as JSON")


def _text(obj):
    return np.frombuffer(json.dumps(obj, default=_builtin).encode(), dtype=np.uint8)


def _trees(state):
    yield "params", state.params
    yield "m", state.opt.m
    yield "v", state.opt.v
    for name, tree in state.frozen.items():
        if "/" in name:
            raise ValueError(f"state.frozen: a name may not contain '/', got {name!r}")
        yield f"frozen/{name}", tree


def save_checkpoint(path, state, config):
    """Write ``state`` and the model ``config`` (a :class:`refimpl.ModelConfig`) to ``path`` (``.npz``).

    Parameters, moments and frozen trees are stored per leaf (``params/<path>``, ...); step, RNG
    state, history, ``extra`` and config as JSON in ``meta``. The write is atomic.
    """
    arrays = {}
    for prefix, tree in _trees(state):
        for p, a in zip(tree_paths(tree), tree_flatten(tree)[0], strict=True):
            arrays[f"{prefix}/{p}"] = a
    arrays["meta"] = _text({"step": state.step, "opt_step": state.opt.step, "rng": state.rng.bit_generator.state,
                            "history": list(state.history), "extra": state.extra, "config": config.to_dict()})
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def unflatten(items):
    """A nested tree from ``(dotted path, leaf)`` pairs (the inverse of :func:`refimpl.tree.tree_paths`
    with :func:`refimpl.tree.tree_flatten`): all-digit keys become list positions."""
    root = {}
    for path, a in items:
        keys = path.split(".")
        node = root
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = a

    def fix(node):
        if not isinstance(node, dict):
            return node
        if node and all(k.isdigit() for k in node):
            return [fix(node[str(i)]) for i in range(len(node))]
        return {k: fix(v) for k, v in node.items()}
    return fix(root)


def _read(path):
    with np.load(path, allow_pickle=False) as z:
        if "meta" not in z.files:
            raise ValueError("no 'meta' entry")
        meta = json.loads(bytes(z["meta"]).decode())
        trees = {pre: unflatten([(k[len(pre) + 1:], z[k]) for k in z.files if k.startswith(pre + "/")])
                 for pre in ("params", "m", "v")}
        names = sorted({k.split("/")[1] for k in z.files if k.startswith("frozen/")})
        frozen = {n: unflatten([(k[len(n) + 8:], z[k]) for k in z.files if k.startswith(f"frozen/{n}/")])
                  for n in names}
    for k in ("step", "opt_step", "rng", "history", "config"):
        if k not in meta:
            raise ValueError(f"meta has no {k!r}")
    return meta, trees, frozen


def load_checkpoint(path):
    """Inverse of :func:`save_checkpoint`: ``(TrainState, ModelConfig)`` (no pickle).

    Also reads the checkpoints of earlier refimpl versions (history as a dict of lists, no
    ``frozen``/``extra``). A file that is not a complete checkpoint (truncated, empty, another
    ``.npz``), a missing or extra tensor, a parameter shaped unlike the stored config, or an AdamW
    moment unlike its parameter raises ValueError naming the file and the tensor.
    """
    from ..config import ModelConfig
    from ..model.structure import check_params  # imported here: refimpl.model imports this package
    try:
        meta, trees, frozen = _read(path)
        check_integer("step", meta["step"], low=0)
        check_integer("opt_step", meta["opt_step"], low=0)
        config = ModelConfig.from_dict(meta["config"])
        rng = np.random.Generator(getattr(np.random, meta["rng"]["bit_generator"])())
        rng.bit_generator.state = meta["rng"]
        hist = meta["history"]
        history = History.from_columns(hist) if isinstance(hist, dict) else History(hist)
        extra = meta.get("extra", {})
        if not isinstance(extra, dict):
            raise ValueError(f"meta's 'extra' is a {type(extra).__name__}, not a dict")
    except FileNotFoundError:
        raise
    except (OSError, EOFError, ValueError, TypeError, KeyError, AttributeError, zipfile.BadZipFile,
            UnicodeDecodeError) as e:
        raise ValueError(f"path: {path} is not a readable refimpl training checkpoint "
                         f"({type(e).__name__}: {e})") from e
    check_params(trees["params"], config, f"path: {path}: params")
    for pre in ("m", "v"):
        check_params(trees[pre], config, f"path: {path}: AdamW moment {pre}")
        if bool(trees[pre].get("mtp")) != bool(trees["params"].get("mtp")):
            raise ValueError(f"path: {path}: AdamW moment {pre}: its MTP modules do not match the parameters'")
    for name, tree in frozen.items():
        check_params(tree, config, f"path: {path}: frozen tree {name}")
    state = TrainState(trees["params"], AdamWState(meta["opt_step"], trees["m"], trees["v"]), meta["step"], rng,
                       history, frozen, extra)
    return state, config
