"""The package's threading policy (refimpl.backend): OMP_WAIT_POLICY=passive unless the user set one."""

import os
import subprocess
import sys


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
