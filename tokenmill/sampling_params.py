"""Per-request sampling parameters, validated on construction so that bad values fail at submission
(an AdmissionError naming the field)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.errors import INVALID_VALUE, AdmissionError
from tokenmill.kv.policy import KVPolicy, parse_kv_policy
from tokenmill.structured.params import StructuredOutputs

_GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop (field names follow vLLM / the OpenAI API)."""

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: the sampled token plus the top k
    skip_special_tokens: bool = True
    # KV eviction policy of this request (kv/policy.py), e.g. "snapkv:budget=0.25"; None: the engine's default
    kv_policy: str | KVPolicy | None = None
    # Constrain the output to a JSON schema, regex, choice or grammar (a StructuredOutputs or a dict of its
    # fields, e.g. {"json": schema}); the engine masks the logits of each step with the grammar's bitmask.
    structured: StructuredOutputs | dict | None = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling (OpenAI)
    prompt_logprobs: int | None = None  # None: none; k >= 0: each prompt token's logprob plus the top k

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.structured = StructuredOutputs.coerce(self.structured)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise AdmissionError(
                    "logit_bias", INVALID_VALUE, "logit_bias must be a dict of token id -> bias"
                )
            self.logit_bias = dict(self.logit_bias) or None
        if self.top_k == -1:
            self.top_k = 0
        if self.kv_policy is not None:
            try:
                self.kv_policy = parse_kv_policy(self.kv_policy)
            except (ValueError, AttributeError) as e:
                raise AdmissionError("kv_policy", INVALID_VALUE, f"kv_policy: {e}") from None
        self._validate()

    def _validate(self) -> None:
        def check(ok: bool, name: str, allowed: str, value: object) -> None:
            if not ok:
                raise AdmissionError(name, INVALID_VALUE, f"{name} must be {allowed}, got {value!r}")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # rejects NaN

        check(is_int(self.n) and 1 <= self.n <= 128, "n", "an integer in [1, 128]", self.n)
        check(
            self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1),
            "max_tokens",
            "an integer >= 1 (or None for as many as fit)",
            self.max_tokens,
        )
        check(
            is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "an integer >= 0", self.min_tokens
        )
        if self.max_tokens is not None:
            check(self.min_tokens <= self.max_tokens, "min_tokens", "<= max_tokens", self.min_tokens)
        check(
            is_num(self.temperature) and 0.0 <= self.temperature <= 100.0,
            "temperature",
            "a number in [0, 100]",
            self.temperature,
        )
        check(
            is_int(self.top_k) and self.top_k >= 0, "top_k", "an integer >= 1, or 0/-1 to disable", self.top_k
        )
        check(is_num(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "a number in (0, 1]", self.top_p)
        check(is_num(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p", "a number in [0, 1]", self.min_p)
        check(
            is_num(self.repetition_penalty) and 0.01 <= self.repetition_penalty <= 10.0,
            "repetition_penalty",
            "a number in [0.01, 10]",
            self.repetition_penalty,
        )
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            check(is_num(v) and -2.0 <= v <= 2.0, name, "a number in [-2, 2]", v)
        check(self.seed is None or is_int(self.seed), "seed", "an integer or None", self.seed)
        check(
            all(isinstance(s, str) and s for s in self.stop),
            "stop",
            "a list of non-empty strings",
            self.stop,
        )
        check(len(self.stop) <= 64, "stop", "at most 64 strings", f"{len(self.stop)} strings")
        check(
            all(is_int(t) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            "a list of non-negative integers",
            self.stop_token_ids,
        )
        check(
            self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= 20),
            "logprobs",
            "an integer in [0, 20] or None",
            self.logprobs,
        )

        if self.logit_bias:
            check(
                all(is_int(t) and t >= 0 for t in self.logit_bias),
                "logit_bias",
                "a dict whose keys are token ids (integers >= 0)",
                list(self.logit_bias)[:5],
            )
            check(
                all(is_num(v) and -100.0 <= v <= 100.0 for v in self.logit_bias.values()),
                "logit_bias",
                "a dict whose values are numbers in [-100, 100]",
                list(self.logit_bias.values())[:5],
            )
            check(len(self.logit_bias) <= 1024, "logit_bias", "at most 1024 entries", len(self.logit_bias))
        check(
            self.prompt_logprobs is None
            or (is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= 20),
            "prompt_logprobs",
            "an integer in [0, 20] or None",
            self.prompt_logprobs,
        )

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
