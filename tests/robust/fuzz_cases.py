"""Valid calls of refimpl's public functions, for the fuzz suite (tests/robust/test_fuzz.py).

``CASES["subpackage.name"]()`` returns ``(function, args, kwargs)``: a small valid call, built
fresh each time (backward functions get a fresh cache from their forward). The fuzz test mutates
one argument at a time with bad or extreme values.
"""

import numpy as np

from refimpl import ModelConfig, attention, core, distill, model, moe, quant, rl, tasks

CFG = ModelConfig.preset("tiny").replace(num_nextn_predict_layers=1)
_P = model.init_params(CFG, np.random.default_rng(0))


def _r(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def _ids(*shape, high=5):
    return np.random.default_rng(1).integers(0, high, size=shape)


def _fwd_bwd(fwd, fargs, bwd, dy_shape, fkw=None):
    def make():
        out = fwd(*fargs(), **(fkw or {}))
        return bwd, (_r(*dy_shape(out)), out[1]), {}
    return make


DENSE = None


def _dense_p():
    global DENSE
    from refimpl.recipes.distill import dense_student_config
    DENSE = DENSE or dense_student_config()
    return model.init_params(DENSE, np.random.default_rng(0))


def _p():
    return model.init_params(CFG, np.random.default_rng(0))


def _lin():
    return core.linear_forward(_r(2, 3), _r(4, 3))


CASES = {
    # cases added with DeepSeek-V3.2 and the fused cross-entropy
    "core.cross_entropy": lambda: (core.cross_entropy, (_r(3, 5), _ids(3)), {}),
    "rl.unbiased_kl": lambda: (rl.unbiased_kl, (-np.abs(_r(2, 3)), -np.abs(_r(2, 3, seed=1)),
                                                -np.abs(_r(2, 3, seed=2))), {}),
    "rl.off_policy_sequence_mask": lambda: (rl.off_policy_sequence_mask,
                                            (_r(2), -np.abs(_r(2, 3)), -np.abs(_r(2, 3, seed=1)),
                                             np.ones((2, 3)), 0.1), {}),
    "attention.select_topk": lambda: (attention.select_topk, (_r(1, 4, 4), 2), {}),
    # core
    "core.sigmoid": lambda: (core.sigmoid, (_r(3, 4),), {}),
    "core.silu_forward": lambda: (core.silu_forward, (_r(3, 4),), {}),
    "core.silu_backward": _fwd_bwd(core.silu_forward, lambda: (_r(3, 4),), core.silu_backward, lambda o: (3, 4)),
    "core.swiglu_forward": lambda: (core.swiglu_forward, (_r(3, 4), _r(3, 4, seed=1)), {}),
    "core.swiglu_backward": _fwd_bwd(core.swiglu_forward, lambda: (_r(3, 4), _r(3, 4, seed=1)), core.swiglu_backward,
                                     lambda o: (3, 4)),
    "core.linear_forward": lambda: (core.linear_forward, (_r(2, 3), _r(4, 3)), {}),
    "core.linear_backward": lambda: (core.linear_backward, (_r(2, 4), _lin()[1]), {}),
    "core.embedding_forward": lambda: (core.embedding_forward, (_ids(2, 3), _r(5, 4)), {}),
    "core.embedding_backward": _fwd_bwd(core.embedding_forward, lambda: (_ids(2, 3), _r(5, 4)), core.embedding_backward,
                                        lambda o: (2, 3, 4)),
    "core.rmsnorm_forward": lambda: (core.rmsnorm_forward, (_r(2, 4), np.ones(4)), {"eps": 1e-6}),
    "core.rmsnorm_backward": _fwd_bwd(core.rmsnorm_forward, lambda: (_r(2, 4), np.ones(4)), core.rmsnorm_backward,
                                      lambda o: (2, 4)),
    "core.softmax_forward": lambda: (core.softmax_forward, (_r(3, 5),), {}),
    "core.softmax_backward": _fwd_bwd(core.softmax_forward, lambda: (_r(3, 5),), core.softmax_backward,
                                      lambda o: (3, 5)),
    "core.log_softmax_forward": lambda: (core.log_softmax_forward, (_r(3, 5),), {}),
    "core.log_softmax_backward": _fwd_bwd(core.log_softmax_forward, lambda: (_r(3, 5),), core.log_softmax_backward,
                                          lambda o: (3, 5)),
    "core.logsumexp_forward": lambda: (core.logsumexp_forward, (_r(3, 5),), {}),
    "core.logsumexp_backward": _fwd_bwd(core.logsumexp_forward, lambda: (_r(3, 5),), core.logsumexp_backward,
                                        lambda o: (3,)),
    "core.rope_inv_freq": lambda: (core.rope_inv_freq, (8,), {"base": 10000.0}),
    "core.rope_forward": lambda: (core.rope_forward, (_r(3, 4), np.arange(3), core.rope_inv_freq(4)), {}),
    "core.rope_backward": _fwd_bwd(core.rope_forward, lambda: (_r(3, 4), np.arange(3), core.rope_inv_freq(4)),
                                   core.rope_backward, lambda o: (3, 4)),
    "core.softmax_scale": lambda: (core.softmax_scale, (192,), {}),
    # attention
    "attention.mla_forward": lambda: (attention.mla_forward, (_r(1, 3, 32), _p()["model"]["layers"][0]["self_attn"],
                                                              CFG), {}),
    "attention.mla_backward": _fwd_bwd(attention.mla_forward,
                                       lambda: (_r(1, 3, 32), _p()["model"]["layers"][0]["self_attn"], CFG),
                                       attention.mla_backward, lambda o: (1, 3, 32)),
    "attention.causal_mask": lambda: (attention.causal_mask, (3, 4), {"q_offset": 1}),
    "attention.sdpa_forward": lambda: (attention.sdpa_forward, (_r(1, 3, 2, 4), _r(1, 3, 2, 4, seed=1),
                                                                _r(1, 3, 2, 4, seed=2), 0.5), {}),
    # moe
    "moe.expert_balance_forward": lambda: (moe.expert_balance_forward, (np.full((1, 3, 4), 0.25), _ids(1, 3, 2, high=4),
                                                                        0.1), {}),
    "moe.seq_balance_forward": lambda: (moe.seq_balance_forward, (np.full((1, 3, 4), 0.25), _ids(1, 3, 2, high=4),
                                                                  0.1), {}),
    "moe.balance_backward": lambda: (moe.balance_backward, (1.0, moe.seq_balance_forward(
        np.full((1, 3, 4), 0.25), _ids(1, 3, 2, high=4), 0.1)[1]), {}),
    "moe.bias_update": lambda: (moe.bias_update, (np.zeros(4), np.array([1.0, 2.0, 0.0, 3.0]), 1e-3), {}),
    "moe.expert_load": lambda: (moe.expert_load, (_ids(3, 2, high=4), 4), {}),
    "moe.moe_forward": lambda: (moe.moe_forward, (_r(1, 3, 32), _p()["model"]["layers"][1]["mlp"], CFG), {}),
    "moe.moe_backward": _fwd_bwd(moe.moe_forward, lambda: (_r(1, 3, 32), _p()["model"]["layers"][1]["mlp"], CFG),
                                 moe.moe_backward, lambda o: (1, 3, 32)),
    # model
    "model.init_params": lambda: (model.init_params, (CFG, np.random.default_rng(0)), {}),
    "model.model_forward": lambda: (model.model_forward, (_ids(1, 3), _p(), CFG), {}),
    "model.loss_forward": lambda: (model.loss_forward, (_ids(1, 4), _p(), CFG), {}),
    "model.loss_backward": lambda: (model.loss_backward, (1.0, model.loss_forward(_ids(1, 4), _P, CFG)[1]), {}),
    "model.generate": lambda: (model.generate, (_p(), CFG, _ids(1, 2), 2), {}),
    "model.sample_next": lambda: (model.sample_next, (_r(2, 5),), {"temperature": 0.7, "top_p": 0.9,
                                                                   "rng": np.random.default_rng(0)}),
    "model.speculative_generate": lambda: (model.speculative_generate, (_p(), CFG, _ids(1, 2), 3), {}),
    "model.shift_labels": lambda: (model.shift_labels, (_ids(2, 3),), {}),
    # rl
    "rl.group_advantages": lambda: (rl.group_advantages, (np.array([1.0, 0.0, 0.5, 0.5]), 2), {}),
    "rl.process_advantages": lambda: (rl.process_advantages, (_r(2, 3), np.ones((2, 3), bool), 2), {}),
    "rl.grpo_loss": lambda: (rl.grpo_loss, (-np.abs(_r(2, 3)), -np.abs(_r(2, 3, seed=1)), -np.abs(_r(2, 3, seed=2)),
                                            np.array([1.0, -1.0]), np.ones((2, 3), bool)), {"beta": 0.04}),
    "rl.per_token_kl": lambda: (rl.per_token_kl, (-np.abs(_r(2, 3)), -np.abs(_r(2, 3, seed=1))), {}),
    "rl.grpo_loss_from_logits": lambda: (rl.grpo_loss_from_logits, (_r(2, 3, 5), _ids(2, 3), None, None,
                                                                    np.array([1.0, -1.0]), np.ones((2, 3), bool)), {}),
    "rl.entropy_bonus": lambda: (rl.entropy_bonus, (np.abs(_r(2, 3)), np.ones((2, 3), bool)), {"entropy_coef": 0.01}),
    "rl.logps_entropy_forward": lambda: (rl.logps_entropy_forward, (_r(2, 3, 5), _ids(2, 3)), {}),
    "rl.logps_entropy_backward": lambda: (rl.logps_entropy_backward, (
        _r(2, 3), _r(2, 3, seed=1), rl.logps_entropy_forward(_r(2, 3, 5), _ids(2, 3))[2]), {}),
    "rl.accuracy_reward": lambda: (rl.accuracy_reward, (["<answer>1</answer>", "x"], ["1", "2"]), {}),
    "rl.format_reward": lambda: (rl.format_reward, (["<think>a</think><answer>1</answer>", "x"],), {}),
    "rl.extract_answer": lambda: (rl.extract_answer, ("<answer>1</answer>",), {}),
    "rl.overlong_penalty": lambda: (rl.overlong_penalty, (np.array([3, 9]),), {"max_completion_len": 10,
                                                                             "soft_punish_cache": 4}),
    "rl.language_consistency_reward": lambda: (rl.language_consistency_reward, (["<think>ab c</think>"],),
                                               {"alphabet": "abc"}),
    "rl.combine_rewards": lambda: (rl.combine_rewards, (np.array([[1.0, 0.5], [0.0, 1.0]]),), {"weights": [1.0, 0.5]}),
    "rl.tag_count_reward": lambda: (rl.tag_count_reward, (["<think>a</think>"],), {}),
    # distill
    "distill.divergence_loss": lambda: (distill.divergence_loss, (_r(2, 3, 5), _r(2, 3, 5, seed=1)),
                                        {"divergence": "skew_kl"}),
    "distill.fused_linear_divergence": lambda: (distill.fused_linear_divergence, (_r(4, 3), _r(5, 3)),
                                                {"teacher_logits": _r(4, 5, seed=1), "divergence": "total_variation",
                                                 "chunk_size": 3}),
    "distill.forward_kl_loss": lambda: (distill.forward_kl_loss, (_r(2, 3, 5), _r(2, 3, 5, seed=1)), {}),
    "distill.reverse_kl_loss": lambda: (distill.reverse_kl_loss, (_r(2, 3, 5), _r(2, 3, 5, seed=1)), {}),
    "distill.generalized_jsd_loss": lambda: (distill.generalized_jsd_loss, (_r(2, 3, 5), _r(2, 3, 5, seed=1)),
                                             {"beta": 0.3}),
    "distill.total_variation_loss": lambda: (distill.total_variation_loss, (_r(2, 3, 5), _r(2, 3, 5, seed=1)), {}),
    "distill.hinton_kd_loss": lambda: (distill.hinton_kd_loss, (_r(2, 3, 5), _r(2, 3, 5, seed=1), _ids(2, 3)), {}),
    "distill.sequence_kd_loss": lambda: (distill.sequence_kd_loss, (_r(2, 3, 5), _ids(2, 3)), {}),
    "distill.teacher_topk": lambda: (distill.teacher_topk, (_r(2, 3, 5), 2), {}),
    "distill.fused_linear_cross_entropy": lambda: (distill.fused_linear_cross_entropy, (_r(4, 3), _r(5, 3), _ids(4)),
                                                   {"chunk_size": 2}),
    "distill.fused_linear_token_logps": lambda: (distill.fused_linear_token_logps, (_r(4, 3), _r(5, 3), _ids(4)),
                                                 {"chunk_size": 3}),
    # quant
    "quant.round_to_fp8": lambda: (quant.round_to_fp8, (_r(3, 4) * 100,), {}),
    "quant.quantize_activation": lambda: (quant.quantize_activation, (_r(2, 8),), {"block": 4}),
    "quant.quantize_weight": lambda: (quant.quantize_weight, (_r(6, 8),), {"block": 4}),
    "quant.fp8_linear_forward": lambda: (quant.fp8_linear_forward, (_r(2, 8), _r(3, 8)), {"block": 4}),
    "quant.round_to_bf16": lambda: (quant.round_to_bf16, (_r(3, 4),), {}),
    # more attention / moe / model / rl / distill / quant
    "attention.mha_forward": lambda: (attention.mha_forward, (
        _r(1, 3, 48), _dense_p()["model"]["layers"][0]["self_attn"], DENSE), {}),
    "attention.init_latent_cache": lambda: (attention.init_latent_cache, (CFG, 2, 8), {}),
    "attention.kv_cache_bytes": lambda: (attention.kv_cache_bytes, (CFG, 16), {"batch_size": 2}),
    "moe.gate_forward": lambda: (moe.gate_forward, (_r(3, 32), _p()["model"]["layers"][1]["mlp"]["gate"], CFG), {}),
    "moe.select_experts": lambda: (moe.select_experts, (_r(3, 8), 2), {"n_group": 4, "topk_group": 2}),
    "moe.make_plan": lambda: (moe.make_plan, (_ids(3, 2, high=4), 4), {}),
    "moe.max_violation": lambda: (moe.max_violation, (np.array([1.0, 3.0, 2.0]),), {}),
    "moe.device_balance_forward": lambda: (moe.device_balance_forward, (np.full((1, 3, 4), 0.25),
                                                                        _ids(1, 3, 2, high=4), 2, 0.1), {}),
    "model.model_infer": lambda: (model.model_infer, (_ids(1, 2), _p(), CFG, model.init_caches(CFG, 1, 8)), {}),
    "model.init_caches": lambda: (model.init_caches, (CFG, 2, 8), {}),
    "rl.entropy_forward": lambda: (rl.entropy_forward, (_r(2, 3, 5),), {"temperature": 0.9}),
    "rl.selective_log_softmax_forward": lambda: (rl.selective_log_softmax_forward, (_r(2, 3, 5), _ids(2, 3)), {}),
    "distill.skew_kl_loss": lambda: (distill.skew_kl_loss, (_r(2, 3, 5), _r(2, 3, 5, seed=1)), {"alpha": 0.2}),
    "distill.skew_reverse_kl_loss": lambda: (distill.skew_reverse_kl_loss, (_r(2, 3, 5), _r(2, 3, 5, seed=1)), {}),
    "distill.topk_kl_loss": lambda: (distill.topk_kl_loss, (_r(2, 3, 5), *distill.teacher_topk(_r(2, 3, 5, seed=1), 2)),
                                     {}),
    "quant.dequantize_activation": lambda: (quant.dequantize_activation, quant.quantize_activation(_r(2, 8), 4),
                                            {"block": 4}),
    "quant.fp8_values": lambda: (quant.fp8_values, ("e4m3",), {}),
    # tasks
    "tasks.format_completion": lambda: (tasks.format_completion, ("a", "1"), {}),
}
