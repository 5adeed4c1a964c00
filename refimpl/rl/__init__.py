"""Reinforcement learning from verifiable rewards: GRPO and its variants (DeepSeekMath §4.1, DeepSeek-R1 §2.2).

* :mod:`~refimpl.rl.advantages` — group-relative (outcome) and process-supervision advantages.
* :mod:`~refimpl.rl.logprobs` — per-token log-probs and entropies from logits, with temperature,
  and their backward into the logits.
* :mod:`~refimpl.rl.grpo` — the GRPO-family losses (``loss_type`` grpo / bnpo / dr_grpo / dapo /
  cispo / sapo, token- or sequence-level ratios, k1/k2/k3 KL) with hand-written gradients;
  :mod:`~refimpl.rl.loss_types` is the table of ``loss_type`` entries (one entry adds a variant).
* :mod:`~refimpl.rl.rewards` — rule-based rewards: accuracy, format, DAPO overlong shaping,
  language consistency, weighted sums.
* :mod:`~refimpl.rl.rollout` — sampling with the KV cache, the loss's batch layout, held-out
  evaluation, rejection sampling.
* :mod:`~refimpl.rl.stable` — DeepSeek-V3.2's stable-RL changes for MoE policies: the unbiased
  KL estimate, off-policy sequence masking, Keep Routing and Keep Sampling Mask (trainer options).
* :mod:`~refimpl.rl.trainer` — the GRPO trainer (π_old/π_ref, DAPO dynamic sampling, metrics,
  deterministic by seed, exact resume) on the shared loop of :mod:`refimpl.train`; supervised
  fine-tuning (:func:`refimpl.model.sft_train`) is re-exported here.

Options carry TRL ``GRPOConfig`` names and TRL's single-process semantics; each docstring says
where verl or Liger differ.
"""

from .advantages import group_advantages, process_advantages
from .grpo import LOSS_TYPES, entropy_bonus, grpo_loss, grpo_loss_from_logits, per_token_kl
from .logprobs import (
    entropy_backward,
    entropy_forward,
    logps_entropy_backward,
    logps_entropy_forward,
    selective_log_softmax_backward,
    selective_log_softmax_forward,
)
from .loss_types import LOSS_TABLE, LossType, get_loss_type, register_loss_type
from .rewards import (
    accuracy_reward,
    combine_rewards,
    exact_match,
    extract_answer,
    format_reward,
    language_consistency_reward,
    overlong_penalty,
    tag_count_reward,
)
from .stable import (
    SamplingRecord,
    off_policy_sequence_mask,
    sampling_record,
    unbiased_kl,
    v32_grpo_loss,
    v32_grpo_loss_from_logits,
)
from .trainer import (
    GRPOConfig,
    RolloutBatch,
    completion_logps,
    evaluate,
    grpo_objective,
    grpo_train,
    rejection_sample,
    sft_train,
)

__all__ = [
    "LOSS_TYPES", "group_advantages", "process_advantages", "grpo_loss", "per_token_kl", "grpo_loss_from_logits",
    "entropy_bonus", "LOSS_TABLE", "LossType", "get_loss_type", "register_loss_type",
    "selective_log_softmax_forward", "selective_log_softmax_backward", "entropy_forward", "entropy_backward",
    "logps_entropy_forward", "logps_entropy_backward", "accuracy_reward", "format_reward", "extract_answer",
    "overlong_penalty", "language_consistency_reward", "combine_rewards", "exact_match", "tag_count_reward",
    "GRPOConfig", "grpo_train", "evaluate", "sft_train", "rejection_sample", "RolloutBatch", "grpo_objective",
    "completion_logps", "unbiased_kl", "off_policy_sequence_mask", "v32_grpo_loss", "v32_grpo_loss_from_logits",
    "sampling_record", "SamplingRecord",
]
