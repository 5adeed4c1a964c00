"""Fuzz suite (issue 15): every covered public function, given one bad or extreme argument,
either returns a finite result or raises ValueError/TypeError naming that argument; it never
raises anything else, never modifies its inputs and never hangs.

Valid calls come from ``fuzz_cases.CASES``; hypothesis picks an argument and a mutation (NaN or
inf entries, wrong dtype, extra or missing axis, empty arrays, extreme magnitudes, out-of-range
ids, non-finite/negative/wrong-type scalars, None). The ``fuzz`` hypothesis profile
(``HYPOTHESIS_PROFILE=fuzz``, run by CI) searches harder; other profiles take a few examples per
function so the default run stays in seconds. ``refimpl.FUZZED`` lists the covered functions and
``refimpl.FUZZ_PENDING`` the public functions not covered yet; a public function in neither fails
:func:`test_every_public_function_is_fuzzed_or_listed`.
"""

import copy
import importlib
import inspect
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import refimpl

sys.path.insert(0, str(Path(__file__).parent))
from fuzz_cases import CASES  # noqa: E402

FUZZ = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
EXAMPLES = settings().max_examples if FUZZ else 4
HANG_SECONDS = 60
#: arguments that are opaque tokens made by refimpl itself (a forward's cache), not user input
OPAQUE = ("cache",)
#: arguments a function fills in place by design (decoding caches)
IN_PLACE = ("caches",)
#: rounding emulators that pass NaN/inf through, as the IEEE conversions they emulate do
IEEE_PASSTHROUGH = ("quant.round_to_bf16", "quant.round_to_fp8")


def _float_mutations(a):
    out = [a * 1e4, a.astype(np.int64), a.astype(np.float16), a[None], a.tolist()]
    if a.size:
        for v in (np.nan, np.inf):
            b = a.copy()
            b.flat[0] = v
            out.append(b)
    if a.ndim:
        out += [a[..., 0], a[:0]]
    return out


def _int_mutations(a):
    out = [a + 1000, a - 1000, a.astype(np.float64), a[None], a.tolist()]
    if a.ndim:
        out.append(a[:0])
    return out


def mutations(v):
    if isinstance(v, np.ndarray):
        if v.dtype == bool:
            return [v.astype(np.float64) * 2, v[None], v.astype(np.int64) - 1]
        if v.dtype.kind == "f":
            return _float_mutations(v)
        if v.dtype.kind in "iu":
            return _int_mutations(v)
    if isinstance(v, bool):
        return [None, 2, "True"]
    if isinstance(v, int):
        return [-1, 0, 1.5, 10**5, "3", None, True]
    if isinstance(v, float):
        return [np.nan, np.inf, -np.inf, -1.0, 0.0, 1e300, "0.5", None, True]
    if isinstance(v, str):
        return ["bogus", 3, None, "<answer>" * 4000]
    if isinstance(v, list):
        return [[], [3, 4], "abc", None, v * 2]
    return [None, 3, "x"]


def _same(a, b):
    if isinstance(a, np.random.Generator):
        return True   # sampling consumes the generator's state by design
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(
            a, b, equal_nan=a.dtype.kind in "fc")
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:
        return True


def _finite(out, depth=0):
    """Float arrays and floats in the result (not in caches) are finite."""
    if isinstance(out, np.ndarray):
        return out.dtype.kind != "f" or bool(np.isfinite(out).all())
    if isinstance(out, float):
        return bool(np.isfinite(out))
    if depth > 1 or hasattr(out, "_fields"):
        return True   # caches (NamedTuples) and deep structures hold intermediates, checked elsewhere
    if isinstance(out, dict):
        return all(_finite(v, depth + 1) for v in out.values())
    if isinstance(out, list | tuple):
        return all(_finite(v, depth + 1) for v in out)
    return True


def _alarm(signum, frame):
    raise TimeoutError(f"no result after {HANG_SECONDS} s")


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_fuzz(name, data):
    fn, args, kwargs = CASES[name]()
    params = list(inspect.signature(fn).parameters)
    slots = [("arg", i) for i in range(len(args))] + [("kw", k) for k in kwargs]
    slots = [s for s in slots if (params[s[1]] if s[0] == "arg" else s[1]) not in OPAQUE]
    kind, where = data.draw(st.sampled_from(slots), label="argument")
    args, kwargs = list(args), dict(kwargs)
    value = args[where] if kind == "arg" else kwargs[where]
    bad = data.draw(st.sampled_from(mutations(value)), label="value")
    if kind == "arg":
        args[where] = bad
        arg_name = params[where]
    else:
        kwargs[where] = bad
        arg_name = where
    keep = [i for i in range(len(args)) if params[i] not in IN_PLACE]
    watched = lambda: ([args[i] for i in keep], {k: v for k, v in kwargs.items() if k not in IN_PLACE})  # noqa: E731
    before = copy.deepcopy(watched())
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_SECONDS)
    try:
        out = fn(*args, **kwargs)
    except (ValueError, TypeError) as e:
        msg = str(e)
        # the mutated argument, or (an inconsistency between two arguments) the other one
        assert any(msg.startswith(n) or f"{n}:" in msg or f"{n} " in msg for n in params), \
            f"{name}: error for {arg_name}={bad!r:.60} names no argument: {msg}"
    else:
        assert _finite(out) or name in IEEE_PASSTHROUGH, f"{name}: {arg_name}={bad!r:.60} gave a non-finite result"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert _same(before, watched()), f"{name}: modified its input ({arg_name}={bad!r:.60})"


def _public_functions():
    found = set()
    for sub in refimpl._SUBMODULES + ("core",):
        mod = importlib.import_module(f"refimpl.{sub}")
        for n in getattr(mod, "__all__", ()):
            if inspect.isfunction(getattr(mod, n, None)):
                found.add(f"{sub}.{n}")
    return found


def test_every_public_function_is_fuzzed_or_listed():
    public = _public_functions()
    fuzzed, pending = set(refimpl.FUZZED), set(refimpl.FUZZ_PENDING)
    assert fuzzed == set(CASES), "refimpl.FUZZED must list exactly the functions fuzz_cases.CASES covers"
    assert not fuzzed & pending
    missing = sorted(public - fuzzed - pending)
    assert not missing, f"public functions without fuzz coverage (add a case, or list them as pending): {missing}"
    stale = sorted((fuzzed | pending) - public)
    assert not stale, f"listed but not public: {stale}"
