"""The whole DeepSeek-V2/V3 model: decoder, MTP, generation, HF-layout checkpoints and training.

:mod:`.block` (one decoder layer), :mod:`.transformer` (forward, backward and the training loss),
:mod:`.mtp` (multi-token prediction, V3 §2.2), :mod:`.generate` (latent-cache decoding, sampling,
MTP speculative decoding), :mod:`.checkpoint` (hub layout), :mod:`.pretrained` (:class:`Model`,
:func:`load_pretrained`),
:mod:`.train` (pretraining: AdamW steps with bias updates on the shared loop of :mod:`refimpl.train`),
:mod:`.sft` (supervised fine-tuning on text).
"""

from .block import block_backward, block_forward, block_infer, init_block_params
from .checkpoint import config_from_hf, from_hub, hub_spec, save_pretrained, to_hub
from .generate import generate, sample_next, speculative_generate
from .mtp import init_mtp_params, mtp_backward, mtp_forward
from .pretrained import Model, load_pretrained
from .sft import sft_rows, sft_train
from .train import TrainConfig, TrainState, init_state, load_checkpoint, save_checkpoint, train, train_step
from .transformer import (
    init_caches,
    init_params,
    loss_backward,
    loss_forward,
    model_backward,
    model_forward,
    model_infer,
    shift_labels,
)

__all__ = [
    "block_forward", "block_backward", "block_infer", "init_block_params", "init_mtp_params", "mtp_forward",
    "mtp_backward", "init_params", "model_forward", "model_backward", "loss_forward", "loss_backward",
    "model_infer", "init_caches", "shift_labels", "Model", "generate", "sample_next", "speculative_generate",
    "load_pretrained", "save_pretrained", "config_from_hf", "hub_spec", "to_hub", "from_hub",
    "TrainConfig", "TrainState", "init_state", "train", "train_step", "save_checkpoint", "load_checkpoint",
    "sft_train", "sft_rows",
]
