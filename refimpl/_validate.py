"""Input validation shared by every public entry point.

Each helper raises early with a message that names the argument, what was expected and what came,
so a caller porting a model sees at once which tensor is wrong (DESIGN: "bad input gets a clear
error, early").
"""

from __future__ import annotations

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_float(name: str, x, *, ndim: int | None = None, min_ndim: int | None = None,
                allow_inf: bool = False, scan: bool = True) -> np.ndarray:
    """Return ``x`` if it is a float32/float64 ndarray with finite values.

    NaN is never allowed; ``allow_inf=True`` admits ``-inf`` only (masked logits), never ``+inf``.
    ``scan=False`` checks type, dtype and shape only, for a caller whose kernel tests the values in
    its own pass over them (and raises the same ValueError).
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {x.shape}")
    if min_ndim is not None and x.ndim < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimensions, got shape {x.shape}")
    if not scan:
        return x
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.sum(x) if x.size else 0.0
    if x.size and np.isfinite(total):
        return x                    # one pass: NaN and +-inf propagate through any sum, so all finite
    if x.size:
        # min/max propagate NaN, so two reductions check finiteness without an (x.shape) temporary
        # (reached only when the sum is not finite: a non-finite element, or finite values that
        # overflow the sum)
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


# ------------------------------------------------------------------------------------------------
# Scalars: one set of helpers for every config field and scalar option (ModelConfig, TrainConfig,
# GRPOConfig, GKDConfig, the functions' keyword options). A value of the wrong type raises
# TypeError, a value of the right type outside its range raises ValueError; both name the field.
# bool is never accepted as a number (``hidden_size=True`` is a mistake, not 1).
# ------------------------------------------------------------------------------------------------

def check_integer(name: str, v, *, low: int | None = None, high: int | None = None) -> int:
    """Return ``v`` as an ``int`` if it is an integer (Python or NumPy, not bool) in [low, high]."""
    if isinstance(v, bool | np.bool_) or not isinstance(v, int | np.integer):
        raise TypeError(f"{name}: expected an integer, got {v!r} ({type(v).__name__})")
    v = int(v)
    if (low is not None and v < low) or (high is not None and v > high):
        raise ValueError(f"{name}: expected an integer {_interval(low, high, False, False)}, got {v}")
    return v


def check_positive_int(name: str, v) -> int:
    """An integer >= 1."""
    return check_integer(name, v, low=1)


def check_real(name: str, v, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """Return ``v`` as a finite ``float`` in the interval [low, high] (ends open when asked).

    Integers are accepted (``lr=1``); bool, strings, None and NaN/inf are not.
    """
    if isinstance(v, bool | np.bool_) or not isinstance(v, int | float | np.integer | np.floating):
        raise TypeError(f"{name}: expected a real number, got {v!r} ({type(v).__name__})")
    f = float(v)
    if not np.isfinite(f):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")
    if ((low is not None and (f <= low if low_open else f < low))
            or (high is not None and (f >= high if high_open else f > high))):
        raise ValueError(f"{name}: expected a number {_interval(low, high, low_open, high_open)}, got {v!r}")
    return f


def check_positive_real(name: str, v) -> float:
    """A finite number > 0."""
    return check_real(name, v, low=0.0, low_open=True)


def check_bool(name: str, v) -> bool:
    """A Python or NumPy bool (0/1 integers are not accepted: they hide a misplaced argument)."""
    if not isinstance(v, bool | np.bool_):
        raise TypeError(f"{name}: expected True or False, got {v!r} ({type(v).__name__})")
    return bool(v)


def check_choice(name: str, v, choices):
    """``v`` if it is one of ``choices`` (compared with ==, types included), else ValueError."""
    for c in choices:
        if type(v) is type(c) and v == c:
            return v
    raise ValueError(f"{name}: expected one of {tuple(choices)}, got {v!r}")


def _interval(low, high, low_open, high_open):
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return ""


def check_fields(obj, checks) -> None:
    """Run ``helper(name, getattr(obj, name), **kwargs)`` for each ``(name, helper, kwargs)``."""
    for name, helper, kwargs in checks:
        helper(name, getattr(obj, name), **kwargs)


#: The ``backend=`` values every config accepts (:func:`refimpl.backend.resolve_backend`).
BACKENDS = (None, "auto", "numpy", "numba")


def check_betas(name: str, betas) -> tuple:
    """Adam's ``(beta1, beta2)``: two finite numbers in [0, 1)."""
    if not isinstance(betas, tuple | list) or len(betas) != 2:
        raise ValueError(f"{name}: expected two values in [0, 1), got {betas!r}")
    return tuple(check_real(f"{name}[{i}]", b, low=0.0, high=1.0, high_open=True) for i, b in enumerate(betas))


def check_upstream(name: str, dy, shape=None) -> np.ndarray:
    """An upstream gradient given to a backward function: a float ndarray (or a real scalar for a
    scalar loss), finite, and shaped like the forward's output when ``shape`` is given."""
    if shape == () and not isinstance(dy, np.ndarray):
        check_real(name, dy)
        return np.asarray(dy, dtype=np.float64)
    check_float(name, dy)
    if shape is not None and tuple(dy.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} (the forward's output), got {tuple(dy.shape)}")
    return dy

