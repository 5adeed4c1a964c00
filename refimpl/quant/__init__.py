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

__all__ = ["FP8_FORMATS", "FP8Format", "round_to_fp8", "fp8_values", "quantize_activation", "quantize_weight",
           "dequantize_activation", "dequantize_weight", "fp8_gemm", "fp8_linear_forward", "fp8_linear_backward"]
