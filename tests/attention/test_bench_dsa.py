"""The DSA benchmark cases (quick shapes): every variant runs and the pairs agree. No timing."""

import numpy as np
import pytest

from benchmarks import bench_dsa  # noqa: F401  (registers the cases)
from benchmarks.harness import NUMPY, REGISTRY, MismatchError


@pytest.mark.parametrize("name", ["dsa/decode-medium", "dsa/decode-long"])
def test_quick_case_variants_agree(name):
    case = REGISTRY.factories[name](True)
    assert NUMPY in case.variants and case.params["index_topk"] < case.params["context"]
    outputs = {n: v.fn() for n, v in case.variants.items()}
    case.check(outputs)
    assert np.abs(outputs[NUMPY] - outputs["refimpl-numpy-dense"]).max() > 1e-4   # sparse is not dense
    outputs[NUMPY] = outputs[NUMPY] * 1.01
    if "torch" in outputs:
        with pytest.raises(MismatchError):
            case.check(outputs)
