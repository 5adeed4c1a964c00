"""refimpl: a NumPy reference implementation and executable textbook of DeepSeek-V2/V3/R1.

Every forward pass has a hand-written backward pass, float64 is the reference precision, hot loops
have Numba twins (:mod:`refimpl.backend`), and :mod:`refimpl.testing` gives the gradient checker
and hypothesis strategies to use refimpl as a numerical oracle in other projects' tests.

Notation (shared by the code's shape comments and the book)::

    B   batch                      T   sequence length
    D   hidden size                H   attention heads
    Dh  head dim                   Dn / Dr   nope / rope head dims (qk_nope_head_dim, qk_rope_head_dim)
    Dv  value head dim             Dc  KV latent (kv_lora_rank)
    Dq  query latent (q_lora_rank) E   routed experts   Es  shared experts
    K   experts per token          G   expert groups, or GRPO group size (each use names which)
    V   vocabulary                 N   flattened rows (B*T) where a function flattens them
    I   FFN / expert intermediate size
    Hk  key/value heads (GQA)      Gq  query heads per key/value head, H / Hk
    Dk  query/key width in the attention core      S   key positions attended over
    Tmax  KV cache capacity        HI / DI  lightning indexer heads / head dim
    Din / Dout  linear input / output width        Np, Dinp, Doutp  padded to the FP8 tile
    A   (token, expert) assignments after dispatch R   MPI ranks
    Nm / Nr / Ns  expert-parallel rows between hops / received / sent
    Tc  completion tokens          Tk  tokens at MTP depth k (T - k)
    L   padded length of a batch   C   rows per chunk      P   GRPO prompts (P * G completions)
    F   reward functions           W   width of an element-wise distillation loss (V or top-k)
    (book/notation.md has the table; a lowercase name in a shape comment is a local variable)

Two conventions for gradients (one rule for the whole package):

* A **loss** -- a function of logits or log-probs to a scalar: :func:`refimpl.core.cross_entropy`,
  every distillation divergence (:func:`refimpl.distill.divergence_loss`), sequence KD, the GRPO,
  GSPO, CISPO and SAPO losses, the fused LM heads -- is ONE call that returns ``(loss, grad)``, or
  ``(loss, grad, info)`` where it has diagnostics: ``grad`` is the gradient with respect to its first
  array argument (the fused heads also give the head weight's), scaled by the optional upstream
  ``dloss=1.0``. This is what TRL and Liger users expect, and the gradient of a loss is cheapest
  computed with the loss.
* **Layers, blocks and the model** are ``*_forward`` / ``*_backward`` pairs: the forward returns
  its output and a NamedTuple cache, and every backward takes the upstream gradient first,
  ``*_backward(d..., cache, ...)`` (so :func:`refimpl.model.loss_backward` is
  ``loss_backward(dloss, cache, params=None)``).

Variants are table entries: a GRPO ``loss_type`` (:data:`refimpl.rl.LOSS_TABLE`), an MoE router
(:data:`refimpl.moe.GATES`, chosen by ``ModelConfig.gate_type``) and a distillation divergence
(:data:`refimpl.distill.DIVERGENCES`) are each one entry plus its function(s).

Importing refimpl is cheap: it loads NumPy and the pure-Python modules only; numba is imported and
kernels compiled on first use.
"""

import importlib

from . import core
from .backend import resolve_backend
from .config import PRESETS, ModelConfig

__version__ = "0.1.0"

# Submodules load on first attribute access (``refimpl.moe``), keeping ``import refimpl`` cheap.
_SUBMODULES = ("attention", "moe", "rl", "tasks", "distill", "quant", "optim", "testing", "tree", "kernels", "display",
               "model", "accounting", "train")


