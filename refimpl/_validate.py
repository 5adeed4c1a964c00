"""Input validation shared by every public entry point.

Each helper raises early with a message that names the argument, what was expected and what came,
so a caller porting a model sees at once which tensor is wrong (DESIGN: "bad input gets a clear
error, early").
"""

from __future__ import annotations

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_float(name: str, x, *, ndim: int | None = None, min_ndim: int | None = None,
                allow_inf: bool = False) -> np.ndarray:
    """Return ``x`` if it is a float32/float64 ndarray with finite values.

    NaN is never allowed; ``allow_inf=True`` admits ``-inf`` only (masked logits), never ``+inf``.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {x.shape}")
    if min_ndim is not None and x.ndim < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimensions, got shape {x.shape}")
    if x.size:
        # min/max propagate NaN, so two reductions check finiteness without an (x.shape) temporary
        hi, lo = x.max(), x.min()
        if allow_inf:
            if np.isnan(hi) or hi == np.inf:
                raise ValueError(f"{name}: contains NaN or +inf (only -inf is accepted, as a mask)")
        elif not (np.isfinite(hi) and np.isfinite(lo)):
            raise ValueError(f"{name}: contains NaN or inf")
    return x


def check_same_dtype(name: str, x: np.ndarray, ref_name: str, ref: np.ndarray) -> None:
    """Raise TypeError unless ``x`` has the dtype of ``ref`` (no silent up/down-casting)."""
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} to match {ref_name}, got {x.dtype}")


def check_int(name: str, x, *, low: int | None = None, high: int | None = None,
              allow: int | None = None) -> np.ndarray:
    """Return ``x`` as an integer ndarray with values in [low, high) (``allow`` is also accepted)."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{name}: expected an integer array (int64), got dtype {x.dtype}")
    x = x.astype(np.int64, copy=False)
    valid = np.ones(x.shape, dtype=bool)
    if allow is not None:
        valid = x != allow
    if x.size and valid.any():
        v = x[valid]
        if low is not None and v.min() < low:
            raise ValueError(f"{name}: expected values >= {low}, got {v.min()}")
        if high is not None and v.max() >= high:
            raise ValueError(f"{name}: expected values < {high}, got {v.max()}")
    return x


def check_shape(name: str, x: np.ndarray, expected: tuple, what: str = "") -> None:
    """Raise ValueError unless ``x.shape == expected``."""
    if tuple(x.shape) != tuple(expected):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name}: expected shape {tuple(expected)}{extra}, got {tuple(x.shape)}")
