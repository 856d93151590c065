"""Speculative decoding: proposers guess a few tokens, the target model checks them all in one pass.

Every proposer answers one batched call per engine step (a draft model runs its k passes for all sequences
together) and hears when a sequence no longer needs drafts, so one holding state (a draft KV cache) frees it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class DraftAsk:
    """One sequence that wants up to k drafts: its id (stable across steps) and its tokens so far."""

    seq_id: int
    token_ids: list[int]  # prompt + output; read during the call, not kept
    k: int


class Proposer(Protocol):
    # One draft pass's cost relative to one target decode step of the same batch, before any is measured
    # (spec/adaptive.py starts from it): 0 for prompt lookup, about the size ratio for a draft model.
    prior_cost: float

    def propose(self, asks: list[DraftAsk]) -> list[list[int]]:
        """Up to ask.k draft tokens for each ask, in order (an empty list: no guess)."""
        ...

    def release(self, seq_id: int) -> None:
        """The sequence finished, was aborted or was preempted: drop whatever is held for it."""
        ...
