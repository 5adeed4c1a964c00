r"""The safetensors format, read lazily and checked, and written atomically: no pickle, no torch.

A ``.safetensors`` file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [start, end]}, "__metadata__": {...}}`` and the raw
little-endian data, offsets relative to the end of the header (the format of Hugging Face's
``safetensors`` library). :func:`open_safetensors` parses and checks the header only and returns one
:class:`TensorRef` per tensor; the bytes are read when a tensor is converted
(:meth:`TensorRef.read`), in chunks of :data:`CHUNK_BYTES`, straight into an array of the target
dtype. Loading a model this way holds each weight once, in the target dtype: peak memory is the
parameters plus one chunk (``benchmarks/bench_students.py`` measures it on R1-Distill-Qwen-1.5B).

BF16 (the hub's format for every DeepSeek and R1-Distill checkpoint) widens exactly: its 16 bits are
the top half of a float32. FP8 E4M3 (DeepSeek-V3's released weights) decodes through a 256-entry
table. Every malformed file (empty, truncated, bad header length or JSON, unknown dtype, missing
fields, offsets out of range or overlapping, a size that does not match the shape) is a
``ValueError`` naming the file and, where there is one, the tensor.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from ..fileio import atomic_write

#: safetensors dtype string -> NumPy dtype of the stored bits (BF16 as uint16, F8_E4M3 as uint8).
STORAGE = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "F8_E4M3": "u1", "I64": "<i8",
           "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}
#: NumPy dtype -> safetensors dtype string, for writing.
WRITE_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
                "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
#: Bytes read per chunk while converting a tensor (the only transient memory of a load).
CHUNK_BYTES = 1 << 22
#: Largest header accepted (the safetensors library's limit).
MAX_HEADER_BYTES = 100_000_000


def e4m3_table():
    """float32 value of every E4M3 (fn) byte: sign, 4 exponent bits (bias 7), 3 mantissa bits."""
    b = np.arange(256)
    sign = np.where(b & 0x80, -1.0, 1.0)
    e, m = (b >> 3) & 0xF, b & 0x7
    mag = np.where(e == 0, m / 8.0 * 2.0 ** -6, (1 + m / 8.0) * 2.0 ** (e - 7.0))
    return np.where((b & 0x7F) == 0x7F, np.nan, sign * mag).astype(np.float32)


def bf16_to_float32(bits):
    """Exact widening of BF16 bit patterns (uint16) to float32. Shapes: (...) -> (...)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(x):
    """BF16 bit patterns (uint16) of ``x``, rounded to nearest, ties to even (as torch's ``.bfloat16()``);
    NaN stays NaN. Shapes: (...) -> (...)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16
    return np.where(np.isnan(x), np.uint32(0x7FC0), rounded).astype(np.uint16)


def _decode(raw, dt, dtype):
    if dt == "BF16":
        return bf16_to_float32(raw.view("<u2")).astype(dtype, copy=False)
    if dt == "F8_E4M3":
        return e4m3_table()[raw].astype(dtype, copy=False)
    return raw.view(STORAGE[dt]).astype(dtype, copy=False)


class TensorRef:
    """One tensor of a safetensors file, not yet read: ``name``, ``dtype`` (the safetensors string),
    ``shape``, ``file`` and absolute byte range ``[begin, end)``. ``np.asarray(ref, dtype)`` reads it."""

    def __init__(self, file, name, dtype, shape, begin, end):
        self.file, self.name, self.dtype, self.shape, self.begin, self.end = file, name, dtype, shape, begin, end

    @property
    def ndim(self):
        return len(self.shape)

    def __repr__(self):
        return f"TensorRef({self.name!r}, {self.dtype}, {self.shape}, file={os.path.basename(self.file)!r})"

    def read(self, dtype=None):
        """The tensor as a new array of ``dtype`` (default: its stored type, BF16/FP8 as float32),
        read chunk by chunk straight into the result (never a second full-size copy)."""
        if dtype is None:
            dtype = np.float32 if self.dtype in ("BF16", "F8_E4M3") else STORAGE[self.dtype]
        dtype = np.dtype(dtype)
        if self.dtype in ("BF16", "F8_E4M3") and dtype.kind != "f":
            raise ValueError(f"{self.file}: tensor '{self.name}' is {self.dtype}, which reads only as a float dtype")
        item = np.dtype(STORAGE[self.dtype]).itemsize
        n = math.prod(self.shape)
        out = np.empty(n, dtype=dtype)                                   # (numel,)
        step = max(CHUNK_BYTES // item, 1)
        with open(self.file, "rb") as f:
            f.seek(self.begin)
            for i in range(0, n, step):
                j = min(i + step, n)
                dst = out[i:j]                                           # (chunk,) a view of the result
                same = np.dtype(STORAGE[self.dtype]) == dtype
                raw = dst.view(np.uint8) if same else np.empty((j - i) * item, dtype=np.uint8)
                if f.readinto(raw) != raw.size:
                    raise ValueError(f"{self.file}: tensor '{self.name}' is truncated (file shorter than its offsets)")
                if same:
                    continue
                if self.dtype == "BF16" and dtype == np.float32:         # widen in place: bits << 16
                    bits = dst.view(np.uint32)
                    np.copyto(bits, raw.view("<u2"), casting="unsafe")
                    bits <<= 16
                elif self.dtype in ("BF16", "F8_E4M3"):
                    dst[...] = _decode(raw, self.dtype, np.float32)
                else:
                    np.copyto(dst, raw.view(STORAGE[self.dtype]), casting="unsafe")
        return out.reshape(self.shape)

    def __array__(self, dtype=None, copy=None):
        return self.read(dtype)


class ScaledRef:
    """An FP8 weight with its block scales ``weight_scale_inv`` (DeepSeek-V3 §3.3), dequantized on read."""

    def __init__(self, weight, scale):
        self.weight, self.scale = weight, scale
        self.name, self.shape, self.file = weight.name, weight.shape, weight.file

    def read(self, dtype=None):
        dtype = np.float32 if dtype is None else dtype
        from ..quant.fp8 import dequantize_weight
        return dequantize_weight(self.weight.read(np.float32), self.scale.read(np.float32)).astype(dtype, copy=False)

    def __array__(self, dtype=None, copy=None):
        return self.read(np.float32 if dtype is None else dtype)


def _bad(path, what, name=None):
    where = f"tensor '{name}' " if name is not None else ""
    return ValueError(f"{os.fspath(path)}: {where}{what}")


def read_header(path):
    """``(header dict, data start byte, file size)`` of a safetensors file, checked (see the module)."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size < 8:
        raise _bad(path, f"not a safetensors file: {size} bytes (empty or truncated; needs an 8-byte header length)")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n == 0 or n > min(size - 8, MAX_HEADER_BYTES):
            raise _bad(path, f"bad header length {n} for a file of {size} bytes (corrupt or truncated)")
        text = f.read(n)
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _bad(path, f"header must be a JSON object, got {type(header).__name__}")
    return header, 8 + n, size


