"""Turn next-token logits into tokens: penalties, temperature, top-k/top-p/min-p, seeded draws, logprobs.

The sampler sees plain per-row data (SamplingRow), never the engine's objects. Each row draws from its own
torch.Generator, exactly once per sampled token, so a seeded request gives the same tokens whatever else
shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
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
    # Grammar constraint: packed allowed-token bitmasks [positions, ceil(vocab / 32)] int32 (bit i of word w
    # allows token 32 * w + i); row j masks the j-th verified position (0: the next token). None: free.
    bitmask: torch.Tensor | None = None

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
            results.append(
                self._result(token, None if raw_logprobs is None else raw_logprobs[i], state.params.logprobs)
            )
        return results

    def _is_plain_greedy(self, state: SamplingRow) -> bool:
        p = state.params
        return (
            p.greedy
            and not p.needs_penalties
            and p.logprobs is None
            and state.num_output_tokens >= p.min_tokens
            and state.bitmask is None
            and not p.logit_bias
        )

    def _sample_row(self, row: torch.Tensor, state: SamplingRow) -> int:
        greedy, probs = self._distribution(row, state, None if state.bitmask is None else state.bitmask[0])
        if probs is None:
            return greedy
        return int(torch.multinomial(probs, 1, generator=state.generator))

    def _distribution(
        self, row: torch.Tensor, state: SamplingRow, bitmask: torch.Tensor | None = None
    ) -> tuple[int, torch.Tensor | None]:
        """What this row samples from after every parameter applies: (argmax, None) when greedy, else
        (-1, the probabilities). `row` is modified. `bitmask`: the grammar's allowed tokens (packed words)."""
        p = state.params
        if bitmask is not None:
            apply_bitmask(row, bitmask)
        if p.logit_bias:
            ids = [t for t in p.logit_bias if t < row.shape[0]]
            if ids:
                index = torch.tensor(ids, dtype=torch.long, device=row.device)
                bias = torch.tensor([p.logit_bias[t] for t in ids], dtype=row.dtype, device=row.device)
                row.index_add_(0, index, bias)
        if state.num_output_tokens < p.min_tokens:  # no end of sequence before min_tokens
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else self.eos_token_ids)
            banned = [t for t in banned if t < row.shape[0]]
            if banned:
                kept = row[banned].clone() if bitmask is not None else None
                row[banned] = float("-inf")
                if kept is not None and bool(torch.isneginf(row).all()):
                    row[banned] = kept  # the grammar allows nothing else: it wins over min_tokens
        if p.needs_penalties:
            self._apply_penalties(row, state)
        if p.greedy:
            return int(row.argmax()), None
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
        return -1, probs

    def verify(self, logits: torch.Tensor, state: SamplingRow, drafts: list[int]) -> list[SampleResult]:
        """Speculative verification of one sequence: `logits` [k + 1, vocab] are the target's next-token
        logits after its last token and after each of the k `drafts`. Returns the emitted tokens: the accepted
        drafts, then one token from the target (the correction at the first rejection, or a bonus token when
        all k are accepted).

        Greedy: a draft is accepted while it equals the target's argmax. Sampling (the drafts are point
        proposals, q = 1 on the draft): draft d is accepted with probability p(d); on rejection the token comes
        from the residual max(0, p - q) renormalised, i.e. p without d. So every emitted token is distributed
        exactly as without speculation, whatever the parameters (penalties and min_tokens see the drafts
        before each row, as they would see the tokens had they been generated one by one)."""
        assert logits.shape[0] == len(drafts) + 1
        base = list(state.token_ids)
        raw = torch.log_softmax(logits, dim=-1) if state.params.logprobs is not None else None
        emitted: list[SampleResult] = []
        for j in range(len(drafts) + 1):
            # With a grammar, the masks stop after the first draft the grammar refuses (that draft has
            # probability 0 under its mask, so verification stops there) or at an end-of-sequence draft (the
            # sequence ends with it; the tokens emitted so far are all accepted drafts).
            if state.bitmask is not None and j >= state.bitmask.shape[0]:
                break
            row_state = SamplingRow(state.params, state.generator, base + drafts[:j], state.num_prompt_tokens)
            mask = None if state.bitmask is None else state.bitmask[j]
            greedy, probs = self._distribution(logits[j].clone(), row_state, mask)
            draft = drafts[j] if j < len(drafts) else None
            if probs is None:
                token = greedy
            elif draft is None:
                token = int(torch.multinomial(probs, 1, generator=state.generator))
            elif float(torch.rand((), generator=state.generator)) < float(probs[draft]):
                token = draft
            else:
                residual = probs.clone()
                residual[draft] = 0.0
                token = int(torch.multinomial(residual, 1, generator=state.generator))
            emitted.append(self._result(token, None if raw is None else raw[j], state.params.logprobs))
            if token != draft:
                break
        return emitted

    @staticmethod
    def score(logits: torch.Tensor, targets: Sequence[int], k: int) -> list[SampleResult]:
        """Teacher forcing: each row's logprob, rank and top-k for a given target token (prompt logprobs)."""
        raw = torch.log_softmax(logits.float(), dim=-1)
        want = torch.tensor(list(targets), dtype=torch.long, device=raw.device).unsqueeze(1)
        chosen = raw.gather(1, want)
        ranks = ((raw > chosen).sum(dim=1) + 1).tolist()
        top = raw.topk(k, dim=-1) if k > 0 else None
        results = []
        for i, t in enumerate(targets):
            pairs = (
                list(zip(top.indices[i].tolist(), top.values[i].tolist(), strict=True))
                if top is not None
                else []
            )
            results.append(SampleResult(t, float(chosen[i, 0]), int(ranks[i]), pairs))
        return results

    @staticmethod
    def _result(token: int, raw_row: torch.Tensor | None, num_logprobs: int | None) -> SampleResult:
        result = SampleResult(token)
        if raw_row is not None and num_logprobs is not None:
            result.logprob = float(raw_row[token])
            result.rank = int((raw_row > raw_row[token]).sum()) + 1
            if num_logprobs > 0:
                values, ids = raw_row.topk(num_logprobs)
                result.top = list(zip(ids.tolist(), values.tolist(), strict=True))
            else:
                result.top = []
        return result

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


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Packed int32 words -> [vocab_size] bool (True: allowed); tokens past the mask's words are refused.
    numpy's unpackbits (little bit order over the words' little-endian bytes) is ~5x faster than shifts."""
    words = bitmask.detach().cpu().contiguous().numpy()
    bits = np.unpackbits(words.view(np.uint8), bitorder="little").view(np.bool_)
    if bits.size < vocab_size:
        bits = np.concatenate([bits, np.zeros(vocab_size - bits.size, dtype=np.bool_)])
    return torch.from_numpy(bits[:vocab_size])


def apply_bitmask(row: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Refuse (-inf) the tokens the grammar does not allow. A mask allowing nothing (a matcher in error) is
    not applied: the engine ends such a sequence, and an all -inf row must never reach the draw."""
    if not bool(bitmask.any()):  # 1.5k words, not 49k flags
        return
    allowed = allowed_tokens(bitmask, row.shape[-1]).to(row.device)
    row.masked_fill_(~allowed, float("-inf"))
