"""Continuous batching under a per-step token budget.

Every sequence is "computed up to num_computed_tokens"; a step advances some sequences by some tokens.
Running sequences go first (a decode is one token), then waiting ones get prompt chunks from what is
left of the budget (chunked prefill: chunks and decodes share one forward pass). When KV blocks run out,
the most recently admitted running sequence is preempted: its blocks are freed and it is recomputed
later (its full blocks usually come back from the prefix cache). Nothing is ever dropped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # query tokens: token_ids[num_computed : num_computed + num_new_tokens]
    extra_logits: int = 0  # logits wanted for this many query tokens before the last (verification rows)
    score_from: int = -1  # first query whose attention weights the runner reports (KV eviction); -1: none
    attention_scores: torch.Tensor | None = None  # set by the runner: [layers, kv heads, slots] weights

    @property
    def samples(self) -> bool:
        """True when this step computes the sequence's last known token (and its drafts, if any), so the
        next one is sampled."""
        seq = self.seq
        return seq.num_computed_tokens + self.num_new_tokens == seq.num_tokens + len(seq.draft_token_ids)

    @property
    def num_logits(self) -> int:
        """How many of the last query tokens need logits: none while a prompt is still being chunked, except
        for a request that asked for prompt logprobs (every prompt token's row then)."""
        if self.seq.wants_prompt_logprobs:
            return self.num_new_tokens
        return min(self.num_new_tokens, 1 + self.extra_logits) if self.samples else 0


@dataclass
class ScheduledBatch:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write block copies, src -> dst
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int, max_num_seqs: int):
        self.block_manager = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.reset_kv()
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)
        self.num_preemptions += 1

    def schedule(self, budget: int | None = None) -> ScheduledBatch:
        """The next step's work under `budget` tokens (default and ceiling: max_num_batched_tokens)."""
        bm = self.block_manager
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens if budget is None else min(budget, self.max_num_batched_tokens)

        # 1. Running sequences, oldest first; preempt from the newest end when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens + len(seq.draft_token_ids), budget)
            if seq.draft_token_ids:  # drafts ride behind the sequence's next token; keep those that fit
                del seq.draft_token_ids[max(0, num_new - (seq.num_tokens - seq.num_computed_tokens)) :]
            while not bm.can_append(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim, batch)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # seq preempted itself: every later one is gone too
            batch.copies += bm.append_slots(seq, num_new)
            batch.seqs.append(ScheduledSeq(seq, num_new, extra_logits=len(seq.draft_token_ids)))
            budget -= num_new
            i += 1

        # 2. Waiting sequences, first come first served, unless this step had to preempt.
        if batch.preempted:
            return batch
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            if not self._attach_blocks(seq):
                skipped.append(seq)  # an n > 1 sibling waiting for its parent's prompt
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not bm.can_append(seq, num_new):
                bm.free(seq)
                seq.reset_kv()
                self.waiting.appendleft(seq)
                break
            batch.copies += bm.append_slots(seq, num_new)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        return batch

    def _attach_blocks(self, seq: Sequence) -> bool:
        """Before first scheduling: share the parent's prompt blocks (n > 1) or take prefix-cache hits.
        Returns False if seq must wait for its parent to compute the prompt."""
        bm = self.block_manager
        parent = seq.fork_parent
        if parent is not None:
            shared = seq.num_prompt_tokens - 1  # the last prompt token is recomputed for its own logits
            if parent.status is not SequenceStatus.FINISHED:
                if parent.status is not SequenceStatus.RUNNING or parent.num_computed_tokens < shared:
                    return False
                bm.fork(parent, seq, shared)
                seq.num_cached_tokens = shared
                seq.fork_parent = None
                return True
            seq.fork_parent = None  # parent finished early: fall back to the prefix cache
        if seq.num_computed_tokens == 0 and not seq.block_table and not seq.wants_prompt_logprobs:
            # (prompt logprobs need every prompt token computed: no prefix-cache hits for them)
            ids, hashes = bm.find_cached_prefix(seq)
            bm.allocate_prefix(seq, ids, hashes)
            if seq.num_output_tokens == 0:
                seq.num_cached_tokens = seq.num_computed_tokens
        return True
