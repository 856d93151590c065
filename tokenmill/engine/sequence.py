"""A Sequence is one completion being generated; a Request groups the n sequences of one prompt."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tokenmill.kv.eviction import SeqKVState
from tokenmill.kv.policy import FULL, KVPolicy
from tokenmill.layers.sampler import SampleResult
from tokenmill.models.tokenizer import IncrementalDetokenizer
from tokenmill.outputs import RequestMetrics, TokenLogprobs
from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenmill.structured.grammar import GrammarMatcher


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not yet scheduled, or preempted and to be recomputed
    RUNNING = "running"  # holds KV blocks
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: Request
    index: int  # which of the request's n completions
    token_ids: list[int]  # prompt followed by generated tokens
    generator: torch.Generator
    detokenizer: IncrementalDetokenizer
    max_tokens: int
    num_computed_tokens: int = 0  # tokens run through the model (the next token's position)
    num_dropped_slots: int = 0  # of those, tokens whose K/V were evicted from the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # prefix hashes of the full computed blocks
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    output_text: str = ""
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float = 0.0
    fork_parent: Sequence | None = None  # for n > 1: share this sequence's prompt blocks (copy-on-write)
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first scheduling
    draft_token_ids: list[int] = field(default_factory=list)  # speculative tokens to verify in the next step
    kv_policy: KVPolicy = FULL  # eviction policy (the request's or the engine's default)
    kv_state: SeqKVState | None = None  # per-slot positions and attention scores, under an evicting policy

    def reset_kv(self) -> None:
        """Forget everything computed (preemption): the sequence is recomputed from its first token."""
        self.num_computed_tokens = self.num_dropped_slots = 0
        self.kv_state = None
        self.draft_token_ids = []

    grammar: GrammarMatcher | None = None  # structured output: follows the accepted tokens
    # prompt logprobs (params.prompt_logprobs): score i is prompt token i + 1 given the tokens before it, as
    # the runner computed it; prompt_logprobs holds the same as output entries (converted as they are shown)
    prompt_scores: list[SampleResult] | None = None
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_kv_slots(self) -> int:
        """Cache slots the sequence holds: its computed tokens less the evicted ones. Slot i is
        `block_table[i // block_size] * block_size + i % block_size`."""
        return self.num_computed_tokens - self.num_dropped_slots

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked for and not all computed yet (a recompute after preemption adds none)."""
        return self.prompt_scores is not None and len(self.prompt_scores) < self.num_prompt_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.time()))
    seqs: list[Sequence] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
