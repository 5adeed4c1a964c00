"""Low-precision emulation: block-wise FP8 as DeepSeek-V3 trains and serves with it."""

from .fp8 import (
    FP8_FORMATS,
    FP8Format,
    dequantize_activation,
    dequantize_weight,
    fp8_gemm,
    fp8_linear_backward,
    fp8_linear_forward,
    fp8_values,
    quantize_activation,
    quantize_weight,
    round_to_fp8,
)
from .fp8_train import (
    BF16Gemm,
    FP8Gemm,
    GemmProvider,
    bf16_autocast,
    fp8_autocast,
    quantize_blocks,
    quantize_rows,
    round_to_bf16,
    scaled_gemm,
    use_gemm,
)

__all__ = ["FP8_FORMATS", "FP8Format", "round_to_fp8", "fp8_values", "quantize_activation", "quantize_weight",
           "dequantize_activation", "dequantize_weight", "fp8_gemm", "fp8_linear_forward", "fp8_linear_backward",
           "fp8_autocast", "FP8Gemm", "quantize_rows", "quantize_blocks", "scaled_gemm", "GemmProvider", "use_gemm",
           "bf16_autocast", "BF16Gemm", "round_to_bf16"]
