"""Prompt lookup (n-gram) proposals: continue the sequence the way it continued the last time its current
suffix appeared in its own tokens (prompt or output). No model, so a proposal costs microseconds; it pays
off on input-grounded work (editing, summarising, code) where the output copies spans of the input."""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.spec import DraftAsk


def propose_ngram(tokens: list[int], k: int, min_n: int, max_n: int, window: int = 4096) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix n-gram
    (max_n down to min_n) within the last `window` tokens. Empty when nothing matches."""
    if k <= 0:
        return []
    start = max(0, len(tokens) - window)
    hay = tokens[start:]
    n_total = len(hay)
    for n in range(min(max_n, n_total - 1), min_n - 1, -1):
        suffix = hay[n_total - n :]
        first = suffix[0]
        # latest occurrence that ends before the suffix itself and is followed by at least one token
        for i in range(n_total - n - 1, -1, -1):
            if hay[i] == first and hay[i : i + n] == suffix:
                return hay[i + n : i + n + k]
    return []


@dataclass(frozen=True)
class NgramProposer:
    """The `ngram` method: prompt lookup over the sequence's own tokens. It holds nothing per sequence."""

    min_n: int
    max_n: int
    prior_cost: float = 0.0

    def propose(self, asks: list[DraftAsk]) -> list[list[int]]:
        return [propose_ngram(a.token_ids, a.k, self.min_n, self.max_n) for a in asks]

    def release(self, seq_id: int) -> None:
        pass
