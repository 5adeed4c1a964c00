"""Primitives, each a forward/backward pair with a named cache (see DESIGN: API conventions), and the
cross-entropy loss, one call returning ``(loss, dlogits)`` like every loss (see :mod:`refimpl`)."""

from .activations import (
    sigmoid,
    silu_backward,
    silu_forward,
    swiglu_backward,
    swiglu_forward,
    swiglu_mlp_backward,
    swiglu_mlp_forward,
)
from .cross_entropy import IGNORE_INDEX, cross_entropy
from .linear import embedding_backward, embedding_forward, linear_backward, linear_forward
from .rmsnorm import rmsnorm_backward, rmsnorm_forward
from .rope import (
    deinterleave_perm,
    rope_attention_factor,
    rope_backward,
    rope_cos_sin,
    rope_forward,
    rope_inv_freq,
    softmax_scale,
    yarn_correction_range,
    yarn_mscale,
)
from .softmax import (
    log_softmax_backward,
    log_softmax_forward,
    logsumexp_backward,
    logsumexp_forward,
    softmax_backward,
    softmax_forward,
)

__all__ = [
    "sigmoid", "silu_forward", "silu_backward", "swiglu_forward", "swiglu_backward",
    "swiglu_mlp_forward", "swiglu_mlp_backward", "cross_entropy", "IGNORE_INDEX",
    "linear_forward", "linear_backward", "embedding_forward", "embedding_backward",
    "rmsnorm_forward", "rmsnorm_backward", "rope_inv_freq", "rope_forward", "rope_backward",
    "rope_cos_sin", "rope_attention_factor", "softmax_scale", "deinterleave_perm",
    "yarn_correction_range", "yarn_mscale", "softmax_forward", "softmax_backward",
    "log_softmax_forward", "log_softmax_backward", "logsumexp_forward", "logsumexp_backward",
]
