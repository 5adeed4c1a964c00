"""The load-balancing recipe: same start for every mode, collapse without balancing, balance with the bias."""

import numpy as np
import pytest

from refimpl.moe import max_violation
from refimpl.recipes.moe_balance import moe_balance_run


@pytest.fixture(scope="module")
def short_run():
    return moe_balance_run(steps=150, batch=256, progress=False)


def test_modes_share_the_start_and_record_consistent_histories(short_run):
    runs = short_run["runs"]
    assert set(runs) == {"none", "aux", "bias"}
    first = [h["load"][0] for h in runs.values()]
    assert all(np.array_equal(first[0], f) for f in first)        # same init, same first batch
    for h in runs.values():
        assert h["load"].shape == (150, 16) and np.all(h["load"].sum(1) == 256 * 2)
        np.testing.assert_allclose(h["maxvio"], max_violation(h["load"]))
    assert not runs["none"]["bias"].any() and not runs["aux"]["bias"].any()   # only "bias" moves it
    assert runs["bias"]["bias"].any()


def test_collapse_without_balancing_and_balance_with_either_cure(short_run):
    vio = {m: h["maxvio"][-30:].mean() for m, h in short_run["runs"].items()}
    assert vio["none"] > 3.0
    assert vio["aux"] < 0.5 * vio["none"] and vio["bias"] < 0.5 * vio["none"]


def test_bad_mode():
    with pytest.raises(ValueError, match="modes"):
        moe_balance_run(steps=1, modes=("nope",), progress=False)
