"""The package's threading policy (refimpl.backend): OMP_WAIT_POLICY=passive unless the user set one;
a runtime loaded too early (torch first) is detected and warned about; the benchmarks set it first."""

import os
import subprocess
import sys

import pytest


def _policy_after_import(env_value):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_value is not None:
        env["OMP_WAIT_POLICY"] = env_value
    code = "import os, sys, refimpl; assert 'numba' not in sys.modules; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_import_sets_passive_wait_without_importing_numba():
    assert _policy_after_import(None) == "passive"


def test_user_setting_wins():
    assert _policy_after_import("active") == "active"


def _run(code, env_value=None):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_value is not None:
        env["OMP_WAIT_POLICY"] = env_value
    return subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                          check=True)


LATE = ("import torch, refimpl.backend as b; print(b.OMP_LATE); "
        "b.kernel('vecmath_nb'); b.kernel('vecmath_nb')")


def test_openmp_loaded_before_refimpl_is_detected_and_warned_once():
    pytest.importorskip("torch")
    out = _run(LATE)
    if "True" not in out.stdout:
        pytest.skip("this torch build loads no OpenMP runtime at import")
    assert out.stderr.count("RuntimeWarning") == 1 and "OMP_WAIT_POLICY" in out.stderr   # once, at the first kernel


def test_no_warning_when_refimpl_comes_first_or_the_user_set_a_policy():
    pytest.importorskip("torch")
    first = _run("import refimpl.backend as b, torch; print(b.OMP_LATE); b.kernel('vecmath_nb')")
    assert first.stdout.strip() == "False" and "OMP_WAIT_POLICY" not in first.stderr
    user = _run(LATE, env_value="passive")
    assert user.stdout.strip() == "False" and "OMP_WAIT_POLICY" not in user.stderr


def test_benchmarks_package_sets_the_policy_before_any_import():
    out = _run("import benchmarks, os, sys; assert 'numpy' not in sys.modules; print(os.environ['OMP_WAIT_POLICY'])")
    assert out.stdout.strip() == "passive"
