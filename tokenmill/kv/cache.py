"""KVCache: the one owner of the paged key/value memory.

Layout, per layer, for K and for V: `[num_blocks, num_kv_heads, block_size, head_dim]`. Head-major inside a
block, so a CPU attention task for one (sequence, KV head) streams contiguous memory: a block holds
`block_size * head_dim` consecutive values of one head. Keys are stored after rotary embedding, so a token
keeps the position it was written with wherever its slot moves (eviction compacts slots, positions stay).

A slot is `block * block_size + offset`. Which slots a sequence holds is the engine's business (its block
table); this class only allocates, writes, copies, moves and reads slots, and says how many bytes a token
costs in its format, so the engine sizes the cache in bytes and a smaller format admits more tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.config import KV_CACHE_DTYPES

_FORMAT_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
INT8_MAX = 127.0


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dimension: one fp32 scale per vector (per token and head).
    The C++ KV write computes the same codes (amax / 127, x / scale rounded half to even)."""
    x = x.float()
    scale = x.abs().amax(dim=-1) / INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(x / safe.unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.unsqueeze(-1)


def int4_groups(head_dim: int) -> int:
    """Quantization groups per head vector in the int4 format: groups of 32 elements where the head allows
    (fewer for small heads), each within one half of the vector (the halves share bytes, one per nibble)."""
    half = head_dim // 2
    if head_dim % 2 or half == 0:
        raise ValueError(f"kv_cache_dtype int4 needs an even head_dim, got {head_dim}")
    size = next(g for g in (32, 16, 8, 4, 2, 1) if half % g == 0)
    return head_dim // size


def quantize_int4(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit over groups of the last dimension: codes `[..., D / 2]` uint8 (byte j: element j in
    the low nibble, element j + D/2 in the high one) and fp16 (scale, min) pairs `[..., groups, 2]`. The C++
    KV write computes the same codes (with the fp16-rounded scale and min, rounded half to even)."""
    x = x.float()
    d = x.shape[-1]
    xg = x.view(*x.shape[:-1], groups, d // groups)
    lo, hi = xg.amin(dim=-1), xg.amax(dim=-1)
    scale, low = ((hi - lo) / 15.0).half().float(), lo.half().float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((xg - low.unsqueeze(-1)) / safe.unsqueeze(-1)).clamp_(0, 15).to(torch.uint8)
    codes = codes.view(*x.shape[:-1], d)
    packed = codes[..., : d // 2] | (codes[..., d // 2 :] << 4)
    return packed, torch.stack([scale, low], dim=-1).half()


def dequantize_int4(packed: torch.Tensor, scale_min: torch.Tensor) -> torch.Tensor:
    codes = torch.cat([packed & 15, packed >> 4], dim=-1).float()
    groups = scale_min.shape[-2]
    sm = scale_min.float()
    cg = codes.view(*codes.shape[:-1], groups, -1)
    return (cg * sm[..., 0:1] + sm[..., 1:2]).view(codes.shape)


@dataclass
class LayerKV:
    """One layer's K and V, `[num_blocks, num_kv_heads, block_size, head_dim]` views of the cache, with the
    per-(token, head) scales `[num_blocks, num_kv_heads, block_size]` of a quantized format (else None)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def int4(self) -> bool:
        return self.k.dtype == torch.uint8

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    def write(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store k, v `[T, num_kv_heads, head_dim]` at their slots (negative: skipped), quantizing on write."""
        keep = slot_mapping >= 0
        if not bool(keep.all()):
            k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
        bs = self.block_size
        blocks, offsets = slot_mapping // bs, slot_mapping % bs
        if self.int4:
            groups = self.k_scale.shape[-2]
            (kc, ks), (vc, vs) = quantize_int4(k, groups), quantize_int4(v, groups)
            self.k[blocks, :, offsets], self.k_scale[blocks, :, offsets] = kc, ks
            self.v[blocks, :, offsets], self.v_scale[blocks, :, offsets] = vc, vs
        elif self.quantized:
            (kc, ks), (vc, vs) = quantize_int8(k), quantize_int8(v)
            self.k[blocks, :, offsets], self.k_scale[blocks, :, offsets] = kc, ks
            self.v[blocks, :, offsets], self.v_scale[blocks, :, offsets] = vc, vs
        else:
            self.k[blocks, :, offsets] = k.to(self.k.dtype)
            self.v[blocks, :, offsets] = v.to(self.v.dtype)

    def blocks(self, block_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the given blocks `[..., num_kv_heads, block_size, head_dim]` in `dtype`: the torch
        reference path's read (a copy; the C++ kernels read packed blocks in place)."""
        if self.int4:
            k = dequantize_int4(self.k[block_ids], self.k_scale[block_ids])
            v = dequantize_int4(self.v[block_ids], self.v_scale[block_ids])
            return k.to(dtype), v.to(dtype)
        if self.quantized:
            k = dequantize_int8(self.k[block_ids], self.k_scale[block_ids])
            v = dequantize_int8(self.v[block_ids], self.v_scale[block_ids])
            return k.to(dtype), v.to(dtype)
        return self.k[block_ids], self.v[block_ids]


@dataclass(frozen=True)
class KVCacheSpec:
    """What a cache holds and how it is laid out; enough to size it before allocating it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype  # the activations' dtype: what attention computes in
    cache_dtype: str = "auto"  # auto (store in `dtype`) | int8 (an fp32 scale per token and head) | int4

    def __post_init__(self) -> None:
        if self.cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.cache_dtype!r}"
            )

    @property
    def format(self) -> str:
        """Name of the element format; part of the prefix-cache key, since blocks differ by format."""
        if self.cache_dtype != "auto":
            return self.cache_dtype
        return _FORMAT_NAMES.get(self.dtype, str(self.dtype))

    @property
    def quantized(self) -> bool:
        return self.cache_dtype in ("int8", "int4")

    @property
    def int4_groups(self) -> int:
        return int4_groups(self.head_dim)

    @property
    def bytes_per_token(self) -> int:
        if self.cache_dtype == "int4":  # a nibble per element and an fp16 (scale, min) pair per group
            per_head = self.head_dim // 2 + 4 * self.int4_groups
        elif self.quantized:  # an int8 code per element and an fp32 scale per (token, head)
            per_head = self.head_dim + 4
        else:
            per_head = self.head_dim * torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * per_head

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def blocks_for_memory(self, memory_bytes: int) -> int:
        return memory_bytes // self.bytes_per_block


class KVCache:
    """Paged K/V storage for every layer, allocated once.

    `zero=False` leaves the memory uninitialized (no multi-GiB memset at start-up; pages are committed as they
    fill): only valid when every reader reads written slots alone, as the C++ kernels do.
    """

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device, zero: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache must hold at least one block")
        self.spec = spec
        self.num_blocks = num_blocks
        self.device = device
        shape = (spec.num_layers, 2, num_blocks, spec.num_kv_heads, spec.block_size, spec.head_dim)
        alloc = torch.zeros if zero else torch.empty
        if spec.cache_dtype == "int4":  # two codes per byte; fp16 (scale, min) per group
            self.data = alloc((*shape[:-1], spec.head_dim // 2), dtype=torch.uint8, device=device)
            self.scales = alloc((*shape[:-1], spec.int4_groups, 2), dtype=torch.float16, device=device)
        else:
            self.data = alloc(shape, dtype=torch.int8 if spec.quantized else spec.dtype, device=device)
            # per-(token, head) scales of int8: [layers, 2, num_blocks, num_kv_heads, block_size]
            self.scales = alloc(shape[:-1], dtype=torch.float32, device=device) if spec.quantized else None
        self._layers = [
            LayerKV(self.data[i, 0], self.data[i, 1])
            if self.scales is None
            else LayerKV(self.data[i, 0], self.data[i, 1], self.scales[i, 0], self.scales[i, 1])
            for i in range(spec.num_layers)
        ]

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def nbytes(self) -> int:
        scales = 0 if self.scales is None else self.scales.numel() * self.scales.element_size()
        return self.data.numel() * self.data.element_size() + scales

    def layer(self, index: int) -> LayerKV:
        """One layer's K and V (and scales), views of the cache."""
        return self._layers[index]

    # ---- writes ---------------------------------------------------------------------------------
    def write(self, index: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store k, v `[T, num_kv_heads, head_dim]` of layer `index` at their slots (negative: skipped)."""
        self.layer(index).write(k, v, slot_mapping)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks (copy-on-write before a shared block is written), all layers."""
        for src, dst in pairs:
            self.data[:, :, dst].copy_(self.data[:, :, src])
            if self.scales is not None:
                self.scales[:, :, dst].copy_(self.scales[:, :, src])

    def move_slots(self, src: torch.Tensor, dst: torch.Tensor, head: int | None = None) -> None:
        """Copy the tokens at slots `src` to slots `dst` in every layer, all heads or one: how eviction
        compacts a sequence's kept tokens into fewer blocks. Sources are read before any write."""
        bs = self.block_size
        sb, so, db, do = src // bs, src % bs, dst // bs, dst % bs
        heads = slice(None) if head is None else head
        values = self.data[:, :, sb, heads, so].clone()
        self.data[:, :, db, heads, do] = values
        if self.scales is not None:
            scales = self.scales[:, :, sb, heads, so].clone()
            self.scales[:, :, db, heads, do] = scales

    def move_per_head(
        self,
        block_table: list[int],
        layer: torch.Tensor,
        head: torch.Tensor,
        src: torch.Tensor,
        dst: torch.Tensor,
    ) -> None:
        """Move single (layer, head) entries of one sequence, K and V (and scales): slot `src[i]` of the
        sequence (an index into its held slots, through `block_table`) to slot `dst[i]`, in layer `layer[i]`
        and KV head `head[i]`. How per-head eviction compacts what each head keeps. Sources are read first."""
        if src.numel() == 0:
            return
        bs = self.block_size
        table = torch.tensor(block_table, dtype=torch.long, device=self.device)
        sb, so = table[src // bs], src % bs
        db, do = table[dst // bs], dst % bs
        values = self.data[layer, :, sb, head, so]  # [N, 2, D] (advanced indexing copies)
        self.data[layer, :, db, head, do] = values
        if self.scales is not None:
            scales = self.scales[layer, :, sb, head, so]
            self.scales[layer, :, db, head, do] = scales

    # ---- reads ----------------------------------------------------------------------------------
    def gather(self, index: int, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A sequence's first `length` slots of layer `index` as contiguous `[num_kv_heads, length,
        head_dim]` K and V in the activations' dtype (a copy; tests read through it)."""
        blocks = block_table[: -(-length // self.block_size)]
        hkv, d = self.spec.num_kv_heads, self.spec.head_dim
        k, v = self.layer(index).blocks(blocks, self.spec.dtype)
        return k.transpose(0, 1).reshape(hkv, -1, d)[:, :length], v.transpose(0, 1).reshape(hkv, -1, d)[
            :, :length
        ]
