"""The OpenAI-compatible HTTP server: `build_app(engine)` and `run_server(args)` (`tokenmill serve`)."""

from tokenmill.entrypoints.openai.api_server import build_app, run_server

__all__ = ["build_app", "run_server"]
