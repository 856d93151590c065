"""SpeculativeConfig: which proposer and how many tokens, parsed from vLLM-style options.

`LLM(speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
"prompt_lookup_max": 5})`, `{"method": "draft_model", "model": PATH, "num_speculative_tokens": 4}` or
`{"method": "layerskip", "skip_layers": [3, 5]}` / `{"method": "layerskip", "skip_layers_file": PATH}`, or the
same object as JSON on the command line (`--speculative-config`). `"num_speculative_tokens": "auto"` (or
`"adaptive": true`) lets spec/adaptive.py pick k per step, up to `num_speculative_tokens` (8 for "auto").
A draft model may run cheaper than the engine's settings (`"draft_weights": "q4"`, `"draft_activations":
"int8"`): it only proposes, so its rounding can cost acceptance, never the output's exactness.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tokenmill.formats import ACTIVATIONS, WeightFormat

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
    # draft_model only: the draft's weight format (as --weights) and its packed linears' activations (as
    # --activations); None: the engine's own
    draft_weights: str | None = None
    draft_activations: str | None = None

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
        if self.draft_weights is not None:
            try:
                set_(self, "draft_weights", str(WeightFormat.parse(self.draft_weights)))
            except ValueError as exc:
                raise ValueError(f"draft_weights: {exc}") from None
        if self.draft_activations is not None and self.draft_activations not in ACTIVATIONS:
            raise ValueError(
                f"draft_activations must be one of {', '.join(ACTIVATIONS)}, got {self.draft_activations!r}"
            )
        if method != "draft_model" and (self.draft_weights, self.draft_activations) != (None, None):
            raise ValueError(f"draft_weights / draft_activations apply to method draft_model, not {method!r}")
        if method == "layerskip":
            set_(self, "skip_layers", self._layerskip_layers())
        elif self.skip_layers is not None or self.skip_layers_file is not None:
            raise ValueError(f"skip_layers / skip_layers_file apply to method layerskip, not {method!r}")

    def _layerskip_layers(self) -> tuple[int, ...]:
        if (self.skip_layers is None) == (self.skip_layers_file is None):
            raise ValueError(
                'method "layerskip" needs exactly one of "skip_layers" (a list) or "skip_layers_file"'
            )
        if self.skip_layers_file is not None:
            layers = read_skip_layers_file(self.skip_layers_file, "skip_layers_file")
        else:
            layers = check_layer_list(self.skip_layers, "skip_layers")
        if not layers:
            raise ValueError("skip_layers must name at least one layer for method layerskip")
        return layers

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


# ---- layer lists (speculative layerskip drafts and the engine's lossy --skip-layers) ------------------------
def check_layer_list(layers: Any, name: str) -> tuple[int, ...]:
    """Distinct layer indices >= 0, sorted. ValueError naming `name` otherwise."""
    if not isinstance(layers, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers
    ):
        raise ValueError(f"{name} must be a list of layer indices >= 0, got {layers!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{name} must name distinct layers, got {list(layers)!r}")
    return tuple(sorted(layers))


def read_skip_layers_file(path: str | Path, name: str) -> tuple[int, ...]:
    """The "skip_layers" list of a JSON file written by `tokenmill eval layerskip`."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{name} {str(path)!r} cannot be read as JSON: {exc}") from None
    if not isinstance(saved, dict) or "skip_layers" not in saved:
        raise ValueError(f'{name} {str(path)!r} has no "skip_layers" list')
    return check_layer_list(saved["skip_layers"], f"{name} {str(path)!r}: skip_layers")


def parse_skip_layers(value: Any, name: str = "skip_layers") -> tuple[int, ...]:
    """Layers to skip from a list, one index, a string "3,5,8" (or "3/5/8": eval modes use commas between
    modes), or the path of a JSON file written by `tokenmill eval layerskip`. None or "" : none."""
    if value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, str):
        text = value.strip()
        if not text or text.lower() == "none":
            return ()
        pieces = [p.strip() for p in text.replace("/", ",").split(",")]
        if all(p.isdigit() for p in pieces):
            value = [int(p) for p in pieces]
        elif text.endswith(".json") or Path(text).is_file():
            return read_skip_layers_file(text, name)
        else:
            raise ValueError(
                f"{name} must be layer indices such as 3,5,8 or a JSON file from `tokenmill eval layerskip`, "
                f"got {value!r}"
            )
    return check_layer_list(value, name)


def kept_layers(num_layers: int, skip: tuple[int, ...] | list[int], name: str = "skip_layers") -> list[int]:
    """The layers a model of `num_layers` runs when it skips `skip`."""
    bad = [i for i in skip if not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"{name} {bad} are not layers of this model (it has {num_layers}: 0..{num_layers - 1})"
        )
    kept = [i for i in range(num_layers) if i not in set(skip)]
    if not kept:
        raise ValueError(f"{name} skips all {num_layers} layers; keep at least one")
    return kept
