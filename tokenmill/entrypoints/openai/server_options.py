"""The server's safety options: keys, browser rules, request limits, queues, deadlines, the watchdog.

`ServerOptions.add_cli_args(parser)` declares them for `tokenmill serve`; `ServerOptions.from_cli_args(args)`
reads them back (with `TOKENMILL_API_KEY`); `build_app(engine, options=...)` applies them.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from tokenmill.entrypoints.openai.limits import RequestLimits
from tokenmill.entrypoints.openai.security import EXEMPTIBLE_PATHS, SecurityOptions

API_KEY_ENV = "TOKENMILL_API_KEY"
DEFAULT_MAX_WAITING = 128
DEFAULT_REQUEST_TIMEOUT_S = 600.0
DEFAULT_STREAM_STALL_TIMEOUT_S = 30.0
DEFAULT_WATCHDOG_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ServerOptions:
    security: SecurityOptions = field(default_factory=SecurityOptions)
    limits: RequestLimits = field(default_factory=RequestLimits)
    max_waiting: int = DEFAULT_MAX_WAITING  # requests queued per API key before 429
    max_concurrent_per_key: int | None = None  # sequences of one key inside the engine at once
    max_in_engine: int | None = None  # sequences inside the engine at once; None: the engine's max_num_seqs
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT_S  # seconds; a request's `timeout` may lower it
    stream_stall_timeout: float | None = DEFAULT_STREAM_STALL_TIMEOUT_S  # a stream's client not reading
    watchdog_timeout: float | None = DEFAULT_WATCHDOG_TIMEOUT_S  # /health 503 after this long without a step

    def __post_init__(self) -> None:
        if self.max_waiting < 1:
            raise ValueError(f"--max-waiting must be >= 1, got {self.max_waiting}")
        for name in ("request_timeout", "stream_stall_timeout", "watchdog_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0 (or 0 for none), got {value}")

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        d, lim, sec = ServerOptions, RequestLimits, SecurityOptions
        g = parser.add_argument_group("access (see README: Serving safely)")
        g.add_argument(
            "--api-key",
            action="append",
            default=[],
            help=f"require `Authorization: Bearer KEY` (repeatable: one key per client; also ${API_KEY_ENV})",
        )
        g.add_argument(
            "--public-path",
            action="append",
            default=[],
            choices=EXEMPTIBLE_PATHS,
            help="serve this path without a key (repeatable)",
        )
        g.add_argument(
            "--allowed-origins",
            default="",
            help="comma-separated browser origins allowed cross-site (CORS), or * (default: none)",
        )
        g.add_argument(
            "--allowed-hosts",
            default="",
            help="comma-separated Host names accepted besides localhost (default: only localhost names on a "
            "loopback bind; any Host otherwise)",
        )
        g.add_argument("--enable-docs", action="store_true", help="serve /docs and /openapi.json")
        g = parser.add_argument_group("limits (checked before tokenization)")
        g.add_argument(
            "--max-body-bytes",
            type=int,
            default=sec.max_body_bytes,
            help=f"413 beyond this request body size (default: {sec.max_body_bytes})",
        )
        g.add_argument(
            "--max-prompt-chars",
            type=int,
            default=None,
            help="characters of prompt / messages per request (default: 16 x the context length)",
        )
        g.add_argument(
            "--max-messages",
            type=int,
            default=lim.max_messages,
            help="chat messages per request (default: %(default)s)",
        )
        g.add_argument(
            "--max-prompts",
            type=int,
            default=lim.max_prompts,
            help="prompts per request (default: %(default)s)",
        )
        g.add_argument(
            "--max-stop-chars",
            type=int,
            default=lim.max_stop_chars,
            help="characters of one stop string (default: %(default)s)",
        )
        g.add_argument(
            "--max-output-budget",
            type=int,
            default=lim.max_output_budget,
            help="prompts x n x max_tokens x (1 + top_logprobs) per request (default: %(default)s)",
        )
        g = parser.add_argument_group("queues, deadlines, watchdog")
        g.add_argument(
            "--max-waiting",
            type=int,
            default=d.max_waiting,
            help="requests of one API key waiting for the engine before 429 + Retry-After (default: %(default)s)",
        )
        g.add_argument(
            "--max-concurrent-per-key",
            type=int,
            default=None,
            help="sequences of one API key in the engine at once (default: no cap; keys share fairly)",
        )
        g.add_argument(
            "--request-timeout",
            type=float,
            default=d.request_timeout,
            help="seconds a request may take from arrival, queue included; a request's `timeout` field may "
            "lower it; 0: none (default: %(default)s)",
        )
        g.add_argument(
            "--stream-stall-timeout",
            type=float,
            default=d.stream_stall_timeout,
            help="abort a stream whose client reads nothing for this long; 0: never (default: %(default)s)",
        )
        g.add_argument(
            "--watchdog-timeout",
            type=float,
            default=d.watchdog_timeout,
            help="/health answers 503 when work is pending and no step ended for this long; 0: off "
            "(default: %(default)s)",
        )

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> ServerOptions:
        keys = list(getattr(args, "api_key", None) or [])
        env_key = os.environ.get(API_KEY_ENV)
        if env_key and env_key not in keys:
            keys.append(env_key)

        def split(value: str | None) -> tuple[str, ...]:
            return tuple(v.strip() for v in (value or "").split(",") if v.strip())

        def seconds(value: float | None) -> float | None:
            return None if value is None or value == 0 else value

        security = SecurityOptions(
            api_keys=tuple(keys),
            public_paths=tuple(getattr(args, "public_path", None) or ()),
            allowed_origins=split(getattr(args, "allowed_origins", "")),
            allowed_hosts=split(getattr(args, "allowed_hosts", "")),
            bind_host=getattr(args, "host", None),
            enable_docs=bool(getattr(args, "enable_docs", False)),
            max_body_bytes=getattr(args, "max_body_bytes", SecurityOptions.max_body_bytes),
        )
        limits = RequestLimits(
            max_prompt_chars=getattr(args, "max_prompt_chars", None),
            max_messages=getattr(args, "max_messages", RequestLimits.max_messages),
            max_prompts=getattr(args, "max_prompts", RequestLimits.max_prompts),
            max_stop_chars=getattr(args, "max_stop_chars", RequestLimits.max_stop_chars),
            max_output_budget=getattr(args, "max_output_budget", RequestLimits.max_output_budget),
        )
        return cls(
            security=security,
            limits=limits,
            max_waiting=getattr(args, "max_waiting", None) or cls.max_waiting,
            max_concurrent_per_key=getattr(args, "max_concurrent_per_key", None),
            request_timeout=seconds(getattr(args, "request_timeout", cls.request_timeout)),
            stream_stall_timeout=seconds(getattr(args, "stream_stall_timeout", cls.stream_stall_timeout)),
            watchdog_timeout=seconds(getattr(args, "watchdog_timeout", cls.watchdog_timeout)),
        )
