"""Turn next-token logits into tokens: penalties, temperature, top-k/top-p/min-p, seeded draws, logprobs.

Each sequence draws from its own torch.Generator, exactly once per sampled token, so a seeded request
gives the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.engine.sequence import Sequence


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None  # of the sampled token, under the model's raw distribution
    rank: int | None = None
    top: list[tuple[int, float]] | None = None  # (token id, logprob), most likely first


class Sampler:
    def __init__(self, eos_token_ids: set[int]):
        self.eos_token_ids = sorted(eos_token_ids)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult]:
        """logits: [len(seqs), vocab] float32."""
        if all(self._is_plain_greedy(s) for s in seqs):
            return [SampleResult(t) for t in logits.argmax(dim=-1).tolist()]
        want_logprobs = any(s.params.logprobs is not None for s in seqs)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        results = []
        for i, seq in enumerate(seqs):
            token = self._sample_row(logits[i].clone(), seq)
            result = SampleResult(token)
            if raw_logprobs is not None and seq.params.logprobs is not None:
                row = raw_logprobs[i]
                result.logprob = float(row[token])
                result.rank = int((row > row[token]).sum()) + 1
                if seq.params.logprobs > 0:
                    values, ids = row.topk(seq.params.logprobs)
                    result.top = list(zip(ids.tolist(), values.tolist(), strict=True))
                else:
                    result.top = []
            results.append(result)
        return results

    def _is_plain_greedy(self, seq: Sequence) -> bool:
        p = seq.params
        return (
            p.greedy
            and not p.needs_penalties
            and p.logprobs is None
            and seq.num_output_tokens >= p.min_tokens
        )

    def _sample_row(self, row: torch.Tensor, seq: Sequence) -> int:
        p = seq.params
        if seq.num_output_tokens < p.min_tokens:  # no end of sequence before min_tokens
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
            banned = [t for t in banned if t < row.shape[0]]
            if banned:
                row[banned] = float("-inf")
        if p.needs_penalties:
            self._apply_penalties(row, seq)
        if p.greedy:
            return int(row.argmax())
        row = row / p.temperature
        if p.top_k > 0 and p.top_k < row.shape[0]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs > p.top_p  # keeps at least the top token
            probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        return int(torch.multinomial(probs, 1, generator=seq.generator))

    @staticmethod
    def _apply_penalties(row: torch.Tensor, seq: Sequence) -> None:
        p = seq.params
        if p.repetition_penalty != 1.0:  # HF/vLLM style, over prompt and output
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=row.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:  # OpenAI style, output only
            out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=row.device)
            counts = torch.bincount(out, minlength=row.shape[0])[: row.shape[0]].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
