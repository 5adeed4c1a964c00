"""Balance losses (values, gradients, the uniform case), the V3 bias update and MaxVio."""

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from refimpl.config import ModelConfig
from refimpl.core import softmax_forward
from refimpl.moe import (
    balance_backward,
    bias_update,
    comm_balance_forward,
    device_balance_forward,
    expert_balance_forward,
    expert_load,
    gate_forward,
    max_violation,
    seq_balance_forward,
)
from refimpl.testing import check_grad, tol
from refimpl.testing import strategies as rst

GRAD = tol("gradcheck")["rtol"]


@st.composite
def routed_scores(draw):
    """scores (B, T, E) (softmax or sigmoid-like positive), idx (B, T, K) distinct per token, devices."""
    rng = draw(rst.seeds())
    n_dev = draw(st.sampled_from([1, 2, 4]))
    e = n_dev * draw(st.integers(1, 3))
    k = draw(st.integers(1, e))
    b, t = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    logits = rng.standard_normal((b, t, e))
    scores = softmax_forward(logits)[0] if draw(st.booleans()) else 1 / (1 + np.exp(-logits))
    idx = np.argsort(rng.random((b, t, e)), axis=-1)[..., :k]
    m = draw(st.integers(1, n_dev))
    return scores, idx, n_dev, m


LOSSES = {
    "expert": lambda s, i, d, m, a: expert_balance_forward(s, i, a),
    "device": lambda s, i, d, m, a: device_balance_forward(s, i, d, a),
    "comm": lambda s, i, d, m, a: comm_balance_forward(s, i, d, m, a),
    "seq_v3": lambda s, i, d, m, a: seq_balance_forward(s, i, a),
}


@pytest.mark.parametrize("name", list(LOSSES))
@given(case=routed_scores(), alpha=st.sampled_from([0.003, 1.0]))
def test_balance_loss_gradients(name, case, alpha):
    scores, idx, n_dev, m = case
    if name == "seq_v3":          # with equal counts f_i the V3 loss is constant (sum_i s'_i = 1): no signal
        counts = np.stack([expert_load(i, scores.shape[-1]) for i in idx])
        assume(np.any(np.ptp(counts, axis=1) > 0))

    def f(s):
        loss, cache = LOSSES[name](s, idx, n_dev, m, alpha)
        return loss, lambda d: (balance_backward(d, cache),)
    assert check_grad(f, [scores]) < GRAD


