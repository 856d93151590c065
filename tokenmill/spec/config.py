"""SpeculativeConfig: which proposer and how many tokens, parsed from vLLM-style options.

`LLM(speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
"prompt_lookup_max": 5})`, `{"method": "draft_model", "model": PATH, "num_speculative_tokens": 4}` or
`{"method": "layerskip", "skip_layers": [3, 5]}` / `{"method": "layerskip", "skip_layers_file": PATH}`, or the
same object as JSON on the command line (`--speculative-config`). `"num_speculative_tokens": "auto"` (or
`"adaptive": true`) lets spec/adaptive.py pick k per step, up to `num_speculative_tokens` (8 for "auto").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

METHODS = ("ngram", "draft_model", "layerskip")
ALIASES = {"draft": "draft_model"}  # the short name
AUTO_MAX_K = 8  # the ceiling of k when num_speculative_tokens is "auto"


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int | str = 4  # draft tokens verified per step and sequence (k), or "auto"
    adaptive: bool = False  # pick k per step (<= num_speculative_tokens) from acceptance and batch size
    prompt_lookup_min: int = 2  # ngram: shortest suffix n-gram looked up in the sequence's own tokens
    prompt_lookup_max: int = 5  # ngram: longest one; longer matches are tried first
    model: str | None = None  # draft_model: path or name of the draft model (vLLM's key)
    draft_model: str | None = None  # the same, under the name
    skip_layers: tuple[int, ...] | None = None  # layerskip: target layers the draft pass leaves out
    skip_layers_file: str | None = None  # layerskip: JSON written by `tokenmill eval layerskip`

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise aliases once, here
        method = ALIASES.get(self.method, self.method)
        if method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        set_(self, "method", method)
        k = self.num_speculative_tokens
        if k == "auto":
            set_(self, "num_speculative_tokens", AUTO_MAX_K)
            set_(self, "adaptive", True)
        elif not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
            raise ValueError(f'num_speculative_tokens must be an integer in [1, 16] or "auto", got {k!r}')
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"adaptive must be true or false, got {self.adaptive!r}")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)) or not 1 <= lo <= hi:
            raise ValueError(
                f"prompt_lookup_min and prompt_lookup_max must be integers with 1 <= min <= max, got {lo!r}, {hi!r}"
            )
        if self.model is not None and self.draft_model is not None and self.model != self.draft_model:
            raise ValueError(
                f"model ({self.model!r}) and draft_model ({self.draft_model!r}) disagree; give one"
            )
        draft = self.model if self.model is not None else self.draft_model
        set_(self, "model", draft)
        set_(self, "draft_model", draft)
        if method == "draft_model" and not draft:
            raise ValueError(
                'speculative method "draft_model" needs "model": the draft model\'s path or name'
            )
        if method != "draft_model" and draft is not None:
            raise ValueError(f'"model" names a draft model, which method {method!r} does not use')
        if method == "layerskip":
            set_(self, "skip_layers", self._layerskip_layers())
        elif self.skip_layers is not None or self.skip_layers_file is not None:
            raise ValueError(f"skip_layers / skip_layers_file apply to method layerskip, not {method!r}")

    def _layerskip_layers(self) -> tuple[int, ...]:
        if (self.skip_layers is None) == (self.skip_layers_file is None):
            raise ValueError(
                'method "layerskip" needs exactly one of "skip_layers" (a list) or "skip_layers_file"'
            )
        layers: Any = self.skip_layers
        if self.skip_layers_file is not None:
            path = Path(self.skip_layers_file)
            try:
                saved = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ValueError(f"skip_layers_file {str(path)!r} cannot be read as JSON: {exc}") from None
            if not isinstance(saved, dict) or "skip_layers" not in saved:
                raise ValueError(f'skip_layers_file {str(path)!r} has no "skip_layers" list')
            layers = saved["skip_layers"]
        if (
            not isinstance(layers, (list, tuple))
            or not layers
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
            or len(set(layers)) != len(layers)
        ):
            raise ValueError(
                f"skip_layers must be a non-empty list of distinct layer indices >= 0, got {layers!r}"
            )
        return tuple(sorted(layers))

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
