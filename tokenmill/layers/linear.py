"""Linear layers. A seam for weight formats: the model only calls `layer(x)`, so a quantized layer
with the same call replaces the dense one without touching the model code."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from tokenmill.formats import WeightFormat
from tokenmill.layers.cpu_kernels import cpu_vendor
from tokenmill.layers.quantization import W8A8_OUTLIER, PackedWeight, dequantize, w8a8_matmul

# Below this many activation rows the kernel decodes each weight block in registers for every row (a step
# reads the quantized bytes once); from it on, weights are decoded a tile at a time for torch's GEMM.
GEMM_MIN_ROWS = 32
GEMM_TILE_BYTES = 16 << 20  # fp32 weight rows decoded per GEMM: every layer but a large vocabulary's at once


@dataclass(frozen=True)
class QuantKernelPlan:
    """Which kernel path a packed linear takes for how many activation rows (see csrc/quant_linear.cpp).

    One row always runs the integer GEMV. From `fp32_min_rows` rows (0: never) up to `gemm_min_rows - 1`,
    the fp32 rows path runs (a weight block decoded once into up to 16 rows on AVX-512, 8 on AVX2 where the
    input is at most 1,024 wide; exact fp32 math) instead of the integer dot products; from `gemm_min_rows` on,
    weight tiles are decoded for torch's GEMM. The integer dot products round activations to int16 per block
    of 32, or with `int8_activations` to int8 (EngineConfig.activations: lossy, as llama.cpp's Q8 blocks, and
    fewer instructions per weight).
    """

    gemm_min_rows: int = GEMM_MIN_ROWS
    fp32_min_rows: int = 0
    tile_bytes: int = GEMM_TILE_BYTES
    int8_activations: bool = False


@functools.cache
def plan_for(isa: str, vendor: str) -> QuantKernelPlan:
    """The plan measured fastest for a kernel level on a CPU vendor (benchmarks/isa_quant.py).

    Sapphire Rapids (avx512, GenuineIntel): the fp32 rows run 1.1-1.6x faster than int16 at 4 rows, 1.5-2.4x from 8
    and beat the tile GEMM below 24 rows. Zen 4 (avx512, AuthenticAMD): per q4 linear 1.1-2.2x faster at 2-16
    rows, q8 1.1-1.5x at 2-8 rows and 0.8-0.95x at 16-23; end to end 1.25x at 4 and 8 concurrent sequences,
    1.02x at 16 (1 thread, shared machine), so it takes them too, with the GEMM from 32 rows as before.
    AVX2 (Zen 3, 2 threads): since up to 8 rows share a weight decode, the integer rows beat the tile GEMM to
    about 48 rows on the 1.5B Qwen's shapes (gate_up 17920x1536 at 32 rows 24 vs 44 ms; a 32-sequence decode
    step 1.5x faster end to end), and are level with it on SmolLM2's small ones, so the GEMM starts at 48.
    The fp32 rows beat the int16 ones per linear from 4 rows on SmolLM2's shapes (1.05-1.5x; inputs up to
    1,024 wide, the kernel's own limit on AVX2) and lose at 2-3 rows; a whole decode step gains only from 8
    sequences (1.09-1.10x at 8, 16 and 32; level at 4-5), so they start at 8. Verification rows of k <= 6 drafts
    then stay on the int16 path that single-row decode takes too.
    """
    if isa == "avx512" and vendor == "GenuineIntel":
        return QuantKernelPlan(gemm_min_rows=24, fp32_min_rows=2)
    if isa == "avx512":
        return QuantKernelPlan(fp32_min_rows=2)
    if isa == "avx2":
        return QuantKernelPlan(gemm_min_rows=48, fp32_min_rows=8)
    return QuantKernelPlan()


def default_plan(kernels: ModuleType | None, activations: str = "exact") -> QuantKernelPlan:
    """The measured plan of the kernels' level, with the activations EngineConfig.activations names. int8
    needs the vector kernels (the portable build has only the fp32 reference): ValueError otherwise."""
    plan = QuantKernelPlan() if kernels is None else plan_for(kernels.cpu_isa(), cpu_vendor())
    if activations == "exact":
        return plan
    if activations != "int8":
        raise ValueError(f"activations must be exact or int8, got {activations!r}")
    if kernels is None or kernels.cpu_isa() == "portable":
        level = "no C++ kernels" if kernels is None else "the portable C++ kernels"
        raise ValueError(
            f"activations='int8' needs the AVX2 or AVX-512 C++ kernels; this engine runs {level}"
        )
    return dataclasses.replace(plan, int8_activations=True)


class DenseLinear:
    """y = x @ W^T (+ b), weights stored [out_features, in_features] in the engine dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight = weight
        self.bias = bias

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the weight as fp tensors: the embedding lookup of a tied embedding/lm_head."""
        return F.embedding(ids, self.weight)


class QuantLinear:
    """y = x @ W^T (+ b) with W kept block-quantized (see quantization.py) and x in fp32.

    Runs the C++ kernels when they are built; otherwise decodes the weight with torch on every call
    (correct, slow: the fallback on machines without a compiler).
    """

    def __init__(
        self,
        weight: PackedWeight,
        bias: torch.Tensor | None,
        kernels: ModuleType | None,
        plan: QuantKernelPlan | None = None,
    ):
        self.weight = weight
        self.bias = bias
        self.kernels = kernels
        self.plan = plan or default_plan(kernels)
        # w8a8: the rows' scales (every block of a row holds the same one), for the int8 GEMM
        self.row_scales = (
            weight.scales[:, 0].float().contiguous() if weight.format == WeightFormat.W8A8 else None
        )

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w, k, p = self.weight, self.kernels, self.plan
        w8a8_gemm = self.row_scales is not None and x.numel() >= p.gemm_min_rows * x.shape[-1]
        if w8a8_gemm:
            fn = k.w8a8_linear if k is not None else w8a8_matmul
            y = fn(x.reshape(-1, x.shape[-1]), w.codes, self.row_scales, W8A8_OUTLIER).view(*x.shape[:-1], -1)
        elif k is None:
            y = F.linear(x, dequantize(w))
        elif w.format == WeightFormat.Q4:
            y = k.q4_linear(
                x,
                w.codes,
                w.scales,
                w.mins,
                p.gemm_min_rows,
                p.tile_bytes,
                p.fp32_min_rows,
                p.int8_activations,
            )
        else:
            y = k.q8_linear(
                x, w.codes, w.scales, p.gemm_min_rows, p.tile_bytes, p.fp32_min_rows, p.int8_activations
            )
        return y if self.bias is None else y + self.bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        part = self.weight.rows(ids)
        if self.kernels is None:
            return dequantize(part)
        if part.format == WeightFormat.Q4:
            return self.kernels.q4_dequantize(part.codes, part.scales, part.mins)  # q8 and w8a8 alike below
        return self.kernels.q8_dequantize(part.codes, part.scales)


class ConcatLinear:
    """Several linears applied to the same input, outputs side by side: a fused projection (QKV, gate/up)
    whose parts could not be stored as one weight (different formats)."""

    def __init__(self, parts: list[DenseLinear | QuantLinear]):
        self.parts = parts

    @property
    def out_features(self) -> int:
        return sum(p.out_features for p in self.parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


Linear = DenseLinear | QuantLinear | ConcatLinear
