r"""Checkpoint directories: one ``model.safetensors``, or shards listed in ``model.safetensors.index.json``.

Hub checkpoints above a few GB are split into ``model-00001-of-00002.safetensors`` ... with an index
``{"metadata": {"total_size": bytes}, "weight_map": {tensor name: shard file}}`` (the layout of
transformers' ``save_pretrained`` and of every released DeepSeek and R1-Distill model; shard counts
may be zero-padded to six digits, so names are read from the index, never guessed).
:func:`read_checkpoint` returns lazy :class:`~refimpl.model.safetensors_io.TensorRef` objects, checks
the index against the shards' headers, and wraps FP8 weights with their block scales;
:func:`write_checkpoint` writes either layout atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..fileio import atomic_write
from .safetensors_io import STORAGE, ScaledRef, open_safetensors, write_safetensors

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _read_index(index):
    try:
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{index}: not valid JSON ({e})") from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
        raise ValueError(f"{index}: expected an object with a non-empty 'weight_map' of tensor name -> shard file")
    return wm


def read_checkpoint(path):
    """``{tensor name: TensorRef or ScaledRef}`` of a checkpoint directory; nothing but headers is read.

    With an index, exactly the shards it names are opened, and every tensor must sit in the shard the
    index names (``ValueError`` naming the tensor and the shard otherwise). Without one, every
    ``*.safetensors`` file is read and a name may appear in only one. FP8 weights with a
    ``<name>_scale_inv`` tensor (DeepSeek-V3's released format) become :class:`ScaledRef` and the
    scale tensors disappear from the result.
    """
    path = Path(path)
    refs = {}
    if (path / INDEX).is_file():
        index = path / INDEX
        wm = _read_index(index)
        for fname in sorted(set(wm.values())):
            shard = path / fname
            if not shard.is_file():
                first = next(k for k, v in wm.items() if v == fname)
                raise ValueError(f"{index}: shard file '{fname}' (of tensor '{first}') does not exist")
            for k, r in open_safetensors(shard).items():
                if wm.get(k) != fname:
                    raise ValueError(f"{shard}: tensor '{k}' is not mapped to this shard by {INDEX} "
                                     f"(index says {wm.get(k)!r})")
                refs[k] = r
        missing = [k for k in wm if k not in refs]
        if missing:
            raise ValueError(f"{index}: tensor '{missing[0]}' is mapped to shard '{wm[missing[0]]}', which does not "
                             "contain it")
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"path: no *.safetensors files in {os.fspath(path)!r}")
        for f in files:
            for k, r in open_safetensors(f).items():
                if k in refs:
                    raise ValueError(f"{f}: tensor '{k}' also appears in {Path(refs[k].file).name} (duplicate name)")
                refs[k] = r
    for k in [k for k in refs if k.endswith(".weight_scale_inv")]:
        w = k[:-len("_scale_inv")]
        if w not in refs:
            raise ValueError(f"{refs[k].file}: tensor '{k}' has no weight '{w}' to scale")
        refs[w] = ScaledRef(refs[w], refs.pop(k))
    return refs


def write_checkpoint(path, tensors, *, dtype=None, max_shard_bytes=None):
    """Write ``{name: array}`` into directory ``path``: one ``model.safetensors``, or, when the data
    exceed ``max_shard_bytes``, shards ``model-0000i-of-0000N.safetensors`` plus the index (tensors kept
    whole and in order). Stale files of the other layout are removed so the directory reads back as
    written. Returns the list of files written."""
    path = Path(path)
    bf16 = dtype is not None and str(dtype).lower() in ("bf16", "bfloat16")

    def nbytes(a):
        if a.dtype.kind == "f" and dtype is not None:
            return a.size * (2 if bf16 else np.dtype(dtype).itemsize)
        return a.nbytes

    sizes = {k: nbytes(a) for k, a in tensors.items()}
    total = sum(sizes.values())
    old = _read_index(path / INDEX) if (path / INDEX).is_file() else {}
    if max_shard_bytes is None or total <= max_shard_bytes:
        write_safetensors(path / SINGLE, tensors, dtype=dtype, metadata={"format": "pt"})
        for stale in [path / INDEX, *(path / f for f in set(old.values()))]:
            if stale.name != SINGLE and stale.is_file():
                stale.unlink()
        return [SINGLE]
    groups, cur, size = [], [], 0
    for k in tensors:
        if cur and size + sizes[k] > max_shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += sizes[k]
    groups.append(cur)
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for fname, group in zip(names, groups, strict=True):
        write_safetensors(path / fname, {k: tensors[k] for k in group}, dtype=dtype, metadata={"format": "pt"})
    weight_map = {k: fname for fname, group in zip(names, groups, strict=True) for k in group}
    with atomic_write(path / INDEX, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    for stale in [path / SINGLE, *(path / f for f in set(old.values()) - set(names))]:
        if stale.is_file():
            stale.unlink()
    return names


__all__ = ["INDEX", "SINGLE", "STORAGE", "read_checkpoint", "write_checkpoint"]
