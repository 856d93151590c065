"""Turn next-token logits into tokens: penalties, temperature, top-k/top-p/min-p, seeded draws, logprobs.

The sampler sees plain per-row data (SamplingRow), never the engine's objects. Each row draws from its own
torch.Generator, exactly once per sampled token, so a seeded request gives the same tokens whatever else
shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenmill.sampling_params import SamplingParams


@dataclass(slots=True)
class SamplingRow:
    """What the sampler needs to know of one row of logits: the request's parameters, its generator, and
    the tokens so far (read during the step, not kept)."""

    params: SamplingParams
    generator: torch.Generator | None
    token_ids: list[int]  # prompt, then the output so far: the repetition penalty's history
    num_prompt_tokens: int

    @property
    def output_token_ids(self) -> list[int]:
        """The output so far: the presence and frequency penalties' history."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far (min_tokens bans the end of sequence until it is reached)."""
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None  # of the sampled token, under the model's raw distribution
    rank: int | None = None
    top: list[tuple[int, float]] | None = None  # (token id, logprob), most likely first


class Sampler:
    def __init__(self, eos_token_ids: set[int]):
        self.eos_token_ids = sorted(eos_token_ids)

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[SampleResult]:
        """logits: [len(rows), vocab] float32; row i is sampled as rows[i] says."""
        if all(self._is_plain_greedy(state) for state in rows):
            return [SampleResult(t) for t in logits.argmax(dim=-1).tolist()]
        want_logprobs = any(state.params.logprobs is not None for state in rows)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        results = []
        for i, state in enumerate(rows):
            token = self._sample_row(logits[i].clone(), state)
            result = SampleResult(token)
            if raw_logprobs is not None and state.params.logprobs is not None:
                row = raw_logprobs[i]
                result.logprob = float(row[token])
                result.rank = int((row > row[token]).sum()) + 1
                if state.params.logprobs > 0:
                    values, ids = row.topk(state.params.logprobs)
                    result.top = list(zip(ids.tolist(), values.tolist(), strict=True))
                else:
                    result.top = []
            results.append(result)
        return results

    def _is_plain_greedy(self, state: SamplingRow) -> bool:
        p = state.params
        return (
            p.greedy
            and not p.needs_penalties
            and p.logprobs is None
            and state.num_output_tokens >= p.min_tokens
        )

    def _sample_row(self, row: torch.Tensor, state: SamplingRow) -> int:
        p = state.params
        if state.num_output_tokens < p.min_tokens:  # no end of sequence before min_tokens
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
            banned = [t for t in banned if t < row.shape[0]]
            if banned:
                row[banned] = float("-inf")
        if p.needs_penalties:
            self._apply_penalties(row, state)
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
        return int(torch.multinomial(probs, 1, generator=state.generator))

    @staticmethod
    def _apply_penalties(row: torch.Tensor, state: SamplingRow) -> None:
        p = state.params
        if p.repetition_penalty != 1.0:  # HF/vLLM style, over prompt and output
            seen = torch.tensor(sorted(set(state.token_ids)), dtype=torch.long, device=row.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        # OpenAI style, over the output only
        if (p.presence_penalty or p.frequency_penalty) and state.num_output_tokens:
            out = torch.tensor(state.output_token_ids, dtype=torch.long, device=row.device)
            counts = torch.bincount(out, minlength=row.shape[0])[: row.shape[0]].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
