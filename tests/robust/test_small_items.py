"""Issue 15 item 14: the smaller defects, each now an error naming the argument (or accepted)."""

import numpy as np
import pytest

from refimpl import ModelConfig
from refimpl.attention import mla_forward
from refimpl.core import linear_backward, linear_forward, rmsnorm_backward, rmsnorm_forward
from refimpl.core.rope import rope_backward, rope_forward
from refimpl.core.softmax import softmax_backward, softmax_forward
from refimpl.model import generate, init_params, model_forward, sample_next, speculative_generate
from refimpl.quant import quantize_activation, quantize_weight
from refimpl.rl import logps_entropy_backward, logps_entropy_forward, process_advantages

CFG = ModelConfig.preset("tiny").replace(num_nextn_predict_layers=1)
P = init_params(CFG, np.random.default_rng(0))


@pytest.mark.parametrize("call, name", [
    (lambda: rope_forward(np.ones((2, 4)), np.arange(2), 1.0), "inv_freq"),
    (lambda: sample_next(np.array([1.0, 2.0])), "logits"),
    (lambda: generate(P, CFG, [], 2), "input_ids"),
    (lambda: speculative_generate(P, CFG, np.array([[1, 2]]), -1), "max_new_tokens"),
    (lambda: model_forward(np.zeros((0, 2), np.int64), P, CFG), "input_ids"),
    (lambda: model_forward(np.zeros((1, 0), np.int64), P, CFG), "input_ids"),
    (lambda: mla_forward(np.zeros((0, 2, 32)), P["model"]["layers"][0]["self_attn"], CFG), "x"),
    (lambda: quantize_activation(np.ones((1, 4)), 0), "block"),
    (lambda: quantize_weight(np.ones((4, 4)), 0), "block"),
    (lambda: logps_entropy_forward(np.zeros((1, 2, 3)), np.zeros((1, 2), np.int64), chunk_rows=0), "chunk_rows"),
    (lambda: init_params(CFG, np.random.default_rng(0), np.int64), "dtype"),
    (lambda: generate(P, CFG, np.array([[1, 2]]), 2, pad_id=-1), "pad_id"),
    (lambda: generate(P, CFG, np.array([[1, 2]]), 2, stop_tokens=[64]), "stop_tokens"),
    (lambda: process_advantages(np.ones((2, 2)), np.ones((2, 2), bool), 2, std_eps=np.nan), "std_eps"),
])
def test_named_errors(call, name):
    with pytest.raises((ValueError, TypeError), match=f"^{name}"):
        call()


def test_block_as_numpy_integer_is_accepted():
    q1, s1 = quantize_activation(np.ones((1, 4)), np.int64(4))
    q2, s2 = quantize_activation(np.ones((1, 4)), 4)
    assert np.array_equal(q1, q2) and np.array_equal(s1, s2)


def _caches():
    x = np.random.default_rng(0).standard_normal((2, 4))
    _, c_lin = linear_forward(x, np.ones((3, 4)))
    _, c_rms = rmsnorm_forward(x, np.ones(4))
    _, c_sm = softmax_forward(x)
    _, c_rope = rope_forward(x, np.arange(2), np.ones(2))
    _, _, c_lp = logps_entropy_forward(x[None], np.array([[0, 1]]))
    return [(linear_backward, c_lin, (2, 3)), (rmsnorm_backward, c_rms, (2, 4)), (softmax_backward, c_sm, (2, 4)),
            (rope_backward, c_rope, (2, 4)),
            (lambda d, c: logps_entropy_backward(d, None, c), c_lp, (1, 2))]


@pytest.mark.parametrize("backward, cache, shape", _caches())
def test_backwards_check_their_upstream_gradient(backward, cache, shape):
    good = np.ones(shape) if shape else 1.0
    backward(good, cache)
    for bad in (np.ones(shape + (2,)), np.full(shape, np.nan) if shape else np.nan):
        with pytest.raises((ValueError, TypeError), match="^d"):
            backward(bad, cache)
