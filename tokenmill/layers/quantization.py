"""Block-quantized weight formats that the CPU kernels execute natively, and conversions into them.

Every format cuts a weight row into blocks of 32 input features with an fp16 scale per block:
  q8: int8 codes [N, K],         w = scale * q
  q4: uint8 codes [N, K/2],      w = scale * q + offset, q in 0..15; byte j of a block holds element j
      (low nibble) and element j + 16 (high nibble), which is GGUF's Q4_0/Q4_1 layout.
  w8a8: q8 whose blocks of a row all share the row's scale: the kernels run it as q8, and an int8 GEMM
      (per-row activation scales) can factor both scales out of the sum over the whole row.
A float weight can be quantized into either format (a lossy step, measured by `tokenmill eval`); a
checkpoint's own quantized blocks are repacked into them by its loader (models/gguf.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.formats import PACKED_FORMATS, WeightFormat

BLOCK = 32


@dataclass
class PackedWeight:
    """A [out_features, in_features] weight in one of PACKED_FORMATS."""

    format: WeightFormat  # a str naming one is taken too
    codes: torch.Tensor
    scales: torch.Tensor  # fp16 [N, K / 32]
    mins: torch.Tensor | None = None  # fp16 [N, K / 32], q4 only

    def __post_init__(self) -> None:
        self.format = WeightFormat(self.format)
        if not self.format.packed:
            raise ValueError(
                f"a packed weight's format is one of {', '.join(PACKED_FORMATS)}, not {self.format!r}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.scales.shape
        return n, k * BLOCK

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scales] + ([self.mins] if self.mins is not None else [])

    def rows(self, index: torch.Tensor) -> PackedWeight:
        """A gather of rows: used for embedding lookups and Q/K row permutations."""
        mins = self.mins[index] if self.mins is not None else None
        return PackedWeight(self.format, self.codes[index], self.scales[index], mins)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def cat_rows(parts: list[PackedWeight]) -> PackedWeight:
    fmt = parts[0].format
    if any(p.format != fmt for p in parts):
        raise ValueError("cannot concatenate weights of different formats")
    mins = torch.cat([p.mins for p in parts]) if fmt == WeightFormat.Q4 else None  # type: ignore[misc]
    return PackedWeight(fmt, torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]), mins)


# ---- from fp32 --------------------------------------------------------------------------------------------
def quantize(weight: torch.Tensor, fmt: WeightFormat | str) -> PackedWeight:
    """Round-to-nearest block quantization of a float weight: symmetric int8, or 4-bit over [min, max]."""
    n, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"cannot quantize a weight with {k} input features: not a multiple of {BLOCK}")
    w = weight.detach().float().reshape(n, k // BLOCK, BLOCK)
    if fmt == WeightFormat.Q8:
        scale = (w.abs().amax(-1) / 127).half()
        s = scale.float().unsqueeze(-1)
        q = torch.where(s > 0, w / torch.where(s > 0, s, 1), 0).round().clamp(-127, 127)
        return PackedWeight(WeightFormat.Q8, q.to(torch.int8).reshape(n, k).contiguous(), scale.contiguous())
    if fmt == WeightFormat.W8A8:
        scale = (w.abs().amax((1, 2)) / 127).half()  # one per row
        s = scale.float()[:, None, None]
        q = torch.where(s > 0, w / torch.where(s > 0, s, 1), 0).round().clamp(-127, 127)
        scales = scale[:, None].expand(n, k // BLOCK).contiguous()
        return PackedWeight(WeightFormat.W8A8, q.to(torch.int8).reshape(n, k).contiguous(), scales)
    if fmt == WeightFormat.Q4:
        lo, hi = w.amin(-1), w.amax(-1)
        scale = ((hi - lo) / 15).half()
        offset = lo.half()
        s, m = scale.float().unsqueeze(-1), offset.float().unsqueeze(-1)
        q = torch.where(s > 0, (w - m) / torch.where(s > 0, s, 1), 0).round().clamp(0, 15).to(torch.uint8)
        codes = q[..., :16] | (q[..., 16:] << 4)
        return PackedWeight(
            WeightFormat.Q4, codes.reshape(n, k // 2).contiguous(), scale.contiguous(), offset.contiguous()
        )
    raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(PACKED_FORMATS)}")


def dequantize(p: PackedWeight) -> torch.Tensor:
    """Pure-torch decode to fp32 [N, K]: the reference for the kernels and the path without them."""
    n, k = p.shape
    s = p.scales.float().unsqueeze(-1)
    if p.format in (WeightFormat.Q8, WeightFormat.W8A8):
        return (p.codes.float().view(n, -1, BLOCK) * s).view(n, k)
    c = p.codes.view(n, -1, BLOCK // 2)
    q = torch.cat([c & 0x0F, c >> 4], dim=-1).float()
    return (q * s + p.mins.float().unsqueeze(-1)).view(n, k)  # type: ignore[union-attr]


W8A8_OUTLIER = 6.0  # |activation| above which a feature goes through fp32 (LLM.int8()'s threshold)


def w8a8_matmul(
    x: torch.Tensor, codes: torch.Tensor, row_scales: torch.Tensor, outlier: float = W8A8_OUTLIER
) -> torch.Tensor:
    """Pure-torch W8A8 product: features where some row's |x| exceeds `outlier` are multiplied in fp32; the
    rest of x is rounded to int8 per row (absmax / 127), its integer products summed exactly (in float64:
    |sums| < 2^53) and both scales applied. The reference for the kernel and the path without it."""
    x = x.reshape(-1, x.shape[-1])
    out = (x.abs() > outlier).any(0)
    xi = x.masked_fill(out, 0)
    amax = xi.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / torch.where(amax > 0, amax, 1), 0)
    xq = torch.round(xi * inv).clamp(-127, 127)
    y = (xq.double() @ codes.double().T).float() * (amax / 127) * row_scales
    if out.any():
        y = y + x[:, out] @ (codes[:, out].float() * row_scales[:, None]).T
    return y


def convert(weight: torch.Tensor | PackedWeight, mode: WeightFormat | str) -> torch.Tensor | PackedWeight:
    """Bring one 2-D weight into the format `mode` asks for: DENSE (fp32), Q4/Q8 (every weight in that
    format), or AUTO (as the checkpoint stores it: packed stays packed, float stays float)."""
    mode = WeightFormat(mode)
    if mode == WeightFormat.AUTO:
        return weight
    if mode == WeightFormat.DENSE:
        return dequantize(weight) if isinstance(weight, PackedWeight) else weight
    if isinstance(weight, PackedWeight):
        if weight.format == mode:
            return weight
        weight = dequantize(weight)
    return quantize(weight, mode)
