"""The model benchmark cases (quick shapes): every variant runs and the variants agree. No timing."""

import numpy as np
import pytest

from benchmarks import bench_model  # noqa: F401  (registers the cases)
from benchmarks.harness import NUMPY, REGISTRY, MismatchError


@pytest.mark.parametrize("name", ["model/train-step", "model/decode"])
def test_quick_case_variants_agree(name):
    case = REGISTRY.factories[name](True)
    assert NUMPY in case.variants
    outputs = {n: v.fn() for n, v in case.variants.items()}
    case.check(outputs)
    if len(outputs) < 2:        # train-step compares against torch; without it there is one variant
        pytest.skip(f"{name}: only {sorted(outputs)} available, nothing to compare")
    outputs[NUMPY] = np.asarray(outputs[NUMPY]) + 1      # the check is not vacuous
    with pytest.raises(MismatchError):
        case.check(outputs)
