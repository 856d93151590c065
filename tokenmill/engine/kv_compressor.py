"""Applies each sequence's KV eviction policy around the engine's step.

Before a step, `mark` asks the runner for the attention weights a policy ranks tokens by (every query for H2O,
the prompt's observation window for SnapKV). After it, `update` records the new slots (their positions) and
the weights they received, and when a sequence holds more slots than its budget allows it evicts: each (layer,
KV head) keeps its own `budget` tokens, the kept tokens are compacted into the lowest slots (kv/eviction.py),
and whole blocks go back to the pool. Every policy first evicts when the prompt is done (the prompt is attended
in full while it is computed, so the result does not depend on how it was chunked); SnapKV only then, streaming
and H2O also while generating, a block's worth of tokens at a time, so memory stays flat however long a request
runs. A preempted sequence is recomputed from its tokens and compressed again at the end of that recompute,
so its continuation may differ from an uninterrupted run: eviction is not schedule-invariant past a preemption.

Its blocks are rewritten in place, so an evicting sequence never shares one: it neither takes nor registers
prefix-cache blocks, and its n > 1 siblings each compute (and score) the prompt themselves rather than fork it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.scheduler import ScheduledSeq
from tokenmill.engine.sequence import Sequence
from tokenmill.kv.cache import KVCache
from tokenmill.kv.eviction import SeqKVState, apply_moves_to_state, hole_fill_moves, select_keep


@dataclass
class EvictionStats:
    evictions: int = 0  # compactions done
    evicted_tokens: int = 0  # slots freed, summed over sequences (per head and layer: all heads evict alike)
    blocks_freed: int = 0


class KVCompressor:
    def __init__(self, kv_cache: KVCache, block_manager: BlockManager):
        self.kv_cache = kv_cache
        self.block_manager = block_manager
        self.stats = EvictionStats()

    def mark(self, scheduled: ScheduledSeq) -> None:
        """Ask for this row's attention weights if its policy ranks tokens by them."""
        seq = scheduled.seq
        policy = seq.kv_policy
        if not policy.needs_scores:
            return
        prompt_len = seq.num_prompt_tokens
        first = policy.scored_from(prompt_len)
        p0 = seq.num_computed_tokens
        if policy.kind == "snapkv" and p0 >= prompt_len:
            return  # SnapKV scores the prompt's observation window only
        if first < p0 + scheduled.num_new_tokens:
            scheduled.score_from = max(0, first - p0)

    def update(self, scheduled: ScheduledSeq, computed_before: int) -> None:
        """After the step: book the sequence's new slots and weights, then evict if over budget."""
        seq = scheduled.seq
        policy = seq.kv_policy
        if not policy.evicts or seq.is_finished:
            return
        spec = self.kv_cache.spec
        state = seq.kv_state
        held_before = computed_before - seq.num_dropped_slots
        if state is None:
            state = seq.kv_state = SeqKVState.empty(spec.num_layers, spec.num_kv_heads, self.kv_cache.device)
            state.append(0, held_before)  # slots taken before any bookkeeping (uncompressed: slot = position)
        state.truncate(held_before)
        added = seq.num_kv_slots - held_before
        state.append(seq.num_computed_tokens - added, added)
        if scheduled.attention_scores is not None:
            state.add_scores(scheduled.attention_scores)
            scheduled.attention_scores = None
        prompt_len = seq.num_prompt_tokens
        keep = policy.budget_tokens(prompt_len)
        held = seq.num_kv_slots
        # The whole prompt stays visible while it is computed (chunk by chunk), so what is kept never depends
        # on how the scheduler split the prompt; eviction starts once it is done.
        prompt_done = seq.num_computed_tokens >= prompt_len
        prompt_end = prompt_done and not state.prompt_compressed
        if policy.during_decode:
            due = held > keep and (
                prompt_end or (prompt_done and held - keep >= self.block_manager.block_size)
            )
        else:  # snapkv: once, at the end of the prompt
            due = prompt_end and held > keep
        if due:
            self._evict(seq, keep, prompt_len)
        if prompt_end:
            state.prompt_compressed = True

    def _evict(self, seq: Sequence, keep: int, prompt_len: int) -> None:
        state = seq.kv_state
        assert state is not None and state.length == seq.num_kv_slots
        mask = select_keep(seq.kv_policy, state, keep, prompt_len, seq.num_computed_tokens - 1)
        moves = hole_fill_moves(mask, keep)
        self.kv_cache.move_per_head(seq.block_table, *moves)
        apply_moves_to_state(state, moves, keep)
        dropped = seq.num_kv_slots - keep
        blocks_before = len(seq.block_table)
        seq.num_dropped_slots += dropped
        self.block_manager.release_unused(seq)
        self.stats.evictions += 1
        self.stats.evicted_tokens += dropped
        self.stats.blocks_freed += blocks_before - len(seq.block_table)