def load_pretrained(path, dtype=None):
    """Load a hub-layout checkpoint directory (``config.json`` + ``*.safetensors``, one file or sharded):
    DeepSeek-V2/V3, or an R1-Distill student (``model_type`` ``qwen2`` or ``llama``), in float64
    (default) or ``dtype=np.float32``.

    Returns a :class:`refimpl.model.pretrained.Model`: ``m(input_ids)`` gives float64 logits
    (B, T, V), ``m.generate(input_ids, max_new_tokens=n)`` greedy continuations (B, T + n). See
    :func:`refimpl.model.pretrained.load_pretrained`; the model package is imported on first call.
    """
    import numpy as np

    from .model.pretrained import load_pretrained as _load
    return _load(path, np.float64 if dtype is None else dtype)


def load_tokenizer(path):
    """The hub tokenizer of a checkpoint directory (``tokenizer.json`` + ``tokenizer_config.json``): see
    :func:`refimpl.tokenizer.load_tokenizer` (needs the ``tokenizers`` and ``jinja2`` packages)."""
    from .tokenizer import load_tokenizer as _load
    return _load(path)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'refimpl' has no attribute {name!r}")


__all__ = ["core", "ModelConfig", "PRESETS", "load_pretrained", "load_tokenizer", "resolve_backend", "__version__",
           *_SUBMODULES]

#: Public functions the fuzz suite (tests/robust/test_fuzz.py) drives with bad and extreme input:
#: each returns a finite result or raises ValueError/TypeError naming the argument, never modifies
#: its input and never hangs. A public function of a subpackage's ``__all__`` must be here or in
#: FUZZ_PENDING (a test enforces it), so a new one cannot skip the question.
FUZZED = (
    'core.cross_entropy', 'distill.divergence_loss', 'distill.fused_linear_divergence', 'rl.unbiased_kl',
    'rl.off_policy_sequence_mask', 'attention.select_topk',
    'attention.causal_mask', 'attention.init_latent_cache', 'attention.kv_cache_bytes', 'attention.mha_forward',
    'attention.mla_backward', 'attention.mla_forward', 'attention.sdpa_forward',
    'core.embedding_backward', 'core.embedding_forward', 'core.linear_backward',
    'core.linear_forward', 'core.log_softmax_backward', 'core.log_softmax_forward', 'core.logsumexp_backward',
    'core.logsumexp_forward', 'core.rmsnorm_backward', 'core.rmsnorm_forward', 'core.rope_backward',
    'core.rope_forward', 'core.rope_inv_freq', 'core.sigmoid', 'core.silu_backward', 'core.silu_forward',
    'core.softmax_backward', 'core.softmax_forward', 'core.softmax_scale', 'core.swiglu_backward',
    'core.swiglu_forward', 'distill.forward_kl_loss', 'distill.fused_linear_cross_entropy',
    'distill.fused_linear_token_logps', 'distill.generalized_jsd_loss', 'distill.hinton_kd_loss',
    'distill.reverse_kl_loss', 'distill.sequence_kd_loss', 'distill.skew_kl_loss', 'distill.skew_reverse_kl_loss',
    'distill.teacher_topk', 'distill.topk_kl_loss', 'distill.total_variation_loss', 'model.generate',
    'model.init_caches', 'model.init_params', 'model.loss_backward', 'model.loss_forward', 'model.model_forward',
    'model.model_infer', 'model.sample_next', 'model.shift_labels', 'model.speculative_generate',
    'moe.balance_backward', 'moe.bias_update', 'moe.device_balance_forward', 'moe.expert_balance_forward',
    'moe.expert_load', 'moe.gate_forward', 'moe.make_plan', 'moe.max_violation', 'moe.moe_backward',
    'moe.moe_forward', 'moe.select_experts', 'moe.seq_balance_forward', 'quant.dequantize_activation',
    'quant.fp8_linear_forward', 'quant.fp8_values', 'quant.quantize_activation', 'quant.quantize_weight',
    'quant.round_to_bf16', 'quant.round_to_fp8', 'rl.accuracy_reward', 'rl.combine_rewards', 'rl.entropy_bonus',
    'rl.entropy_forward', 'rl.extract_answer', 'rl.format_reward', 'rl.group_advantages', 'rl.grpo_loss',
    'rl.grpo_loss_from_logits', 'rl.language_consistency_reward', 'rl.logps_entropy_backward',
    'rl.logps_entropy_forward', 'rl.overlong_penalty', 'rl.per_token_kl', 'rl.process_advantages',
    'rl.selective_log_softmax_forward', 'rl.tag_count_reward', 'tasks.format_completion',
)

