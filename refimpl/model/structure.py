"""The parameter tree a config implies, and the check of a given tree against it.

:func:`init_params` draws a random tree. :func:`expected_params` runs it with a random
generator that allocates nothing (each weight is a zero-stride view of one zero), so the expected
tree follows every architecture ``init_params`` knows (MLA or standard attention, dense or MoE
layers, MTP modules, optional biases) without a second description to keep in sync, and costs a
few kilobytes even for DeepSeek-V3's 671B parameters.

:func:`check_params` is called once at the public entry points (``model_forward``,
``loss_forward``, ``generate``, ``train``, ``save_pretrained``, ``load_checkpoint``): a missing,
extra or mis-shaped tensor, a non-float leaf or a NaN/inf weight raises a ValueError (TypeError
for a wrong type) that names the tensor by its dotted path, instead of running a 3-layer tree
under a 2-layer config or returning logits of the wrong width.
"""

from __future__ import annotations

import numpy as np

from .._validate import FLOAT_DTYPES
from ..config import check_config
from .block import init_block_params
from .mtp import init_mtp_params


def init_params(config, rng, dtype=np.float64, *, mtp=None):
    """Random parameters: weights ~ N(0, ``initializer_range``), unit norm gains, zero router bias.

    ``mtp`` (default: ``num_nextn_predict_layers > 0``) adds the V3 multi-token-prediction modules.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
    check_config(config)
    if np.dtype(dtype) not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected float32 or float64, got {np.dtype(dtype)}")
    if config.tie_word_embeddings:
        raise ValueError("config.tie_word_embeddings: DeepSeek-V2/V3 untie the head; expected False")
    v, d, std = config.vocab_size, config.hidden_size, config.initializer_range
    params = {"model": {"embed_tokens": (std * rng.standard_normal((v, d))).astype(dtype),   # (V, D)
                        "layers": [init_block_params(config, n, rng, dtype)
                                   for n in range(config.num_hidden_layers)],
                        "norm": np.ones(d, dtype=dtype)},
              "lm_head": (std * rng.standard_normal((v, d))).astype(dtype)}                   # (V, D)
    if config.num_nextn_predict_layers if mtp is None else mtp:
        params["mtp"] = init_mtp_params(config, rng, dtype)
    return params


class _Shaped:
    """A stand-in for ``rng.standard_normal(shape)``: scalings keep it, ``astype`` makes a view."""

    __array_ufunc__ = None          # numpy scalars defer to __rmul__ instead of building an array

    def __init__(self, shape):
        self.shape = tuple(shape)

    def __mul__(self, other):
        return self

    __rmul__ = __truediv__ = __add__ = __radd__ = __sub__ = __neg__ = __mul__

    def astype(self, dtype):
        return np.broadcast_to(np.zeros((), dtype=dtype), self.shape)


class ShapeOnlyGenerator(np.random.Generator):
    """A ``numpy.random.Generator`` whose ``standard_normal`` returns shapes, not numbers."""

    def __init__(self):
        super().__init__(np.random.PCG64(0))

    def standard_normal(self, size=None, dtype=np.float64, out=None):
        return _Shaped(() if size is None else np.atleast_1d(size))


def expected_params(config, *, mtp=None):
    """The tree ``init_params(config, mtp=mtp)`` builds, with read-only zero-stride leaves."""
    if config.tie_word_embeddings:
        # a loaded tied model (Qwen2.5) carries lm_head as the embedding array itself: same shapes as
        # the untied tree, which is what init_params (it only builds untied models) describes
        config = config.replace(tie_word_embeddings=False)
    return init_params(config, ShapeOnlyGenerator(), np.float64, mtp=mtp)


def check_params(params, config, name="params", *, finite=True):
    """Raise unless ``params`` has exactly the tensors ``config`` implies, float32/float64 and finite.

    The MTP modules (``params["mtp"]``) are optional: a tree without them (or with an empty list)
    is a model without multi-token prediction; with them, they must match the config too.
    """
    check_config(config)
    if not isinstance(params, dict):
        raise TypeError(f"{name}: expected a parameter tree (dict), got {type(params).__name__}")
    has_mtp = bool(params.get("mtp"))
    if "mtp" in params and not has_mtp:
        if params["mtp"] not in (None, []):
            raise TypeError(f"{name}: mtp: expected a list of MTP modules, got {type(params['mtp']).__name__}")
        params = {k: v for k, v in params.items() if k != "mtp"}
    _compare(params, expected_params(config, mtp=has_mtp), name, "", config, finite)


def _compare(node, exp, name, path, config, finite):
    where = path or "the tree"
    if isinstance(exp, dict):
        if not isinstance(node, dict):
            raise TypeError(f"{name}: {where}: expected a dict, got {type(node).__name__}")
        missing = [k for k in exp if k not in node]
        if missing:
            raise ValueError(f"{name}: missing tensor {_join(path, missing[0])} (expected by the config)")
        extra = [k for k in node if k not in exp]
        if extra:
            raise ValueError(f"{name}: unexpected entry {_join(path, extra[0])} (not part of this config's model)")
        for k in exp:
            _compare(node[k], exp[k], name, _join(path, k), config, finite)
    elif isinstance(exp, list):
        if not isinstance(node, list | tuple):
            raise TypeError(f"{name}: {where}: expected a list, got {type(node).__name__}")
        if len(node) != len(exp):
            what = " (num_hidden_layers)" if path == "model.layers" else ""
            raise ValueError(f"{name}: {where}: expected {len(exp)} entries{what}, got {len(node)}")
        for i, (a, e) in enumerate(zip(node, exp, strict=True)):
            _compare(a, e, name, _join(path, str(i)), config, finite)
    else:
        if not isinstance(node, np.ndarray):
            raise TypeError(f"{name}: {where}: expected a numpy.ndarray, got {type(node).__name__}")
        if node.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: {where}: expected dtype float32 or float64, got {node.dtype}")
        if node.shape != exp.shape:
            raise ValueError(f"{name}: {where}: expected shape {exp.shape} from the config, got {node.shape}")
        if finite and node.size and not (np.isfinite(node.max()) and np.isfinite(node.min())):
            raise ValueError(f"{name}: {where}: contains NaN or inf")


def _join(path, key):
    return f"{path}.{key}" if path else str(key)
