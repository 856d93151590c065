"""KV eviction policies: which cached tokens a sequence keeps once its cache outgrows a budget.

A policy is written as a short string, the same on the command line (`--kv-policy`), in `SamplingParams`
(`kv_policy=`) and in OpenAI request bodies (the `kv_policy` extra field):

    full                                    keep everything (the default)
    streaming:sinks=4,window=1024           StreamingLLM: the first `sinks` tokens and the last `window` ones
    streaming:budget=0.25                   (or a budget: the newest `budget - sinks` tokens)
    h2o:budget=0.25,recent=32               H2O: the `recent` newest tokens plus the heavy hitters (most
                                            accumulated attention) up to `budget`, during decode too
    snapkv:budget=512,window=32,kernel=9    SnapKV: at the end of the prompt, each head keeps the tokens its
           pool=max                         last `window` prompt queries attend to most (each token scored by
                                            the max, or with pool=avg the mean, of the `kernel` scores around
                                            it), plus that window; generated tokens are all kept

A budget is a token count (an integer) or a fraction of the prompt (a number in (0, 1)). Every policy also
keeps `sinks` leading tokens (attention sinks; default 4, 0 turns it off), because small models park much of
their attention there and lose their footing without them. Budgets count kept tokens per KV head and layer:
each head may keep different tokens, every head the same number, so the paged layout stays one table per
sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

POLICY_KINDS = ("full", "streaming", "h2o", "snapkv")

# parameters each kind accepts, with defaults (None: required)
_PARAMS: dict[str, dict[str, float | int | str | None]] = {
    "full": {},
    "streaming": {"sinks": 4, "window": 0, "budget": 0},
    "h2o": {"budget": None, "recent": 32, "sinks": 4},
    # kernel 9 with max pooling (SnapKV's own code offers avg and max pooling): on the default model's
    # passkey prompts at a 25% budget it keeps every key the full cache finds, avg over 5 kept none (README)
    "snapkv": {"budget": None, "window": 32, "kernel": 9, "pool": "max", "sinks": 4},
}
_INT_PARAMS = {"sinks", "window", "recent", "kernel"}
_WORD_PARAMS = {"pool": ("max", "avg")}  # parameters whose value is a word


@dataclass(frozen=True)
class KVPolicy:
    kind: str = "full"
    budget: float = 0.0  # tokens (>= 1) or a fraction of the prompt (in (0, 1)); 0 for full / streaming
    sinks: int = 0  # leading tokens always kept
    window: int = 0  # streaming: newest tokens kept; snapkv: observation window (last prompt queries)
    recent: int = 0  # h2o: newest tokens always kept
    kernel: int = 1  # snapkv: pooling width over neighbouring tokens' scores
    pool: str = "max"  # snapkv: how the kernel combines them, max or avg

    @property
    def evicts(self) -> bool:
        return self.kind != "full"

    @property
    def needs_scores(self) -> bool:
        """Whether the attention kernels must report the weights each cached token receives."""
        return self.kind in ("h2o", "snapkv")

    @property
    def during_decode(self) -> bool:
        """Whether the budget holds while generating (memory stays flat), not only at the prompt's end."""
        return self.kind in ("streaming", "h2o")

    def budget_tokens(self, prompt_len: int) -> int:
        """Tokens kept per head for a prompt of `prompt_len` tokens."""
        if self.kind == "streaming" and self.window:
            return self.sinks + self.window
        if self.budget < 1:
            return max(1, math.ceil(self.budget * prompt_len))
        return int(self.budget)

    def scored_from(self, prompt_len: int) -> int:
        """First position whose queries' attention weights the policy accumulates: every query for H2O, the
        observation window at the prompt's end for SnapKV."""
        if self.kind == "h2o":
            return 0
        if self.kind == "snapkv":
            return max(0, prompt_len - self.window)
        return -1

    def __str__(self) -> str:
        if self.kind == "full":
            return "full"
        fields = [
            f"{name}={self._fmt(getattr(self, name))}"
            for name in _PARAMS[self.kind]
            if not (self.kind == "streaming" and name in ("window", "budget") and not getattr(self, name))
        ]
        return f"{self.kind}:{','.join(fields)}"

    @staticmethod
    def _fmt(value: float | int | str) -> str:
        if isinstance(value, str):
            return value
        return str(int(value)) if float(value).is_integer() else repr(float(value))


