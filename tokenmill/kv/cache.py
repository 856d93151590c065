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

_FORMAT_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class KVCacheSpec:
    """What a cache holds and how it is laid out; enough to size it before allocating it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def format(self) -> str:
        """Name of the element format; part of the prefix-cache key, since blocks differ by format."""
        return _FORMAT_NAMES.get(self.dtype, str(self.dtype))

    @property
    def bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * element

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
        self.data = (torch.zeros if zero else torch.empty)(shape, dtype=spec.dtype, device=device)

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of one layer, each `[num_blocks, num_kv_heads, block_size, head_dim]`, views of the cache."""
        return self.data[index, 0], self.data[index, 1]

    # ---- writes ---------------------------------------------------------------------------------
    def write(self, index: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store k, v `[T, num_kv_heads, head_dim]` of layer `index` at their slots (negative: skipped)."""
        k_cache, v_cache = self.layer(index)
        keep = slot_mapping >= 0
        if not bool(keep.all()):
            k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
        bs = self.block_size
        blocks, offsets = slot_mapping // bs, slot_mapping % bs
        k_cache[blocks, :, offsets] = k.to(k_cache.dtype)
        v_cache[blocks, :, offsets] = v.to(v_cache.dtype)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks (copy-on-write before a shared block is written), all layers."""
        for src, dst in pairs:
            self.data[:, :, dst].copy_(self.data[:, :, src])

    def move_slots(self, src: torch.Tensor, dst: torch.Tensor, head: int | None = None) -> None:
        """Copy the tokens at slots `src` to slots `dst` in every layer, all heads or one: how eviction
        compacts a sequence's kept tokens into fewer blocks. Sources are read before any write."""
        bs = self.block_size
        sb, so, db, do = src // bs, src % bs, dst // bs, dst % bs
        heads = slice(None) if head is None else head
        values = self.data[:, :, sb, heads, so].clone()
        self.data[:, :, db, heads, do] = values

    # ---- reads ----------------------------------------------------------------------------------
    def gather(self, index: int, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A sequence's first `length` slots of layer `index` as contiguous `[num_kv_heads, length,
        head_dim]` K and V (a copy; the reference path and tests read through it)."""
        k_cache, v_cache = self.layer(index)
        blocks = block_table[: -(-length // self.block_size)]
        hkv, d = self.spec.num_kv_heads, self.spec.head_dim
        k = k_cache[blocks].transpose(0, 1).reshape(hkv, -1, d)[:, :length]
        v = v_cache[blocks].transpose(0, 1).reshape(hkv, -1, d)[:, :length]
        return k, v
