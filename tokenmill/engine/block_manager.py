"""Paged KV blocks: allocation, ref counts, copy-on-write, and the automatic prefix cache.

A full block's hash chains its parent's hash with its token ids (and an extra key such as the KV format),
so equal hashes mean equal prefixes; hits are still checked against the stored tokens. Blocks whose ref
count drops to zero go to a free list in LRU order but keep their hash: a later request with the same
prefix takes them back until they are evicted for reuse, least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from tokenmill.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] | None = None  # kept for full cached blocks, to verify hash hits


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, found in the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        extra_key: str = "",
        on_free: Callable[[int], None] | None = None,
    ):
        if num_blocks < 1:
            raise ValueError("the KV cache must hold at least one block")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.root_hash = hash(("tokenmill-kv", extra_key))
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # prefix hash -> block id
        self.stats = PrefixCacheStats()
        self.peak_used_blocks = 0  # high-water mark, for benchmarks of how much a KV format/policy holds
        # told each block whose ref count drops to zero (KVCache.release_block: a KIVI block still filling
        # gives back its full-precision residual)
        self.on_free = on_free

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _chain(self, parent: int, tokens: tuple[int, ...]) -> int:
        return hash((parent, tokens))

    # ---- allocation ----------------------------------------------------------------------------
    def _pop_free(self) -> int:
        block_id, _ = self.free_ids.popitem(last=False)
        self._unhash(block_id)  # evict it from the prefix cache
        self.blocks[block_id].ref_count = 1
        self.peak_used_blocks = max(self.peak_used_blocks, self.num_used_blocks)
        return block_id

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_ids[block_id]
        block.ref_count += 1

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} released more often than taken"
        if block.ref_count == 0:
            self.free_ids[block_id] = None  # most recently freed: evicted last
            if self.on_free is not None:
                self.on_free(block_id)

    def find_cached_prefix(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """Blocks (and their hashes) that already hold a prefix of seq's tokens. At least one token
        is left uncached so that the step computes the logits of the last one."""
        if not self.enable_prefix_caching or seq.kv_policy.evicts:  # an evicting policy scores its own prompt
            return [], []
        bs = self.block_size
        tokens = seq.token_ids
        ids: list[int] = []
        hashes: list[int] = []
        parent = self.root_hash
        for i in range((len(tokens) - 1) // bs):
            chunk = tuple(tokens[i * bs : (i + 1) * bs])
            h = self._chain(parent, chunk)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            ids.append(block_id)
            hashes.append(h)
            parent = h
        return ids, hashes

    def allocate_prefix(self, seq: Sequence, ids: list[int], hashes: list[int]) -> None:
        """Give a new sequence the cached blocks found for it; they count as computed."""
        assert not seq.block_table
        for block_id in ids:
            self._take(block_id)
        seq.block_table = list(ids)
        seq.block_hashes = list(hashes)
        seq.num_computed_tokens = len(ids) * self.block_size
        self.stats.queries += seq.num_tokens
        self.stats.hits += seq.num_computed_tokens

    def needed_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Free blocks needed to write the next num_new_tokens tokens after the slots seq holds."""
        total = self.blocks_for(seq.num_kv_slots + num_new_tokens)
        needed = max(0, total - len(seq.block_table))
        if self._shared_write_block(seq) is not None:
            needed += 1  # copy-on-write of a shared, partly filled block
        return needed

    def _shared_write_block(self, seq: Sequence) -> int | None:
        """Index in the table of the first block written next, if another sequence shares it."""
        idx = seq.num_kv_slots // self.block_size
        if idx < len(seq.block_table) and self.blocks[seq.block_table[idx]].ref_count > 1:
            return idx
        return None

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.needed_blocks(seq, num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Make room for the next tokens. Returns (src, dst) block copies the runner must do first."""
        copies: list[tuple[int, int]] = []
        idx = self._shared_write_block(seq)
        if idx is not None:
            src = seq.block_table[idx]
            dst = self._pop_free()
            self._release(src)
            seq.block_table[idx] = dst
            copies.append((src, dst))
        total = self.blocks_for(seq.num_kv_slots + num_new_tokens)
        while len(seq.block_table) < total:
            seq.block_table.append(self._pop_free())
        return copies

    def fork(self, parent: Sequence, child: Sequence, num_tokens: int) -> None:
        """Let child share parent's blocks for its first num_tokens tokens (already computed by parent)."""
        assert not child.block_table and parent.num_computed_tokens >= num_tokens
        n = self.blocks_for(num_tokens)
        for block_id in parent.block_table[:n]:
            self._take(block_id)
        child.block_table = parent.block_table[:n]
        child.block_hashes = parent.block_hashes[: num_tokens // self.block_size]
        child.num_computed_tokens = num_tokens

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Roll back seq's last num_tokens tokens (rejected speculative tokens): they leave token_ids, the
        computed ones give back their slots, blocks left empty are freed, and a block that is no longer full
        of kept tokens loses its prefix hash, so the cache never serves the rolled-back tokens."""
        if num_tokens <= 0:
            return
        if num_tokens > seq.num_output_tokens:
            raise ValueError(
                f"cannot roll back {num_tokens} tokens: only {seq.num_output_tokens} were generated"
            )
        del seq.token_ids[-num_tokens:]
        seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens)
        self.release_unused(seq)

    def release_unused(self, seq: Sequence) -> None:
        """Free the blocks past seq's held slots (slots written for tokens that were then rejected) and drop
        the prefix hash of a block no longer full of held tokens."""
        keep_blocks = self.blocks_for(seq.num_kv_slots)
        for block_id in reversed(seq.block_table[keep_blocks:]):
            self._unhash(block_id)
            self._release(block_id)
        del seq.block_table[keep_blocks:]
        full = seq.num_kv_slots // self.block_size
        for block_id in seq.block_table[full:]:
            self._unhash(block_id)
        del seq.block_hashes[full:]

    def _unhash(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = None
            block.token_ids = None

    def free(self, seq: Sequence) -> None:
        """Drop seq's references, tail first, so a prefix's tail is evicted before its head."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.block_hashes = []

    def commit(self, seq: Sequence) -> None:
        """Register the blocks that became full of computed tokens in the prefix cache."""
        if not self.enable_prefix_caching or seq.num_dropped_slots or seq.kv_policy.evicts:
            return  # a compressed (or soon compressed) cache is no prefix: its blocks get rewritten
        bs = self.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        parent = seq.block_hashes[-1] if seq.block_hashes else self.root_hash
        for i in range(len(seq.block_hashes), full):
            chunk = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = self._chain(parent, chunk)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.cached:
                block.hash, block.token_ids = h, chunk
                self.cached[h] = block.block_id
            seq.block_hashes.append(h)
            parent = h
