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

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenmill.config import KV_CACHE_DTYPES
from tokenmill.kv.kivi import (
    KIVI_BITS,
    KiviState,
    KiviWindow,
    dequantize_keys,
    dequantize_values,
    kivi_value_group,
    quantize_keys,
    quantize_values,
)

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
    per-(token, head) scales `[num_blocks, num_kv_heads, block_size]` of a quantized format (else None).

    KIVI (`kivi_bits` 2 or 4, kv/kivi.py): k and v are packed code rows, k_scale the per-channel key stats
    `[num_blocks, Hkv, D, 2]`, v_scale the per-token value stats, res_k / res_v the full-precision residual
    blocks `[R, Hkv, block_size, D]`, and `state` says which blocks are still open (in a residual)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    kivi_bits: int = 0
    res_k: torch.Tensor | None = None
    res_v: torch.Tensor | None = None
    state: KiviState | None = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def kivi(self) -> bool:
        return self.kivi_bits > 0

    @property
    def int4(self) -> bool:
        return self.k.dtype == torch.uint8 and not self.kivi

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    @property
    def open_slot(self) -> torch.Tensor | None:
        return None if self.state is None else self.state.open_slot

    def write(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store k, v `[T, num_kv_heads, head_dim]` at their slots (negative: skipped), quantizing on write."""
        if self.kivi:
            self._kivi_write(k, v, slot_mapping)
            return
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

    # ---- KIVI -----------------------------------------------------------------------------------
    def unseal(self, slot_mapping: torch.Tensor) -> None:
        """The step's unsealed blocks, dequantized into their residuals (before this layer's write)."""
        plan = self.state.plan_for(slot_mapping)
        if plan.unseal_blocks.numel():
            k, v = self._dequantize(plan.unseal_blocks)
            self.res_k[plan.unseal_res] = k.to(self.res_k.dtype)
            self.res_v[plan.unseal_res] = v.to(self.res_v.dtype)

    def _dequantize(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bits = self.kivi_bits
        k = dequantize_keys(self.k[block_ids], self.k_scale[block_ids], bits)
        v = dequantize_values(self.v[block_ids], self.v_scale[block_ids], bits)
        return k, v

    def seal(self, block_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize whole blocks `[S, Hkv, bs, D]` of keys (per channel) and values (per token) into place."""
        bits, group = self.kivi_bits, k.shape[-1] // self.v_scale.shape[-2]
        self.k[block_ids], self.k_scale[block_ids] = quantize_keys(k, bits)
        self.v[block_ids], self.v_scale[block_ids] = quantize_values(v, bits, group)

    def _kivi_write(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """The torch twin of the C++ write: unseal, seal completed blocks from the step's tokens and their
        residuals, then put the tokens of blocks still filling into their residual rows."""
        plan = self.state.plan_for(slot_mapping)
        self.unseal(slot_mapping)
        bs = self.block_size
        if plan.seal_blocks.numel():
            src = plan.seal_src  # [S, bs]
            from_tok = (src >= 0).view(*src.shape, 1, 1)
            tok = src.clamp(min=0)
            row = (-src - 1).clamp(min=0)
            r, o = row // bs, row % bs
            kk = torch.where(from_tok, k[tok].to(self.res_k.dtype), self.res_k[r, :, o])  # [S, bs, Hkv, D]
            vv = torch.where(from_tok, v[tok].to(self.res_v.dtype), self.res_v[r, :, o])
            self.seal(plan.seal_blocks, kk.transpose(1, 2), vv.transpose(1, 2))
        keep = plan.res_rows >= 0
        if bool(keep.any()):
            rows = plan.res_rows[keep]
            self.res_k[rows // bs, :, rows % bs] = k[keep].to(self.res_k.dtype)
            self.res_v[rows // bs, :, rows % bs] = v[keep].to(self.res_v.dtype)

    def blocks(self, block_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the given blocks `[..., num_kv_heads, block_size, head_dim]` in `dtype`: the torch
        reference path's read (a copy; the C++ kernels read packed blocks in place)."""
        if self.kivi:
            k, v = self._dequantize(block_ids)
            r = self.state.open_slot[block_ids].long()
            is_open = (r >= 0).view(*r.shape, 1, 1, 1)
            r = r.clamp(min=0)
            k = torch.where(is_open, self.res_k[r].float(), k)
            v = torch.where(is_open, self.res_v[r].float(), v)
            return k.to(dtype), v.to(dtype)
        if self.int4:
            k = dequantize_int4(self.k[block_ids], self.k_scale[block_ids])
            v = dequantize_int4(self.v[block_ids], self.v_scale[block_ids])
            return k.to(dtype), v.to(dtype)
        if self.quantized:
            k = dequantize_int8(self.k[block_ids], self.k_scale[block_ids])
            v = dequantize_int8(self.v[block_ids], self.v_scale[block_ids])
            return k.to(dtype), v.to(dtype)
        return self.k[block_ids], self.v[block_ids]


# Share of the KV budget a KIVI cache may spend on full-precision residual blocks (`KiviWindow.blocks_per_seq`
# per running sequence): more sequences than fit in it run fewer at once (LLMEngine caps max_num_seqs by it).
KIVI_RESIDUAL_SHARE = 4  # at most 1/4 of --kv-cache-memory


@dataclass(frozen=True)
class KVCacheSpec:
    """What a cache holds and how it is laid out; enough to size it before allocating it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype  # the activations' dtype: what attention computes in
    # auto (store in `dtype`) | int8 (an fp32 scale per token and head) | int4 | kivi2 | kivi4 (kv/kivi.py)
    cache_dtype: str = "auto"
    # KIVI only: the newest full tokens and the first tokens of each sequence kept in full precision (kv/kivi.py)
    kivi_window: int = 0
    kivi_sinks: int = 0

    def __post_init__(self) -> None:
        if self.cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.cache_dtype!r}"
            )
        if self.kivi_bits:
            kivi_value_group(self.head_dim, self.kivi_bits)  # ValueError for a head_dim it cannot pack
            KiviWindow.from_tokens(self.kivi_window, self.kivi_sinks, self.block_size)  # ValueError if < 0

    @property
    def format(self) -> str:
        """Name of the element format; part of the prefix-cache key, since blocks differ by format."""
        if self.cache_dtype != "auto":
            return self.cache_dtype
        return _FORMAT_NAMES.get(self.dtype, str(self.dtype))

    @property
    def quantized(self) -> bool:
        """int8 or int4 (per-token formats; KIVI is `kivi_bits`)."""
        return self.cache_dtype in ("int8", "int4")

    @property
    def kivi_bits(self) -> int:
        """2 or 4 for the KIVI formats, else 0."""
        return KIVI_BITS.get(self.cache_dtype, 0)

    @property
    def kivi_window_blocks(self) -> KiviWindow:
        """The KIVI window in blocks ((0, 0) for the other formats, which keep nothing open)."""
        if not self.kivi_bits:
            return KiviWindow()
        return KiviWindow.from_tokens(self.kivi_window, self.kivi_sinks, self.block_size)

    @property
    def int4_groups(self) -> int:
        return int4_groups(self.head_dim)

    @property
    def kivi_value_groups(self) -> int:
        return self.head_dim // kivi_value_group(self.head_dim, self.kivi_bits)

    @property
    def _element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_block(self) -> int:
        if (
            self.kivi_bits
        ):  # codes for K and V; fp16 (scale, min) per key channel and per value group and token
            bs, d = self.block_size, self.head_dim
            per_head = 2 * bs * d * self.kivi_bits // 8 + 4 * d + 4 * bs * self.kivi_value_groups
            return self.num_layers * self.num_kv_heads * per_head
        return self.bytes_per_token * self.block_size

    @property
    def bytes_per_token(self) -> int:
        if self.kivi_bits:  # a block's bytes over its tokens (key stats are per block), rounded up
            return -(-self.bytes_per_block // self.block_size)
        if self.cache_dtype == "int4":  # a nibble per element and an fp16 (scale, min) pair per group
            per_head = self.head_dim // 2 + 4 * self.int4_groups
        elif self.quantized:  # an int8 code per element and an fp32 scale per (token, head)
            per_head = self.head_dim + 4
        else:
            per_head = self.head_dim * self._element_size
        return self.num_layers * 2 * self.num_kv_heads * per_head

    @property
    def residual_dtype(self) -> torch.dtype:
        """KIVI's residual blocks: fp16 for fp32 activations (half the bytes; its rounding, 2^-11 of a value,
        is nothing next to the 2- or 4-bit codes a block gets when it seals), else the activations' dtype."""
        return torch.float16 if self.dtype == torch.float32 else self.dtype

    @property
    def residual_block_bytes(self) -> int:
        """Bytes of one residual block (KIVI; 0 for the other formats)."""
        if not self.kivi_bits:
            return 0
        size = torch.empty((), dtype=self.residual_dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.block_size * self.head_dim * size

    def residual_blocks_for(self, memory_bytes: int, max_num_seqs: int) -> int:
        """Residual blocks a KIVI cache of `memory_bytes` reserves: `blocks_per_seq` per sequence running at
        once, within 1 / KIVI_RESIDUAL_SHARE of the budget (at least one sequence's); 0 for the other formats."""
        if not self.kivi_bits:
            return 0
        per_seq = self.kivi_window_blocks.blocks_per_seq
        fits = memory_bytes // KIVI_RESIDUAL_SHARE // self.residual_block_bytes // per_seq
        return per_seq * max(1, min(max_num_seqs, fits))

    def blocks_for_memory(self, memory_bytes: int, residual_blocks: int = 0) -> int:
        """Blocks that fit in `memory_bytes` after `residual_blocks` residual blocks (KIVI)."""
        return max(0, memory_bytes - residual_blocks * self.residual_block_bytes) // self.bytes_per_block


class KVCache:
    """Paged K/V storage for every layer, allocated once.

    `zero=False` leaves the memory uninitialized (no multi-GiB memset at start-up; pages are committed as they
    fill): only valid when every reader reads written slots alone, as the C++ kernels do.

    A KIVI cache also holds `residual_blocks` full-precision blocks for the blocks being filled (kv/kivi.py;
    default: as many as fit one per block up to 16); whoever frees blocks calls `release_block` for each, so a
    block freed while still filling gives its residual back (BlockManager's `on_free`).

    `model_layers`: which of the model's layers the cache holds, in order (a model run with layers skipped,
    as a lossy mode or as a self-speculative draft, needs no K/V for them); `layer(i)` takes the model's
    index. Default: layers 0..spec.num_layers-1.
    """

    def __init__(
        self,
        spec: KVCacheSpec,
        num_blocks: int,
        device: torch.device,
        zero: bool = True,
        residual_blocks: int | None = None,
        model_layers: Sequence[int] | None = None,
    ):
        if num_blocks < 1:
            raise ValueError("the KV cache must hold at least one block")
        self.model_layers = None if model_layers is None else list(model_layers)
        if self.model_layers is not None and len(self.model_layers) != spec.num_layers:
            raise ValueError(
                f"model_layers names {len(self.model_layers)} layers for a cache of {spec.num_layers}"
            )
        self._index = (
            {layer: i for i, layer in enumerate(self.model_layers)} if self.model_layers is not None else None
        )
        self.spec = spec
        self.num_blocks = num_blocks
        self.device = device
        shape = (spec.num_layers, 2, num_blocks, spec.num_kv_heads, spec.block_size, spec.head_dim)
        alloc = torch.zeros if zero else torch.empty
        self.kivi: KiviState | None = None
        self.key_stats: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None
        bits = spec.kivi_bits
        if bits:
            # codes [layers, 2, blocks, Hkv, bs, D * bits / 8]; key stats [layers, blocks, Hkv, D, 2]; value
            # stats (in `scales`) [layers, blocks, Hkv, bs, G, 2]; residual [layers, 2, R, Hkv, bs, D]
            r = min(num_blocks, 16) if residual_blocks is None else residual_blocks
            self.kivi = KiviState(num_blocks, r, spec.block_size, device, spec.kivi_window_blocks)
            self.data = alloc((*shape[:-1], spec.head_dim * bits // 8), dtype=torch.uint8, device=device)
            self.key_stats = alloc(
                (spec.num_layers, num_blocks, spec.num_kv_heads, spec.head_dim, 2),
                dtype=torch.float16,
                device=device,
            )
            self.scales = alloc(
                (spec.num_layers, *shape[2:-1], spec.kivi_value_groups, 2), dtype=torch.float16, device=device
            )
            self.residual = alloc(
                (spec.num_layers, 2, r, *shape[3:]), dtype=spec.residual_dtype, device=device
            )
            self._layers = [
                LayerKV(
                    self.data[i, 0],
                    self.data[i, 1],
                    self.key_stats[i],
                    self.scales[i],
                    bits,
                    self.residual[i, 0],
                    self.residual[i, 1],
                    self.kivi,
                )  # fmt: skip
                for i in range(spec.num_layers)
            ]
            return
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
        return sum(
            t.numel() * t.element_size()
            for t in (self.data, self.scales, self.key_stats, self.residual)
            if t is not None
        )

    def index(self, model_layer: int) -> int:
        """Where the cache holds model layer `model_layer` (per-layer buffers such as eviction's attention
        scores follow the cache's order)."""
        return model_layer if self._index is None else self._index[model_layer]

    def layer(self, index: int) -> LayerKV:
        """Model layer `index`'s K and V (and scales), views of the cache."""
        return self._layers[self.index(index)]

    # ---- writes ---------------------------------------------------------------------------------
    def prepare_write(self, slot_mapping: torch.Tensor, seqs: Sequence[tuple[list[int], int]] = ()) -> None:
        """Once per step, before the layers write `slot_mapping`: a KIVI cache plans which blocks seal and
        which tokens go to full-precision residuals (kv/kivi.py), keeping each sequence's window open (`seqs`:
        (block table, slots held after the step) per sequence). Nothing to do for the other formats."""
        if self.kivi is not None:
            self.kivi.plan_writes(slot_mapping, seqs)

    def release_block(self, block_id: int) -> None:
        """A block went back to the free pool: a KIVI block still filling gives back its residual, and a full
        one a window kept open is sealed first (the prefix cache may hand it to a later request)."""
        if self.kivi is None:
            return
        r = self.kivi.open.get(block_id)
        if r is not None and block_id in self.kivi.full:
            self._seal_from_residual(block_id, r)
        self.kivi.release(block_id)

    def _seal_from_residual(self, block_id: int, r: int) -> None:
        """Quantize residual `r` into block `block_id`, every layer at once (the codes the C++ seal writes)."""
        bits = self.spec.kivi_bits
        group = self.spec.head_dim // self.spec.kivi_value_groups
        keys, values = self.residual[:, 0, r], self.residual[:, 1, r]  # [layers, Hkv, bs, D]
        self.data[:, 0, block_id], self.key_stats[:, block_id] = quantize_keys(keys, bits)
        self.data[:, 1, block_id], self.scales[:, block_id] = quantize_values(values, bits, group)

    def write(self, index: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store k, v `[T, num_kv_heads, head_dim]` of layer `index` at their slots (negative: skipped)."""
        self.layer(index).write(k, v, slot_mapping)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks (copy-on-write before a shared block is written), all layers."""
        for src, dst in pairs:
            self.data[:, :, dst].copy_(self.data[:, :, src])
            if self.kivi is not None:
                self.scales[:, dst].copy_(self.scales[:, src])
                self.key_stats[:, dst].copy_(self.key_stats[:, src])
                r = self.kivi.open_copy(src, dst)
                if r is not None:
                    self.residual[:, :, r].copy_(self.residual[:, :, self.kivi.open[src]])
            elif self.scales is not None:
                self.scales[:, :, dst].copy_(self.scales[:, :, src])

    def move_slots(self, src: torch.Tensor, dst: torch.Tensor, head: int | None = None) -> None:
        """Copy the tokens at slots `src` to slots `dst` in every layer, all heads or one: how eviction
        compacts a sequence's kept tokens into fewer blocks. Sources are read before any write."""
        bs = self.block_size
        sb, so, db, do = src // bs, src % bs, dst // bs, dst % bs
        if self.kivi is not None:
            spec = self.spec
            heads = torch.arange(spec.num_kv_heads) if head is None else torch.tensor([head])
            grid = torch.cartesian_prod(torch.arange(spec.num_layers), heads, torch.arange(src.numel()))
            layer, hd, i = (grid[:, j].to(self.device) for j in range(3))
            self._kivi_move(layer, hd, sb[i], so[i], db[i], do[i])
            return
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
        if self.kivi is not None:
            self._kivi_move(layer, head, sb, so, db, do)
            return
        values = self.data[layer, :, sb, head, so]  # [N, 2, D] (advanced indexing copies)
        self.data[layer, :, db, head, do] = values
        if self.scales is not None:
            scales = self.scales[layer, :, sb, head, so]
            self.scales[layer, :, db, head, do] = scales

    def _kivi_move(self, layer, head, sb, so, db, do) -> None:
        """KIVI moves of (layer, head) tokens between physical (block, offset)s. Sources are read in full
        precision (a residual row, or dequantized); a destination block still filling takes them as they
        are, a sealed one takes the value quantized per token and requantizes its key group (one per layer,
        block and head) with the key in it: the block's other keys are quantized a second time, on the
        range that now includes the moved one."""
        if layer.numel() == 0:
            return
        bits, dt = self.spec.kivi_bits, self.residual.dtype
        res, codes, kst, vst = self.residual, self.data, self.key_stats, self.scales
        open_slot = self.kivi.open_slot.long()
        # read every source first
        rs = open_slot[sb]
        src_open = rs >= 0
        rsc = rs.clamp(min=0)
        key = dequantize_keys(
            codes[layer, 0, sb, head, so].unsqueeze(-2), kst[layer, sb, head], bits
        ).squeeze(-2)
        val = dequantize_values(codes[layer, 1, sb, head, so], vst[layer, sb, head, so], bits)
        key = torch.where(src_open.unsqueeze(-1), res[layer, 0, rsc, head, so].float(), key)
        val = torch.where(src_open.unsqueeze(-1), res[layer, 1, rsc, head, so].float(), val)
        rd = open_slot[db]
        to_open = rd >= 0
        if bool(to_open.any()):
            m = to_open
            res[layer[m], 0, rd[m], head[m], do[m]] = key[m].to(dt)
            res[layer[m], 1, rd[m], head[m], do[m]] = val[m].to(dt)
        sealed = ~to_open
        if not bool(sealed.any()):
            return
        layer, head, db, do, key, val = (
            layer[sealed],
            head[sealed],
            db[sealed],
            do[sealed],
            key[sealed],
            val[sealed],
        )
        group = self.spec.head_dim // self.spec.kivi_value_groups
        vc, vs = quantize_values(val, bits, group)
        codes[layer, 1, db, head, do], vst[layer, db, head, do] = vc, vs
        gid = (layer * self.num_blocks + db) * self.spec.num_kv_heads + head
        uniq, inverse = torch.unique(gid, return_inverse=True)
        hkv = self.spec.num_kv_heads
        ul, ub, uh = uniq // (self.num_blocks * hkv), (uniq // hkv) % self.num_blocks, uniq % hkv
        keys = dequantize_keys(codes[ul, 0, ub, uh], kst[ul, ub, uh], bits)  # [U, bs, D]
        keys[inverse, do] = key
        kc, ks = quantize_keys(keys, bits)
        codes[ul, 0, ub, uh], kst[ul, ub, uh] = kc, ks

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
