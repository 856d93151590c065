"""Weight formats by name: what a user asks for (EngineConfig.weights, --weights) and what the layers store.

Imports nothing from tokenmill, so that the config and the layers can share it without depending on each
other.
"""

from __future__ import annotations

from enum import StrEnum


class WeightFormat(StrEnum):
    """How linear weights are stored and executed. A str, so 'q4' and WeightFormat.Q4 compare equal.

    AUTO:  as the checkpoint stores them: a GGUF's quantized weights run natively where the kernels can
           (CPU, fp32 activations), float weights stay float
    DENSE: every weight dequantized to the engine dtype
    Q4/Q8: every linear weight converted to 4/8-bit blocks of 32 (layers/quantization.py)
    W8A8:  every linear weight as int8 with one scale per output row; from a GEMM's worth of activation
           rows on (prefill, big batches) the activations are rounded to int8 per row too and the product
           runs as an int8 GEMM (oneDNN: VNNI / AMX), fewer rows run like Q8
    """

    AUTO = "auto"
    DENSE = "dense"
    Q4 = "q4"
    Q8 = "q8"
    W8A8 = "w8a8"

    @property
    def packed(self) -> bool:
        """A block-quantized storage format (PackedWeight.format is one of these)."""
        return self in PACKED_FORMATS

    @classmethod
    def parse(cls, value: str | WeightFormat) -> WeightFormat:
        """The format a string names; ValueError listing the choices otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"weights must be one of {', '.join(cls)}, got {value!r}") from None


PACKED_FORMATS = (WeightFormat.Q4, WeightFormat.Q8, WeightFormat.W8A8)

# How packed linears round activations for their integer dot products (layers/linear.py, QuantKernelPlan):
# "exact" keeps int16 per block of 32 (far below the weights' step), "int8" rounds as llama.cpp's Q8 blocks.
ACTIVATIONS = ("exact", "int8")
