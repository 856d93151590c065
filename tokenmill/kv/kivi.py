"""KIVI KV formats (`kivi2`, `kivi4`): 2- or 4-bit keys quantized per channel, values per token, and a
full-precision residual for the newest, not yet full block of each sequence (KIVI, Liu et al. 2024).

Why per channel for keys: key outliers sit in fixed channels, so one (scale, min) per channel over a group of
tokens keeps the error of the other channels small; values have no such structure and are quantized per token.
A key group is one block (`block_size` tokens of one KV head): a block can only be quantized per channel once
all its tokens exist, so until it fills it stays in full precision (KIVI's residual window; here it is the
block being filled, 1 to `block_size` tokens).

Layout, per layer, head-major inside a block like every format (kv/cache.py):
  codes       uint8 `[blocks, Hkv, block_size, D * bits / 8]`, K and V alike: one row of bytes per token. With
              `per = 8 / bits` codes a byte and `span = D / per`, byte j holds channel `j + i * span` at bit
              `i * bits` (i < per), so unpacking one shift gives a contiguous run of channels (vector-friendly;
              int4's nibble layout is the `bits = 4` case).
  key stats   fp16 `[blocks, Hkv, D, 2]`: (scale, min) per channel over the block's tokens.
  value stats fp16 `[blocks, Hkv, block_size, G, 2]`: (scale, min) per token and group of `D / G` channels.
  residual    the activations' dtype, `[R, Hkv, block_size, D]` K and V: full-precision blocks, R of them.
  open_slot   int32 `[blocks]`: the residual holding a block that is still filling, or -1 (read packed).

Residual blocks belong to blocks while those fill: a block is *open* (its tokens live in a residual) from its
first write until the write that completes it *seals* it (quantizes the whole block, fused into the KV write
kernel) or until it is freed. All layers write the same slots, so the plan of one step's writes (`WritePlan`:
which blocks seal, which tokens go to which residual row) is made once per step by `KiviState.plan_writes`
before the layers run.

A full block may stay open longer (`KiviWindow`): the `window_blocks` newest full blocks of each sequence (KIVI's
full-precision window of recent tokens, R = 32-128 in the paper) and its first `sink_blocks` blocks (the
attention sinks StreamingLLM found: the first tokens take a large share of every query's attention, so their
error reaches every output). Such a block seals when the sequence's window moves past it, and a full block freed
while open is sealed first (`KVCache.release_block`), so a block the prefix cache keeps always holds its codes.
Why: on a small model a 2-bit key group over the newest tokens and the sinks is most of the quality loss
(kivi2 without a window: +28% perplexity on the default model). Each running sequence holds at most
`KiviWindow.blocks_per_seq` residual blocks; the engine reserves that many per sequence out of the byte budget.

A write into a sealed block below its end (a rolled-back speculative tail rewritten, a block left partly kept by
eviction) first *unseals* it: its tokens so far are dequantized into a fresh residual, and it seals again when it
fills (those tokens are quantized twice; rare). Eviction's moves (`move_into`) requantize the key group of a
sealed destination block with the moved token in it, and write values per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

KIVI_BITS = {"kivi2": 2, "kivi4": 4}


def kivi_value_group(head_dim: int, bits: int) -> int:
    """Channels per value group: up to 32 (KIVI's group size), dividing head_dim, and either a multiple or
    a divisor of the packing span (so a span of channels lies in one group or covers whole groups)."""
    per = 8 // bits
    if head_dim % per:
        raise ValueError(f"kv_cache_dtype kivi{bits} needs head_dim divisible by {per}, got {head_dim}")
    span = head_dim // per
    return next(g for g in (32, 16, 8, 4, 2, 1) if head_dim % g == 0 and (g % span == 0 or span % g == 0))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes `[..., D]` (uint8 < 2**bits) -> bytes `[..., D * bits / 8]` (layout in the module doc)."""
    per = 8 // bits
    span = codes.shape[-1] // per
    out = codes[..., :span].clone()
    for i in range(1, per):
        out |= codes[..., i * span : (i + 1) * span] << (i * bits)
    return out


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    mask = (1 << bits) - 1
    return torch.cat([(packed >> (i * bits)) & mask for i in range(8 // bits)], dim=-1)


def _affine(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp16-rounded (scale, min) as fp32, and the divisor (1 where the range is empty)."""
    scale, low = ((hi - lo) / ((1 << bits) - 1)).half().float(), lo.half().float()
    return scale, low, torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_keys(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A block of keys `[..., bs, D]` per channel: packed codes `[..., bs, D * bits / 8]` and fp16 (scale,
    min) `[..., D, 2]`. The C++ KV write computes the same codes (rounded half to even)."""
    x = x.float()
    scale, low, safe = _affine(x.amin(dim=-2), x.amax(dim=-2), bits)
    codes = torch.round((x - low.unsqueeze(-2)) / safe.unsqueeze(-2)).clamp_(0, (1 << bits) - 1)
    return pack_codes(codes.to(torch.uint8), bits), torch.stack([scale, low], dim=-1).half()


def dequantize_keys(packed: torch.Tensor, stats: torch.Tensor, bits: int) -> torch.Tensor:
    codes = unpack_codes(packed, bits).float()  # [..., bs, D]
    sm = stats.float()
    return codes * sm[..., 0].unsqueeze(-2) + sm[..., 1].unsqueeze(-2)


def quantize_values(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectors `[..., D]` per token and group of `group` channels: packed codes `[..., D * bits / 8]` and
    fp16 (scale, min) `[..., D / group, 2]`."""
    x = x.float()
    d = x.shape[-1]
    xg = x.view(*x.shape[:-1], d // group, group)
    scale, low, safe = _affine(xg.amin(dim=-1), xg.amax(dim=-1), bits)
    codes = torch.round((xg - low.unsqueeze(-1)) / safe.unsqueeze(-1)).clamp_(0, (1 << bits) - 1)
    return pack_codes(codes.to(torch.uint8).view(x.shape), bits), torch.stack([scale, low], dim=-1).half()


def dequantize_values(packed: torch.Tensor, stats: torch.Tensor, bits: int) -> torch.Tensor:
    codes = unpack_codes(packed, bits).float()
    groups = stats.shape[-2]
    sm = stats.float()
    cg = codes.view(*codes.shape[:-1], groups, -1)
    return (cg * sm[..., 0:1] + sm[..., 1:2]).view(codes.shape)


@dataclass(frozen=True)
class KiviWindow:
    """Which full blocks of a sequence stay in full precision (module doc): its first `sink_blocks` and its
    newest `window_blocks` full blocks. (0, 0) seals every block as soon as it fills."""

    window_blocks: int = 0
    sink_blocks: int = 0

    @classmethod
    def from_tokens(cls, window: int, sinks: int, block_size: int) -> KiviWindow:
        """Token counts (rounded up to whole blocks) -> blocks; ValueError names a negative count."""
        for name, value in (("kivi_window", window), ("kivi_sinks", sinks)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a number of tokens >= 0, got {value!r}")
        return cls(-(-window // block_size), -(-sinks // block_size))

    @property
    def blocks_per_seq(self) -> int:
        """Residual blocks one sequence may hold at once: its sinks, its window and the block filling."""
        return self.sink_blocks + self.window_blocks + 1

    def kept(self, block_table: list[int], num_slots: int, block_size: int) -> list[int]:
        """The full blocks of a sequence holding `num_slots` slots that stay open: sinks, then the window."""
        full = min(num_slots // block_size, len(block_table))
        sinks = min(self.sink_blocks, full)
        return block_table[:sinks] + block_table[max(sinks, full - self.window_blocks) : full]


@dataclass
class WritePlan:
    """One step's KV writes in a KIVI cache (the same for every layer)."""

    slot_mapping: torch.Tensor  # the step's slots, kept to check each layer writes the planned step
    res_rows: torch.Tensor  # [T] int64: residual row (r * bs + offset) of each token that stays open, else -1
    seal_blocks: torch.Tensor  # [S] int64: blocks this step completes (quantized after the write)
    seal_src: torch.Tensor  # [S, bs] int64: token index t >= 0 of the step, or -(residual row) - 1
    unseal_blocks: torch.Tensor  # [U] int64: sealed blocks written below their end: dequantized first
    unseal_res: torch.Tensor  # [U] int64: into these residuals


class KiviState:
    """Which blocks are open and in which residual; plans each step's writes (module doc). Host-side
    bookkeeping plus the `open_slot` tensor the attention kernels read."""

    def __init__(
        self,
        num_blocks: int,
        num_residual: int,
        block_size: int,
        device: torch.device,
        window: KiviWindow | None = None,
    ):
        if num_residual < 1:
            raise ValueError("a KIVI cache needs at least one full-precision residual block")
        self.block_size = block_size
        self.num_residual = num_residual
        self.window = window or KiviWindow()
        self.open_slot = torch.full((num_blocks,), -1, dtype=torch.int32, device=device)
        self.open: dict[int, int] = {}  # block -> residual
        self.full: set[int] = set()  # open blocks with every slot written (kept by a window; sealed if freed)
        self.free: list[int] = list(range(num_residual - 1, -1, -1))  # a stack: lowest first
        self.plan: WritePlan | None = None

    def _take(self) -> int:
        if not self.free:
            raise RuntimeError(
                f"all {self.num_residual} full-precision residual blocks of the KIVI cache are in use (one per "
                "sequence filling a block): run fewer sequences at once or size the residual for more"
            )
        return self.free.pop()

    def release(self, block_id: int) -> None:
        """A freed block gives back its residual (if it was still filling)."""
        r = self.open.pop(block_id, None)
        self.full.discard(block_id)
        if r is not None:
            self.free.append(r)
            self.open_slot[block_id] = -1

    def open_copy(self, src: int, dst: int) -> int | None:
        """Copy-on-write of block src into dst: dst's residual (a new one when src is open), else None."""
        self.release(dst)
        if src not in self.open:
            return None
        r = self._take()
        self.open[dst] = r
        self.open_slot[dst] = r
        if src in self.full:
            self.full.add(dst)
        return r

    def plan_writes(
        self, slot_mapping: torch.Tensor, seqs: Sequence[tuple[list[int], int]] = ()
    ) -> WritePlan:
        """Plan a step's writes (module doc) and update which blocks are open: the attention of every layer
        reads the state after the write. Call once per step, before the first layer writes. `seqs`: each
        sequence of the step as (block table, slots held after the step), for the window; without them every
        block seals as it fills."""
        bs = self.block_size
        keep: set[int] = set()
        leaving: list[int] = []  # open full blocks of the step's sequences that the window moved past
        if seqs and (self.window.window_blocks or self.window.sink_blocks):
            for table, slots in seqs:
                keep.update(self.window.kept(table, slots, bs))
            if self.full:
                held = set().union(*(table for table, _ in seqs))
                leaving = sorted(b for b in self.full if b in held and b not in keep)
        slots = slot_mapping.tolist()
        per_block: dict[int, list[tuple[int, int]]] = {}
        for t, s in enumerate(slots):
            if s >= 0:
                per_block.setdefault(s // bs, []).append((s % bs, t))
        changed: dict[int, int] = {}
        unseal_b: list[int] = []
        unseal_r: list[int] = []
        for b, items in per_block.items():  # residuals for unsealing come before this step frees any
            first = min(o for o, _ in items)
            if b not in self.open and first > 0:
                r = self._take()
                self.open[b] = r
                changed[b] = r
                unseal_b.append(b)
                unseal_r.append(r)
        res_rows = [-1] * len(slots)
        seal_b: list[int] = []
        seal_src: list[list[int]] = []
        released: list[int] = []
        opening: list[tuple[int, list[tuple[int, int]]]] = []
        for b in leaving:
            if b in per_block:  # written this step: planned with its writes below
                continue
            r = self.open.pop(b)
            self.full.discard(b)
            seal_b.append(b)
            seal_src.append([-(r * bs + o) - 1 for o in range(bs)])
            released.append(r)
            changed[b] = -1
        for b, items in per_block.items():
            r = self.open.get(b)
            fills = max(o for o, _ in items) == bs - 1
            if fills and b in keep:  # full, but the window keeps it open
                self.full.add(b)
            else:
                self.full.discard(b)
            if fills and b not in keep:  # the block fills: seal it
                src = [-1] * bs
                written = [False] * bs
                for o, t in items:
                    src[o], written[o] = t, True
                for o in range(bs):
                    if not written[o]:
                        if r is None:
                            raise RuntimeError(f"KIVI block {b} would seal with offset {o} never written")
                        src[o] = -(r * bs + o) - 1
                seal_b.append(b)
                seal_src.append(src)
                if r is not None:
                    released.append(r)
                    del self.open[b]
                changed[b] = -1
            elif r is None:
                opening.append((b, items))
            else:
                for o, t in items:
                    res_rows[t] = r * bs + o
        self.free.extend(reversed(released))  # reusable by this step's new blocks: seals read first
        for b, items in opening:
            r = self._take()
            self.open[b] = r
            changed[b] = r
            for o, t in items:
                res_rows[t] = r * bs + o
        if changed:
            idx = torch.tensor(list(changed), dtype=torch.long, device=self.open_slot.device)
            val = torch.tensor(list(changed.values()), dtype=torch.int32, device=self.open_slot.device)
            self.open_slot[idx] = val
        dev = slot_mapping.device
        self.plan = WritePlan(
            slot_mapping,
            torch.tensor(res_rows, dtype=torch.long, device=dev),
            torch.tensor(seal_b, dtype=torch.long, device=dev),
            torch.tensor(seal_src, dtype=torch.long, device=dev).view(len(seal_b), bs),
            torch.tensor(unseal_b, dtype=torch.long, device=dev),
            torch.tensor(unseal_r, dtype=torch.long, device=dev),
        )
        return self.plan

    def plan_for(self, slot_mapping: torch.Tensor) -> WritePlan:
        """The plan of the step that writes `slot_mapping` (made by `plan_writes`)."""
        plan = self.plan
        if plan is None or (
            plan.slot_mapping is not slot_mapping
            and (
                plan.slot_mapping.shape != slot_mapping.shape
                or not torch.equal(plan.slot_mapping, slot_mapping)
            )
        ):
            raise RuntimeError(
                "a KIVI cache is written per step: call KVCache.prepare_write(slot_mapping) once before the "
                "layers write those slots"
            )
        return plan
