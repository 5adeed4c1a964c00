"""The gradient checker itself: it must pass correct backwards and fail wrong ones."""

import numpy as np
import pytest

from refimpl.core import rmsnorm_backward, rmsnorm_forward, softmax_backward, softmax_forward
from refimpl.testing import check_grad, tol, tree_flatten

GRAD_TOL = tol("gradcheck")["rtol"]


def _rmsnorm(x, w):
    y, c = rmsnorm_forward(x, w)
    return y, lambda dy: rmsnorm_backward(dy, c)


def test_correct_backward_passes(rng):
    err = check_grad(_rmsnorm, [rng.standard_normal((3, 5)), rng.standard_normal(5)])
    assert err < GRAD_TOL


@pytest.mark.parametrize("scale", [1.001, 0.99, -1.0])
def test_scaled_gradient_fails(rng, scale):
    def wrong(x, w):
        y, c = rmsnorm_forward(x, w)
        return y, lambda dy: (rmsnorm_backward(dy, c)[0] * scale, rmsnorm_backward(dy, c)[1])
    err = check_grad(wrong, [rng.standard_normal((3, 5)), rng.standard_normal(5)])
    assert err > 100 * GRAD_TOL


def test_all_ones_upstream_would_hide_a_bug_random_does_not(rng):
    """sum(softmax(x)) == 1 for every x, so with an all-ones upstream gradient the true gradient is
    zero and a backward that returns zeros looks right. check_grad's random upstream exposes it."""
    x = rng.standard_normal((2, 4))
    p, c = softmax_forward(x)
    assert np.allclose(softmax_backward(np.ones_like(p), c), 0.0)   # the trap is real

    def wrong(x):
        p, _ = softmax_forward(x)
        return p, lambda dp: (np.zeros_like(dp),)
    assert check_grad(wrong, [x]) > 0.5


def test_wrong_only_in_one_leaf_of_a_tree_is_caught(rng):
    def f(params, x):
        y, c = rmsnorm_forward(x, params["w"])
        def vjp(dy):
            dx, dw = rmsnorm_backward(dy, c)
            return {"w": dw + 1e-3}, dx
        return y, vjp
    err, details = check_grad(f, [{"w": rng.standard_normal(4)}, rng.standard_normal((2, 4))],
                              return_details=True)
    assert err > 1e-4
    by_input = {i: e for i, _, e in details}
    assert by_input[1] < GRAD_TOL and by_input[0] > 1e-4


def test_integer_inputs_are_skipped_and_shape_mismatch_raises(rng):
    def f(x, ids):
        return x[ids], lambda dy: (np.zeros(3), None)
    with pytest.raises(ValueError, match="gradient for input 0"):
        check_grad(f, [rng.standard_normal(4), np.array([0, 2])])


def test_tree_flatten_roundtrip():
    tree = {"a": np.zeros(2), "b": [np.ones(3), {"c": np.full(1, 2.0)}]}
    leaves, rebuild = tree_flatten(tree)
    assert len(leaves) == 3
    back = rebuild(leaves)
    assert back["b"][1]["c"][0] == 2.0 and isinstance(back["b"], list)


def test_dict_gradients_are_matched_by_key_not_order(rng):
    def f(params):
        y = params["a"] * 2 + params["b"] ** 2
        return y, lambda dy: ({"b": 2 * params["b"] * dy, "a": 2 * dy},)
    assert check_grad(f, [{"a": rng.standard_normal(3), "b": rng.standard_normal(3)}]) < GRAD_TOL


# ------------------------------------------------------------------------------------------------
# Issue 15 item 15: an objective that is a tiny difference of large numbers
# ------------------------------------------------------------------------------------------------

def _ce(targets):
    from refimpl.core import cross_entropy

    def f(z):
        return cross_entropy(z, targets, grad=False)[0], lambda d: (cross_entropy(z, targets, d)[1],)
    return f


def test_cancelling_objective_passes_a_correct_gradient():
    # loss ~5e-10 computed as logsumexp(z) - z_t with |z| ~ 5: the old floor (rounding
    # proportional to the output) reported 0.041 here
    z = np.array([[5.67160145, -15.68245324]])
    for seed in range(8):
        assert check_grad(_ce(np.array([0])), [z], seed=seed) < GRAD_TOL


from hypothesis import given  # noqa: E402

from refimpl.testing.strategies import logits_and_targets  # noqa: E402


@given(case=logits_and_targets(scale=None))
def test_public_strategy_never_fails_a_correct_cross_entropy(case):
    z, t = case
    assert check_grad(_ce(t), [z]) < GRAD_TOL


@given(case=logits_and_targets(scale=1.0))
def test_a_wrong_cross_entropy_gradient_is_still_caught(case):
    z, t = case
    from refimpl.core import cross_entropy
    if not (t != -100).any():
        return

    def wrong(z):
        return cross_entropy(z, t, grad=False)[0], lambda d: (cross_entropy(z, t, d)[1] * 1.01,)
    assert check_grad(wrong, [z]) > 100 * GRAD_TOL
