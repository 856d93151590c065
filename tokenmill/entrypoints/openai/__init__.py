"""The OpenAI-compatible HTTP server: `build_app(engine)` and `run_server(args)` (`tokenmill serve`).

Loaded on first use, so that importing `protocol` alone does not start up the server and the engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["build_app", "run_server"]

if TYPE_CHECKING:
    from tokenmill.entrypoints.openai.api_server import build_app, run_server


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from tokenmill.entrypoints.openai import api_server

    return getattr(api_server, name)
