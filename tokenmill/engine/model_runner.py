"""Owns the KV cache; turns a ScheduledBatch into flat tensors, runs the model, samples."""

from __future__ import annotations

import torch

from tokenmill.engine.sampling_rows import rows_from_seqs
from tokenmill.engine.scheduler import ScheduledBatch, ScheduledSeq
from tokenmill.layers.attention import AttentionMetadata, PrefillSpan
from tokenmill.layers.sampler import Sampler, SampleResult
from tokenmill.models.llama import LlamaModel
from tokenmill.models.model_config import ModelConfig


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        sampler: Sampler,
    ):
        self.model = model
        self.block_size = block_size
        self.device = device
        self.sampler = sampler
        shape = (config.num_layers, 2, num_blocks, config.num_kv_heads, block_size, config.head_dim)
        # The C++ decode kernel reads only slots that were written, so the cache can start uninitialized
        # (no 2 GiB memset at start-up; pages are committed as they fill). The torch path attends over
        # whole blocks under a mask, and NaN garbage would leak through it: zero the cache for that path.
        reads_only_written = getattr(model.attention, "decode_kernel", None) is not None
        self.kv_cache = (torch.empty if reads_only_written else torch.zeros)(
            shape, dtype=dtype, device=device
        )
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(config.num_layers)]

    def run(self, batch: ScheduledBatch) -> dict[int, SampleResult]:
        """One forward pass over the batch. Returns sampled tokens keyed by seq_id."""
        for src, dst in batch.copies:  # copy-on-write before anything writes into dst
            self.kv_cache[:, :, dst].copy_(self.kv_cache[:, :, src])
        decodes = [s for s in batch.seqs if s.num_new_tokens == 1]
        prefills = [s for s in batch.seqs if s.num_new_tokens > 1]
        ordered = decodes + prefills
        input_ids, positions, meta = self._prepare(decodes, prefills)
        sampling = [(row, s) for row, s in self._last_token_rows(ordered) if s.samples]
        logits_rows = torch.tensor([row for row, _ in sampling], dtype=torch.long, device=self.device)
        seqs = [s.seq for _, s in sampling]
        logits = self.model.forward(input_ids, positions, meta, self.kv_caches, logits_rows)
        results = self.sampler(logits, rows_from_seqs(seqs)) if seqs else []
        return {seq.seq_id: r for seq, r in zip(seqs, results, strict=True)}

    @staticmethod
    def _last_token_rows(ordered: list[ScheduledSeq]):
        """Yield (row of each sequence's last query token, scheduled seq)."""
        end = 0
        for s in ordered:
            end += s.num_new_tokens
            yield end - 1, s

    def _prepare(
        self, decodes: list[ScheduledSeq], prefills: list[ScheduledSeq]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs, dev = self.block_size, self.device
        ids: list[int] = []
        pos: list[int] = []
        slot_blocks: list[int] = []
        for s in decodes:
            seq = s.seq
            p = seq.num_computed_tokens
            ids.append(seq.token_ids[p])
            pos.append(p)
            slot_blocks.append(seq.block_table[p // bs])
        max_blocks = max((len(s.seq.block_table) for s in decodes), default=0)
        tables = [s.seq.block_table + [0] * (max_blocks - len(s.seq.block_table)) for s in decodes]
        context_lens = [s.seq.num_computed_tokens + 1 for s in decodes]

        spans: list[PrefillSpan] = []
        start = len(decodes)
        for s in prefills:
            seq = s.seq
            p0, n = seq.num_computed_tokens, s.num_new_tokens
            ids.extend(seq.token_ids[p0 : p0 + n])
            positions = range(p0, p0 + n)
            pos.extend(positions)
            table = seq.block_table
            slot_blocks.extend(table[p // bs] for p in positions)
            ctx = p0 + n
            mask = None
            if p0 > 0:  # queries also see the cached prefix: causal mask shifted by p0
                mask = torch.ones(n, ctx, dtype=torch.bool, device=dev).tril(diagonal=p0)
            used = table[: -(-ctx // bs)]
            spans.append(PrefillSpan(start, n, ctx, torch.tensor(used, dtype=torch.long, device=dev), mask))
            start += n

        positions_t = torch.tensor(pos, dtype=torch.long, device=dev)
        meta = AttentionMetadata(
            slot_blocks=torch.tensor(slot_blocks, dtype=torch.long, device=dev),
            slot_offsets=positions_t % bs,
            num_decode_tokens=len(decodes),
            decode_block_tables=torch.tensor(tables, dtype=torch.long, device=dev).view(
                len(decodes), max_blocks
            ),
            decode_context_lens=torch.tensor(context_lens, dtype=torch.long, device=dev),
            prefills=spans,
        )
        return (
            torch.tensor(ids, dtype=torch.long, device=dev),
            positions_t,
            meta,
        )