FULL = KVPolicy()


def parse_kv_policy(text: str | KVPolicy | None) -> KVPolicy:
    """`text` as a KVPolicy; ValueError with the accepted forms when it is not one."""
    if isinstance(text, KVPolicy):
        return text
    if text is None or text.strip() in ("", "full"):
        return FULL
    kind, _, rest = text.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in _PARAMS:
        raise ValueError(
            f"unknown KV policy {kind!r}: use one of {', '.join(POLICY_KINDS)} "
            "(e.g. 'streaming:sinks=4,window=1024', 'h2o:budget=0.25,recent=32', 'snapkv:budget=512,window=32')"
        )
    allowed = _PARAMS[kind]
    values: dict[str, float | int | str | None] = dict(allowed)
    for item in filter(None, (part.strip() for part in rest.split(","))):
        name, eq, raw = item.partition("=")
        name = name.strip()
        if not eq or name not in allowed:
            raise ValueError(
                f"KV policy {kind!r} takes {', '.join(f'{n}=' for n in allowed) or 'no parameters'}; got {item!r}"
            )
        if name in _WORD_PARAMS:
            word = raw.strip().lower()
            if word not in _WORD_PARAMS[name]:
                raise ValueError(
                    f"KV policy parameter {name} must be one of {', '.join(_WORD_PARAMS[name])}, got {raw.strip()!r}"
                )
            values[name] = word
            continue
        try:
            number = float(raw)
        except ValueError:
            raise ValueError(f"KV policy parameter {name} must be a number, got {raw.strip()!r}") from None
        if name in _INT_PARAMS and not number.is_integer():
            raise ValueError(f"KV policy parameter {name} must be an integer, got {raw.strip()!r}")
        values[name] = number
    missing = [n for n, v in values.items() if v is None]
    if missing:
        raise ValueError(f"KV policy {kind!r} needs {', '.join(f'{n}=' for n in missing)}")
    policy = KVPolicy(kind=kind, **{n: _typed(n, v) for n, v in values.items() if v is not None})
    _check(policy)
    return policy


def _typed(name: str, value: float | int | str) -> float | int | str:
    if name in _WORD_PARAMS:
        return value
    return int(value) if name in _INT_PARAMS else float(value)


def _check(p: KVPolicy) -> None:
    if p.sinks < 0:
        raise ValueError(f"KV policy sinks must be >= 0, got {p.sinks}")
    if p.kind == "streaming" and (p.window < 0 or (p.window > 0) == (p.budget > 0)):
        raise ValueError("KV policy streaming needs window=N (newest tokens kept) or budget=B, one of them")
    if p.kind in ("h2o", "snapkv") or (p.kind == "streaming" and p.budget):
        if not (0 < p.budget < 1 or (p.budget >= 1 and float(p.budget).is_integer())):
            raise ValueError(
                f"KV policy budget must be a token count (an integer >= 1) or a fraction in (0, 1), got {p.budget}"
            )
        if p.budget >= 1 and p.budget <= p.sinks:
            raise ValueError(f"KV policy budget ({int(p.budget)} tokens) must exceed sinks ({p.sinks})")
    if p.kind == "h2o" and p.recent < 0:
        raise ValueError(f"KV policy recent must be >= 0, got {p.recent}")
    if p.kind == "snapkv":
        if p.window < 1:
            raise ValueError(f"KV policy snapkv needs window >= 1, got {p.window}")
        if p.kernel < 1 or p.kernel % 2 == 0:
            raise ValueError(f"KV policy kernel must be an odd integer >= 1, got {p.kernel}")
