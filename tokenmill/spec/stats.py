"""Acceptance counters of speculative decoding, as vLLM reports them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecStats:
    num_steps: int = 0  # verifications (one per sequence and step that carried drafts)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_histogram: list[int] = field(default_factory=lambda: [0] * 17)  # verifications by accepted count

    def record(self, num_drafts: int, num_accepted: int) -> None:
        self.num_steps += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        self.accepted_histogram[min(num_accepted, len(self.accepted_histogram) - 1)] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verification: the accepted drafts plus the target's own token."""
        return 1 + self.num_accepted_tokens / self.num_steps if self.num_steps else 0.0
