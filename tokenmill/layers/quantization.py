"""Block-quantized weight formats that the CPU kernels execute natively, and conversions into them.

Every format cuts a weight row into blocks of 32 input features with an fp16 scale per block:
  q8: int8 codes [N, K],         w = scale * q
  q4: uint8 codes [N, K/2],      w = scale * q + offset, q in 0..15; byte j of a block holds element j
      (low nibble) and element j + 16 (high nibble), which is GGUF's Q4_0/Q4_1 layout.
GGUF Q4_0, Q4_1 and Q8_0 blocks repack byte for byte, and Q4_K up to the fp16 rounding of its sub-block
scales; any other weight can be quantized into either format from fp32 (a lossy step, measured by
`tokenmill eval`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import Q4_K

BLOCK = 32
FORMATS = ("q4", "q8")
GQ = GGMLQuantizationType
NATIVE_GGUF_FORMATS = {GQ.Q4_0: "q4", GQ.Q4_1: "q4", GQ.Q4_K: "q4", GQ.Q8_0: "q8"}


@dataclass
class PackedWeight:
    """A [out_features, in_features] weight in one of FORMATS."""

    format: str
    codes: torch.Tensor
    scales: torch.Tensor  # fp16 [N, K / 32]
    mins: torch.Tensor | None = None  # fp16 [N, K / 32], q4 only

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
    mins = torch.cat([p.mins for p in parts]) if fmt == "q4" else None  # type: ignore[misc]
    return PackedWeight(fmt, torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]), mins)


# ---- from GGUF blocks -------------------------------------------------------------------------------------
def pack_gguf(raw: np.ndarray, qtype: GGMLQuantizationType, rows: int, cols: int) -> PackedWeight:
    """Repack a GGUF tensor's raw blocks ([rows, bytes per row] uint8) without going through fp32."""
    if cols % BLOCK:
        raise ValueError(f"row length {cols} is not a multiple of {BLOCK}")
    raw = np.ascontiguousarray(raw).reshape(rows, -1)
    if qtype in (GQ.Q4_0, GQ.Q4_1, GQ.Q8_0):
        size = {GQ.Q4_0: 18, GQ.Q4_1: 20, GQ.Q8_0: 34}[qtype]
        blocks = raw.reshape(rows, cols // BLOCK, size)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
        if qtype == GQ.Q8_0:
            codes = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
            return PackedWeight("q8", torch.from_numpy(codes), torch.from_numpy(d))
        if qtype == GQ.Q4_0:
            m = (d.astype(np.float32) * -8).astype(np.float16)  # exact: a power-of-two multiple
            qs = blocks[..., 2:]
        else:
            m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
            qs = blocks[..., 4:]
        codes = np.ascontiguousarray(qs).reshape(rows, cols // 2)
        return PackedWeight("q4", torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(m))
    if qtype == GQ.Q4_K:
        blocks = raw.reshape(-1, 144)  # super-blocks of 256: d, dmin, 12 bytes of 6-bit scales, 128 bytes qs
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, mn = Q4_K.get_scale_min(blocks[:, 4:16].copy())
        scales = (d * sc.astype(np.float32)).astype(np.float16)  # [blocks, 8]
        mins = (-dmin * mn.astype(np.float32)).astype(np.float16)
        # each 32 bytes of qs hold sub-block 2j (low nibbles) and 2j+1 (high nibbles), element by element
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        q = (qs & 0x0F).reshape(-1, 8, 32)
        codes = (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8).reshape(rows, cols // 2)
        return PackedWeight(
            "q4",
            torch.from_numpy(codes),
            torch.from_numpy(scales.reshape(rows, -1)),
            torch.from_numpy(mins.reshape(rows, -1)),
        )
    raise ValueError(f"GGUF type {qtype.name} has no native packed format")


# ---- from fp32 --------------------------------------------------------------------------------------------
def quantize(weight: torch.Tensor, fmt: str) -> PackedWeight:
    """Round-to-nearest block quantization of a float weight: symmetric int8, or 4-bit over [min, max]."""
    n, k = weight.shape
    if k % BLOCK:
        raise ValueError(f"cannot quantize a weight with {k} input features: not a multiple of {BLOCK}")
    w = weight.detach().float().reshape(n, k // BLOCK, BLOCK)
    if fmt == "q8":
        scale = (w.abs().amax(-1) / 127).half()
        s = scale.float().unsqueeze(-1)
        q = torch.where(s > 0, w / torch.where(s > 0, s, 1), 0).round().clamp(-127, 127)
        return PackedWeight("q8", q.to(torch.int8).reshape(n, k).contiguous(), scale.contiguous())
    if fmt == "q4":
        lo, hi = w.amin(-1), w.amax(-1)
        scale = ((hi - lo) / 15).half()
        offset = lo.half()
        s, m = scale.float().unsqueeze(-1), offset.float().unsqueeze(-1)
        q = torch.where(s > 0, (w - m) / torch.where(s > 0, s, 1), 0).round().clamp(0, 15).to(torch.uint8)
        codes = q[..., :16] | (q[..., 16:] << 4)
        return PackedWeight(
            "q4", codes.reshape(n, k // 2).contiguous(), scale.contiguous(), offset.contiguous()
        )
    raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(FORMATS)}")


def dequantize(p: PackedWeight) -> torch.Tensor:
    """Pure-torch decode to fp32 [N, K]: the reference for the kernels and the path without them."""
    n, k = p.shape
    s = p.scales.float().unsqueeze(-1)
    if p.format == "q8":
        return (p.codes.float().view(n, -1, BLOCK) * s).view(n, k)
    c = p.codes.view(n, -1, BLOCK // 2)
    q = torch.cat([c & 0x0F, c >> 4], dim=-1).float()
    return (q * s + p.mins.float().unsqueeze(-1)).view(n, k)  # type: ignore[union-attr]


WEIGHT_MODES = ("auto", "dense", *FORMATS)


def convert(weight: torch.Tensor | PackedWeight, mode: str) -> torch.Tensor | PackedWeight:
    """Bring one 2-D weight into the format `mode` asks for: 'dense' (fp32), 'q4'/'q8' (every weight in that
    format), or 'auto' (as the checkpoint stores it: packed stays packed, float stays float)."""
    if mode == "auto":
        return weight
    if mode == "dense":
        return dequantize(weight) if isinstance(weight, PackedWeight) else weight
    if isinstance(weight, PackedWeight):
        if weight.format == mode:
            return weight
        weight = dequantize(weight)
    return quantize(weight, mode)