def open_safetensors(path):
    """``{name: TensorRef}`` for every tensor of one file, in file order; nothing is read but the header.

    Checks each entry (a dict with a known ``dtype``, a ``shape`` of non-negative integers,
    ``data_offsets`` inside the data section, of exactly ``prod(shape) * itemsize`` bytes) and that no
    two tensors overlap.
    """
    path = os.fspath(path)
    header, start, size = read_header(path)
    refs, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict):
                raise _bad(path, f"__metadata__ must be an object, got {type(info).__name__}")
            continue
        if not isinstance(info, dict):
            raise _bad(path, f"entry must be an object with dtype, shape, data_offsets; got {info!r}", name)
        for key in ("dtype", "shape", "data_offsets"):
            if key not in info:
                raise _bad(path, f"entry has no '{key}'", name)
        dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dt not in STORAGE:
            raise _bad(path, f"has unknown dtype {dt!r} (supported: {sorted(STORAGE)})", name)
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                  for s in shape):
            raise _bad(path, f"shape must be a list of non-negative integers, got {shape!r}", name)
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= size - start):
            raise _bad(path, f"data_offsets {offs!r} out of range [0, {size - start}] (corrupt or truncated)", name)
        want = math.prod(shape) * np.dtype(STORAGE[dt]).itemsize
        if offs[1] - offs[0] != want:
            raise _bad(path, f"data_offsets {offs} hold {offs[1] - offs[0]} bytes, but {dt} {shape} needs {want}",
                       name)
        refs[name] = TensorRef(path, name, dt, tuple(shape), start + offs[0], start + offs[1])
        if want:
            spans.append((offs[0], offs[1], name))
    spans.sort()
    for (_, e0, a), (s1, _, b) in zip(spans, spans[1:], strict=False):
        if s1 < e0:
            raise _bad(path, f"data overlaps tensor '{a}' (data_offsets overlap)", b)
    return refs


def read_safetensors_file(path, dtype=None):
    """One ``.safetensors`` file read eagerly as ``{name: array}`` (BF16/FP8 widened to float32 unless
    ``dtype`` is given)."""
    return {k: ref.read(dtype) for k, ref in open_safetensors(path).items()}


def _storage(name, a, dtype):
    """(safetensors dtype, contiguous array of the stored bits) for writing ``a``."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"tensors['{name}']: expected a numpy.ndarray, got {type(a).__name__}")
    if dtype is not None and a.dtype.kind == "f":
        if str(dtype).lower() in ("bf16", "bfloat16"):
            return "BF16", float32_to_bf16(a)
        a = a.astype(dtype)
    if a.dtype.name not in WRITE_DTYPES:
        raise ValueError(f"tensors['{name}']: dtype {a.dtype} cannot be stored in safetensors "
                         f"(supported: {sorted(WRITE_DTYPES)} and bfloat16)")
    return WRITE_DTYPES[a.dtype.name], np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False)


def write_safetensors(path, tensors, *, dtype=None, metadata=None):
    """Write ``{name: array}`` as one safetensors file through :func:`refimpl.fileio.atomic_write`.

    ``dtype``: convert float tensors first (``"bfloat16"`` rounds to nearest even, as torch does;
    default: keep each array's dtype, so float64 round-trips exactly). One tensor is converted at a
    time. The header is padded with spaces to a multiple of 8 bytes, as the safetensors library does.
    """
    header, offset, order = {}, 0, []
    for name, a in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"tensors: invalid tensor name {name!r}")
        if not isinstance(a, np.ndarray):
            raise TypeError(f"tensors['{name}']: expected a numpy.ndarray, got {type(a).__name__}")
        dt = "BF16" if (dtype is not None and a.dtype.kind == "f"
                        and str(dtype).lower() in ("bf16", "bfloat16")) else None
        if dt is None:
            target = np.dtype(dtype) if dtype is not None and a.dtype.kind == "f" else a.dtype
            if target.name not in WRITE_DTYPES:
                raise ValueError(f"tensors['{name}']: dtype {target} cannot be stored in safetensors "
                                 f"(supported: {sorted(WRITE_DTYPES)} and bfloat16)")
            dt = WRITE_DTYPES[target.name]
        nbytes = a.size * np.dtype(STORAGE[dt]).itemsize
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        order.append(name)
    if metadata is not None:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with atomic_write(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in order:
            _, bits = _storage(name, tensors[name], dtype)
            f.write(memoryview(bits.reshape(-1)).cast("B") if bits.size else b"")
