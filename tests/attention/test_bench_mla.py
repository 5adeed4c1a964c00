"""The MLA benchmark cases (quick shapes): every variant runs and the variants agree. No timing."""

import pytest

from benchmarks import bench_mla  # noqa: F401  (registers the cases)
from benchmarks.harness import NUMPY, REGISTRY, MismatchError

NAMES = ["mla/decode-short", "mla/decode-medium", "mla/decode-long", "mla/prefill-fwd+bwd"]


@pytest.mark.parametrize("name", NAMES)
def test_quick_case_variants_agree(name):
    case = REGISTRY.factories[name](True)
    assert NUMPY in case.variants
    outputs = {n: v.fn() for n, v in case.variants.items()}
    case.check(outputs)
    if "decode" in name:   # the check is not vacuous: a perturbed absorbed output is rejected
        outputs[NUMPY] = outputs[NUMPY] * 1.01
        with pytest.raises(MismatchError):
            case.check(outputs)