def _uniform_routing(n_dev, per_dev, m, c):
    """Token t goes to devices t, t+1, .., t+m-1 (mod D) and, on each, to c consecutive experts."""
    t = n_dev * per_dev
    idx = np.array([[((tok + j) % n_dev) * per_dev + ((tok // n_dev + l) % per_dev)
                     for j in range(m) for l in range(c)] for tok in range(t)])
    return idx


@pytest.mark.parametrize("n_dev, per_dev, m, c", [(1, 4, 1, 2), (2, 2, 1, 2), (4, 2, 2, 1), (4, 3, 3, 2),
                                                  (8, 4, 3, 2)])
@pytest.mark.parametrize("alpha", [0.003, 0.05, 1e-4])
def test_each_loss_equals_alpha_under_uniform_routing(n_dev, per_dev, m, c, alpha):
    idx = _uniform_routing(n_dev, per_dev, m, c)
    e, (t, k) = n_dev * per_dev, idx.shape
    load = expert_load(idx, e)
    assert np.all(load == t * k // e)                                     # the construction is uniform
    sent = np.array([len(set(r)) for r in (idx // per_dev).tolist()])
    assert np.all(sent == m)
    uniform = np.full((t, e), 1.0 / e)
    for name, fn in LOSSES.items():
        loss, _ = fn(uniform, idx, n_dev, m, alpha)
        np.testing.assert_allclose(loss, alpha, rtol=1e-12, err_msg=name)
    # the V3 loss renormalises scores per token, so any constant sigmoid level gives alpha too
    loss, _ = seq_balance_forward(np.full((t, e), 0.3), idx, alpha)
    np.testing.assert_allclose(loss, alpha, rtol=1e-12)


def test_collapsed_routing_is_penalised(rng):
    """All tokens on expert 0 with confident scores: the expert loss is ~E times its uniform value."""
    e, t = 8, 16
    idx = np.zeros((t, 1), dtype=np.int64)
    scores = np.full((t, e), 0.01 / (e - 1))
    scores[:, 0] = 0.99
    loss, cache = expert_balance_forward(scores, idx, 1.0)
    np.testing.assert_allclose(loss, e * 0.99)
    ds = balance_backward(1.0, cache)
    assert np.all(ds[:, 0] > 0) and np.all(ds[:, 1:] == 0)              # pushes the popular score down


def test_sequence_wise_is_per_sequence_then_averaged(rng):
    scores = softmax_forward(rng.standard_normal((3, 5, 6)))[0]
    idx = np.argsort(rng.random((3, 5, 6)), -1)[..., :2]
    per_seq = [float(expert_balance_forward(scores[b], idx[b], 0.1)[0]) for b in range(3)]
    np.testing.assert_allclose(expert_balance_forward(scores, idx, 0.1)[0], np.mean(per_seq), rtol=1e-14)
    batch, _ = expert_balance_forward(scores.reshape(1, 15, 6), idx.reshape(1, 15, 2), 0.1)
    assert not np.isclose(batch, np.mean(per_seq))                       # batch-wise is a different loss


@given(rst.seeds(), st.sampled_from([0.0, 1e-3, 0.1]))
def test_bias_update_direction_and_sum(rng, gamma):
    e = 8
    bias = rng.standard_normal(e)
    load = rng.integers(0, 4, e).astype(float)
    load[0] = load.mean() if np.isclose(load.mean(), round(load.mean())) else load[0]
    new = bias_update(bias, load, gamma)
    delta = new - bias
    over, under = load > load.mean(), load < load.mean()
    np.testing.assert_allclose(delta.sum(), gamma * (under.sum() - over.sum()), atol=1e-12)
    assert np.all(delta[over] <= 0) and np.all(delta[under] >= 0)
    np.testing.assert_array_equal(delta[~over & ~under], 0.0)
    if gamma == 0:
        np.testing.assert_array_equal(new, bias)


def test_bias_update_moves_load_toward_uniform(rng):
    """Fixed tokens and a gate that favours two experts: bias updates alone restore balance."""
    cfg = ModelConfig.preset("tiny").replace(n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2)
    w = rng.standard_normal((8, cfg.hidden_size)) * 0.3
    x = rng.standard_normal((256, cfg.hidden_size)) + 0.5
    w[:2] += 0.5                                                          # experts 0, 1 win almost always
    gate = {"weight": w, "e_score_correction_bias": np.zeros(8)}
    vio = []
    for _ in range(300):
        r, _ = gate_forward(x, gate, cfg)
        load = expert_load(r.idx, 8)
        vio.append(max_violation(load))
        gate["e_score_correction_bias"] = bias_update(gate["e_score_correction_bias"], load, 0.005)
    assert vio[0] > 2.0                                                   # started collapsed
    assert np.mean(vio[-50:]) < 0.25 * vio[0]


def test_max_violation():
    assert max_violation([4, 4, 4, 4]) == 0.0
    assert max_violation([16, 0, 0, 0]) == 3.0
    np.testing.assert_allclose(max_violation([[2, 2], [3, 1]]), [0.0, 0.5])


def test_bad_inputs_raise_naming_the_argument(rng):
    scores = softmax_forward(rng.standard_normal((4, 6)))[0]
    idx = np.argsort(rng.random((4, 6)), -1)[:, :2]
    with pytest.raises(ValueError, match="idx"):
        expert_balance_forward(scores, idx[:3], 0.1)
    with pytest.raises(ValueError, match="idx"):
        expert_balance_forward(scores, idx + 6, 0.1)
    with pytest.raises(TypeError, match="idx"):
        expert_balance_forward(scores, idx.astype(float), 0.1)
    with pytest.raises(ValueError, match="scores"):
        expert_balance_forward(scores[None, None], idx, 0.1)
    with pytest.raises(ValueError, match="n_devices"):
        device_balance_forward(scores, idx, 4, 0.1)
    with pytest.raises(ValueError, match="max_devices"):
        comm_balance_forward(scores, idx, 3, 4, 0.1)
    with pytest.raises(ValueError, match="load"):
        bias_update(np.zeros(6), np.zeros(5), 0.1)
    with pytest.raises(ValueError, match="gamma"):
        bias_update(np.zeros(6), np.zeros(6), -0.1)
