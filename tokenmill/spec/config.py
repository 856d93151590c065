"""SpeculativeConfig: which proposer and how many tokens, parsed from vLLM-style options.

`LLM(speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
"prompt_lookup_max": 5})`, or the same object as JSON on the command line (`--speculative-config`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram",)
PLANNED_METHODS = ("draft", "layerskip")  # named by the interface; not built yet: a clear error, not a no-op


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4  # draft tokens verified per step and sequence (k)
    prompt_lookup_min: int = 2  # shortest suffix n-gram looked up in the sequence's own tokens
    prompt_lookup_max: int = 5  # longest one; longer matches are tried first

    def __post_init__(self) -> None:
        if self.method in PLANNED_METHODS:
            raise ValueError(f"speculative method {self.method!r} is not available yet; use one of {METHODS}")
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
            raise ValueError(f"num_speculative_tokens must be an integer in [1, 16], got {k!r}")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)) or not 1 <= lo <= hi:
            raise ValueError(
                f"prompt_lookup_min and prompt_lookup_max must be integers with 1 <= min <= max, got {lo!r}, {hi!r}"
            )

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | str | None) -> SpeculativeConfig | None:
        """From a config, a dict, or a JSON object string; None stays None (no speculation)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"speculative_config is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be an object, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; known: {sorted(known)}")
        return cls(**value)
