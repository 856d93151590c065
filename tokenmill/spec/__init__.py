"""Speculative decoding: proposers guess a few tokens, the target model checks them all in one pass."""

from __future__ import annotations

from typing import Protocol


class Proposer(Protocol):
    """Guesses up to k next tokens of a sequence from its tokens so far (prompt + output)."""

    def propose(self, token_ids: list[int], k: int) -> list[int]: ...
