"""Hypothesis profiles (chosen by HYPOTHESIS_PROFILE; default "dev") and shared fixtures."""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=15, **_common)
settings.register_profile("ci", max_examples=40, derandomize=True, print_blob=True, **_common)
settings.register_profile("thorough", max_examples=400, **_common)
# tests/robust/test_fuzz.py: bad and extreme input to every fuzzed public function (CI runs it with
# this budget; other profiles take a few examples per function)
settings.register_profile("fuzz", max_examples=150, derandomize=True, print_blob=True, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def rng():
    """A fixed-seed generator for tests that need random data but no hypothesis search."""
    return np.random.default_rng(1234)
