"""Per-request limits checked at the edge, on the parsed body, before any tokenization or engine work.

A 32 MB prompt costs a minute of tokenization and gigabytes of memory before the context check can refuse
it; these bounds refuse it in microseconds, with a 400 naming the limit and the flag that sets it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_CHARS_PER_TOKEN = 16  # the default prompt-character limit: this many characters per context token


@dataclass(frozen=True)
class RequestLimits:
    """Defaults sized so that one 2-core machine survives many such requests at once."""

    max_prompt_chars: int | None = None  # per request, all prompts / messages together; None: 16 x context
    max_messages: int = 256  # chat messages per request
    max_prompts: int = 64  # prompts per /v1/completions request
    max_stop_chars: int = 256  # characters of one stop string
    max_output_budget: int = 1 << 20  # n x max_tokens x (1 + top_logprobs), summed over the prompts

    def __post_init__(self) -> None:
        for name in (
            "max_prompt_chars",
            "max_messages",
            "max_prompts",
            "max_stop_chars",
            "max_output_budget",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")

    def resolved(self, max_model_len: int) -> RequestLimits:
        """With the defaults that depend on the model filled in."""
        if self.max_prompt_chars is not None:
            return self
        chars = max(4096, DEFAULT_CHARS_PER_TOKEN * max_model_len)
        return RequestLimits(
            chars, self.max_messages, self.max_prompts, self.max_stop_chars, self.max_output_budget
        )


class LimitExceeded(ValueError):
    """A request beyond one of the limits; `param` is the field, `flag` the server option that sets it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


def check_prompt_chars(limits: RequestLimits, num_chars: int, param: str) -> None:
    limit = limits.max_prompt_chars
    if limit is not None and num_chars > limit:
        raise LimitExceeded(
            param,
            f"{param} has {num_chars} characters, more than this server's limit of {limit} per request "
            "(--max-prompt-chars)",
        )


def check_count(limit: int, count: int, param: str, what: str, flag: str) -> None:
    if count > limit:
        raise LimitExceeded(
            param, f"{count} {what} in one request; this server allows at most {limit} ({flag})"
        )


def check_stops(limits: RequestLimits, stops: str | Iterable[str] | None) -> None:
    if stops is None:
        return
    for stop in [stops] if isinstance(stops, str) else stops:
        if len(stop) > limits.max_stop_chars:
            raise LimitExceeded(
                "stop",
                f"a stop string has {len(stop)} characters; this server allows at most "
                f"{limits.max_stop_chars} (--max-stop-chars)",
            )


def check_output_budget(
    limits: RequestLimits, num_prompts: int, n: int, max_tokens: int, top_logprobs: int, param: str
) -> None:
    """n x max_tokens x (1 + top_logprobs) over all prompts: what the request may make the server produce
    and hold (every token of every choice, with its top-logprob entries)."""
    budget = num_prompts * n * max_tokens * (1 + top_logprobs)
    if budget > limits.max_output_budget:
        raise LimitExceeded(
            param,
            f"prompts x n x {param} x (1 + top logprobs) = {num_prompts} x {n} x {max_tokens} x "
            f"{1 + top_logprobs} = {budget} exceeds this server's limit of {limits.max_output_budget} "
            "(--max-output-budget); lower n, " + param + " or logprobs",
        )
