"""Turns a ScheduledBatch into the step's flat tensors, runs the model over the KV cache, samples.

The batch is one ragged sequence of tokens, rows with few queries (decodes, verification rows) first so the
attention backend handles them in one kernel call. A row's new tokens take the next slots of its block
table after the slots it already holds, whatever their positions: positions (for rotary) and slots travel
separately, so a sequence whose cache was compacted by eviction holds fewer slots than it has seen tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.engine.sampling_rows import rows_from_seqs
from tokenmill.engine.scheduler import ScheduledBatch, ScheduledSeq
from tokenmill.engine.sequence import Sequence
from tokenmill.errors import NonFiniteLogitsError
from tokenmill.kv.cache import KVCache
from tokenmill.layers.attention import MAX_PAGED_QUERY_LEN, AttentionRow, build_attention_metadata
from tokenmill.layers.sampler import Sampler, SampleResult
from tokenmill.models.llama import LlamaModel


@dataclass
class StepLogits:
    """Logits of the rows a step asked for: `rows[i]` says which sequence and which of its query tokens."""

    logits: torch.Tensor  # [R, vocab] fp32
    rows: list[tuple[ScheduledSeq, int]]  # (scheduled sequence, index of the query token within its row)


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, sampler: Sampler):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = kv_cache.device
        self.sampler = sampler

    def run(self, batch: ScheduledBatch) -> dict[int, list[SampleResult]]:
        """One forward pass over the batch; the next token(s) of every sequence whose last known token was
        computed, keyed by seq_id: one token, or for a sequence with drafts the accepted drafts and the
        target's own next token (Sampler.verify)."""
        step = self.execute(batch)
        # A row holding NaN or inf would sample garbage (or raise): name such rows, so that only they fail. The
        # row sum is non-finite exactly then (model logits are far from overflowing it), at 1/30 of the cost
        # of isfinite over every logit.
        bad = ~torch.isfinite(step.logits.sum(dim=-1))
        if bool(bad.any()):
            raise NonFiniteLogitsError(
                sorted({step.rows[i][0].seq.seq_id for i in bad.nonzero()[:, 0].tolist()})
            )
        if any(s.seq.wants_prompt_logprobs for s in batch.seqs):
            self._score_prompts(step)
        last = [
            i
            for i, (s, j) in enumerate(step.rows)
            if j == s.num_new_tokens - 1 and s.samples and not s.seq.draft_token_ids
        ]
        seqs = [step.rows[i][0].seq for i in last]
        logits = step.logits if len(last) == len(step.rows) else step.logits[last]
        results = self.sampler(logits, rows_from_seqs(seqs)) if seqs else []
        out = {seq.seq_id: [r] for seq, r in zip(seqs, results, strict=True)}
        if not any(s.seq.draft_token_ids for s in batch.seqs):
            return out  # no speculative rows this step
        start = 0
        for s, rows in _groups(step.rows):
            seq = s.seq
            if seq.draft_token_ids:
                state = rows_from_seqs([seq])[0]
                out[seq.seq_id] = self.sampler.verify(
                    step.logits[start : start + rows], state, seq.draft_token_ids
                )
            start += rows
        return out

    def _score_prompts(self, step: StepLogits) -> None:
        """Prompt logprobs: each prompt row's logits score the prompt token after it (appended to the
        sequence's prompt_scores in order; rows a recompute after preemption repeats are skipped)."""
        picks: list[tuple[int, int, Sequence]] = []  # (logits row, target token, sequence)
        next_target: dict[int, int] = {}  # seq_id -> the prompt position its next new score is for
        for r, (s, j) in enumerate(step.rows):
            seq = s.seq
            if seq.prompt_scores is None:
                continue
            expected = next_target.setdefault(seq.seq_id, len(seq.prompt_scores) + 1)
            target = seq.num_computed_tokens + j + 1  # the position this row predicts
            if target == expected and target < seq.num_prompt_tokens:
                picks.append((r, seq.token_ids[target], seq))
                next_target[seq.seq_id] = expected + 1
        if not picks:
            return
        rows = torch.tensor([r for r, _, _ in picks], dtype=torch.long, device=step.logits.device)
        targets = [t for _, t, _ in picks]
        k = max(seq.params.prompt_logprobs or 0 for _, _, seq in picks)
        for (_, _, seq), result in zip(picks, self.sampler.score(step.logits[rows], targets, k), strict=True):
            want = seq.params.prompt_logprobs or 0
            result.top = (result.top or [])[:want]
            seq.prompt_scores.append(result)

    def execute(self, batch: ScheduledBatch, layers: list[int] | None = None) -> StepLogits:
        """The forward pass alone: logits of each sequence's last `num_logits` query tokens, for the
        sequences that sample (or ask for more rows, as speculative verification does). `layers`: the model
        layers to run; default: those the KV cache holds (all, unless the engine skips some)."""
        if layers is None:
            layers = self.kv_cache.model_layers
        self.kv_cache.copy_blocks(batch.copies)  # copy-on-write before anything writes into dst
        ordered = sorted(batch.seqs, key=lambda s: s.num_new_tokens > MAX_PAGED_QUERY_LEN)  # stable
        ids: list[int] = []
        pos: list[int] = []
        rows: list[AttentionRow] = []
        wanted: list[tuple[ScheduledSeq, int]] = []
        logits_rows: list[int] = []
        for s in ordered:
            seq, n = s.seq, s.num_new_tokens
            p0, start = seq.num_computed_tokens, len(ids)
            ids.extend(
                (seq.token_ids[p0:] + seq.draft_token_ids)[:n]
                if seq.draft_token_ids
                else seq.token_ids[p0 : p0 + n]
            )
            pos.extend(range(p0, p0 + n))
            rows.append(AttentionRow(n, seq.num_kv_slots + n, seq.block_table, s.score_from))
            for j in range(n - s.num_logits, n):
                wanted.append((s, j))
                logits_rows.append(start + j)
        dev = self.device
        meta = build_attention_metadata(rows, self.block_size, dev)
        # KIVI plans the step's writes once, for every layer, keeping each sequence's window open
        self.kv_cache.prepare_write(meta.slot_mapping, [(r.block_table, r.seq_len) for r in rows])
        if meta.wants_scores:  # KV eviction ranks tokens by the attention they get: the kernels add it here
            spec = self.kv_cache.spec
            longest = max(meta.seq_lens_host)
            meta.scores = torch.zeros(spec.num_layers, len(rows), spec.num_kv_heads, longest, device=dev)
        logits = self.model.forward(
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(pos, dtype=torch.long, device=dev),
            meta,
            self.kv_cache,
            torch.tensor(logits_rows, dtype=torch.long, device=dev),
            layers,
        )
        if meta.scores is not None:
            for b, s in enumerate(ordered):
                if s.score_from >= 0:
                    s.attention_scores = meta.scores[:, b, :, : meta.seq_lens_host[b]]
        return StepLogits(logits, wanted)


def _groups(rows: list[tuple[ScheduledSeq, int]]):
    """(scheduled sequence, number of its logits rows), in order: a sequence's rows are consecutive."""
    i = 0
    while i < len(rows):
        s = rows[i][0]
        j = i
        while j < len(rows) and rows[j][0] is s:
            j += 1
        yield s, j - i
        i = j