#: Public functions without a fuzz case yet (training loops, accounting, parameter surgery, tasks ...).
FUZZ_PENDING = (
    'attention.dsa_backward', 'attention.dsa_forward', 'attention.dsa_indexer_loss', 'attention.dsa_infer',
    'attention.index_dims', 'attention.indexer_param_shapes', 'attention.init_dsa_cache',
    'attention.init_dsa_params', 'attention.uses_dsa', 'rl.sampling_record', 'rl.v32_grpo_loss',
    'rl.v32_grpo_loss_from_logits', 'rl.get_loss_type', 'rl.register_loss_type', 'distill.get_divergence',
    'distill.register_divergence', 'moe.get_gate', 'moe.register_gate', 'moe.check_gate_params',
    'attention.absorbed_weights', 'attention.default_head_dim', 'attention.default_scheme',
    'attention.init_kv_cache', 'attention.init_mha_params', 'attention.init_mla_params',
    'attention.kv_cache_elements_per_token', 'attention.mha_backward', 'attention.mha_infer',
    'attention.mha_param_shapes', 'attention.mla_infer', 'attention.mla_param_shapes', 'attention.sdpa_backward',
    'attention.uses_mla', 'core.deinterleave_perm', 'core.rope_attention_factor', 'core.rope_cos_sin',
    'core.swiglu_mlp_backward', 'core.swiglu_mlp_forward', 'core.yarn_correction_range', 'core.yarn_mscale',
    'distill.fused_linear_grpo_loss', 'distill.fused_linear_jsd', 'distill.fused_linear_logprob_loss',
    'model.block_backward', 'model.block_forward', 'model.block_infer', 'model.config_from_hf', 'model.from_hub',
    'model.hub_spec', 'model.init_block_params', 'model.init_mtp_params', 'model.init_state',
    'model.load_checkpoint', 'model.load_pretrained', 'model.model_backward', 'model.mtp_backward',
    'model.mtp_forward', 'model.save_checkpoint', 'model.save_pretrained', 'model.to_hub', 'model.train',
    'model.train_step', 'moe.all_to_all_stats', 'moe.capacity_keep', 'moe.combine', 'moe.comm_balance_forward',
    'moe.count_parameters', 'moe.dispatch', 'moe.expert_placement', 'moe.experts_backward', 'moe.experts_forward',
    'moe.experts_from_fused', 'moe.experts_from_list', 'moe.experts_to_list', 'moe.gate_backward',
    'moe.init_moe_params', 'moe.mixtral_gate_backward', 'moe.mixtral_gate_forward', 'moe.node_limited_comparison',
    'moe.permute_experts', 'moe.split_shared_experts', 'quant.bf16_autocast', 'quant.dequantize_weight',
    'quant.fp8_autocast', 'quant.fp8_gemm', 'quant.fp8_linear_backward', 'quant.quantize_blocks',
    'quant.quantize_rows', 'quant.scaled_gemm', 'quant.use_gemm', 'rl.completion_logps', 'rl.entropy_backward',
    'rl.evaluate', 'rl.exact_match', 'rl.grpo_objective', 'rl.grpo_train', 'rl.rejection_sample',
    'rl.selective_log_softmax_backward', 'rl.sft_train', 'tasks.eval_seed', 'tasks.eval_set', 'tasks.get_task',
    'tasks.make_dataset', 'tasks.pad_sequences', 'tasks.reference_completion', 'testing.check_grad',
    'testing.tol', 'testing.tree_flatten',
    'model.sft_train', 'model.sft_rows', 'train.init_state', 'train.append_row', 'train.run_loop',
    'train.check_loop_options', 'train.lm_loss_grads', 'train.save_checkpoint', 'train.load_checkpoint',
    'train.resume_state', 'train.unflatten',
)
