"""The recipes' result cache: parameter trees as ``.npz``, everything else as JSON.

A stage's result is stored in ``cache_dir/<key>/`` under a key that hashes the stage's name, its
arguments and the source of every refimpl module the stage executes (``sources``, paths relative
to the ``refimpl`` package: a folder means all its ``.py`` files). Editing any of those files
changes the key, so a stale result is never loaded; editing anything else keeps it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..fileio import atomic_write
from ..model.transformer import init_params
from ..tree import tree_flatten, tree_paths

_ROOT = Path(__file__).resolve().parents[1]          # the refimpl package


def source_hash(sources) -> str:
    """SHA-256 of the paths and bytes of the ``.py`` files named by ``sources`` (in that order)."""
    h = hashlib.sha256()
    for entry in sources:
        path = _ROOT / entry
        if not path.exists():
            raise ValueError(f"sources: {entry!r} is not a file or folder of the refimpl package")
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(_ROOT)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def cache_key(name, args, sources) -> str:
    """``"<name>-<16 hex digits>"``: a hash of ``name``, the JSON-able ``args`` and :func:`source_hash`."""
    blob = json.dumps({"name": name, "args": args, "src": source_hash(sources)}, sort_keys=True, default=str)
    return f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def save(cache_dir, key, trees, meta):
    """Store ``trees`` (a dict of parameter trees) in one ``params.npz`` and ``meta`` as ``meta.json``."""
    d = Path(cache_dir) / key
    d.mkdir(parents=True, exist_ok=True)
    arrays = {f"{name}/{p}": a for name, tree in trees.items()
              for p, a in zip(tree_paths(tree), tree_flatten(tree)[0], strict=True)}
    with atomic_write(d / "params.npz") as f:       # atomic: a half-written file is never loaded
        np.savez(f, **arrays)
    with atomic_write(d / "meta.json", "w") as f:   # written last: its presence marks a complete entry
        f.write(json.dumps(meta))


def load(cache_dir, key, config, names):
    """``(trees, meta)`` stored by :func:`save` (each tree shaped like ``init_params(config)``), or None."""
    d = Path(cache_dir) / key
    if not ((d / "meta.json").exists() and (d / "params.npz").exists()):
        return None
    template = init_params(config, np.random.default_rng(0), np.float32)
    rebuild = tree_flatten(template)[1]
    with np.load(d / "params.npz", allow_pickle=False) as z:
        trees = {name: rebuild([z[f"{name}/{p}"] for p in tree_paths(template)]) for name in names}
    return trees, json.loads((d / "meta.json").read_text())


def plain(obj):
    """JSON round trip: the result has the same structure whether computed or loaded from the cache."""
    return json.loads(json.dumps(obj))


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (sample standard deviation / √n; 0 for a single value) of ``values``."""
    v = np.asarray(values, dtype=np.float64)                                 # (n,)
    return float(v.mean()), (float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0)
