"""The FastAPI app of the OpenAI-compatible server, and `run_server` (uvicorn, graceful SIGTERM).

app = build_app(async_engine)            # or build_app(model=..., kv_cache_memory=..., ...)
uvicorn.run(app)                          # or: tokenmill serve [MODEL] --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

import tokenmill
from tokenmill.engine.async_engine import AsyncLLMEngine
from tokenmill.engine_args import EngineArgs
from tokenmill.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from tokenmill.entrypoints.openai.security import (
    ApiKeyMiddleware,
    HostCheckMiddleware,
    JSONBodyMiddleware,
    OriginCheckMiddleware,
)
from tokenmill.entrypoints.openai.server_options import ServerOptions
from tokenmill.entrypoints.openai.serving import ApiError, OpenAIServing, error_body
from tokenmill.metrics import Metrics

logger = logging.getLogger("tokenmill.server")

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 413, 415, 429, 500, 503)
}
_HTTP_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}

# The web chat page (package data): served at / and /static/, public like /health (the page asks for an API
# key itself and sends it to /v1). The CSP keeps the page to this origin: no CDN, and no markup or script
# from model text can load or run anything.
STATIC_DIR = Path(__file__).parent / "static"
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def _clean_loc(loc: Any) -> list[str]:
    """An error location without "body" and without the union-branch names pydantic inserts
    (prompt.list[int].0 -> prompt.0)."""
    return [
        str(p)
        for p in loc or ()
        if p != "body"
        and not (isinstance(p, str) and ("[" in p or p in _TYPE_NAMES or p.startswith("constrained")))
    ]


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """FastAPI/pydantic errors as one message naming the parameter, and that parameter."""
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON{': ' + str(detail) if detail else ''}", None
    loc = _clean_loc(first.get("loc"))
    if not loc:
        if first.get("type") == "missing":
            return "the request body is missing; send a JSON object", None
        return f"the request body must be a JSON object: {first.get('msg', 'invalid')}", None
    parts: list[str] = []
    for err in errors:
        err_loc = _clean_loc(err.get("loc"))
        if not err_loc or err_loc[0] != loc[0]:
            continue
        text = f"{'.'.join(err_loc)}: {err.get('msg', 'invalid value')}"
        if text not in parts:
            parts.append(text)
        if len(parts) == 3:
            break
    message = "; ".join(parts)
    if len(errors) > len(parts):
        message += " (or another of the accepted forms)"
    return message, ".".join(loc)


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def build_app(
    engine: AsyncLLMEngine | None = None,
    *,
    model: str | None = None,
    max_waiting: int | None = None,
    served_model_name: str | None = None,
    shutdown_timeout: float = 30.0,
    options: ServerOptions | None = None,
    **engine_options: Any,
) -> FastAPI:
    """The app serving `engine` (or a new engine built from `model` and EngineConfig options). The app's
    lifespan starts the engine loop and, at the end, shuts it down (in-flight requests get
    `shutdown_timeout` seconds). `options`: keys, limits, queues, deadlines (ServerOptions); `max_waiting`
    overrides its max_waiting."""
    options = options or ServerOptions()
    if max_waiting is not None:
        options = dataclasses.replace(options, max_waiting=max_waiting)
    if engine is None:
        engine = AsyncLLMEngine.from_engine_args(model, **engine_options)
    engine.watchdog_timeout = options.watchdog_timeout
    metrics = Metrics(lambda: engine.stats)
    names = [served_model_name or engine.model_name]
    if engine.config.model and engine.config.model not in names:
        names.append(str(engine.config.model))  # the argument the server was started with
    serving = OpenAIServing(engine, metrics, names, options)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await engine.shutdown(timeout=shutdown_timeout)

    app = FastAPI(
        title="tokenmill",
        version=tokenmill.__version__,
        description="OpenAI-compatible API of the tokenmill inference engine",
        lifespan=lifespan,
        docs_url="/docs" if options.security.enable_docs else None,
        redoc_url="/redoc" if options.security.enable_docs else None,
        openapi_url="/openapi.json" if options.security.enable_docs else None,
    )
    # Added innermost first: Host check -> CORS -> Origin check -> API key -> JSON body -> routes.
    security = options.security
    app.add_middleware(JSONBodyMiddleware, options=security)
    app.add_middleware(ApiKeyMiddleware, options=security)
    app.add_middleware(OriginCheckMiddleware, options=security)
    if security.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(security.allowed_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    if security.checks_host:
        app.add_middleware(HostCheckMiddleware, options=security)
    app.state.options = options
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.serving = serving

    # ---- errors: always the OpenAI body; 4xx name the parameter; a 500 never carries a trace ----------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status_code in (429, 503) else None
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(exc.errors()))
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        kind = _HTTP_ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if status == 400 and message == "There was an error parsing the body":
            message = "the request body could not be parsed (it must be UTF-8 JSON)"
        return JSONResponse(error_body(message, kind), status_code=status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this response is sent; the client sees no detail.
        metrics.record_error()
        return JSONResponse(error_body("Internal server error", "server_error", None, "internal_error"), 500)

    # ---- routes -------------------------------------------------------------------------------------------
    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health() -> Response:
        stalled = engine.stalled_for()
        if stalled is not None:
            message = f"the engine has made no progress for {stalled:.0f} s with work pending (watchdog)"
            return JSONResponse(error_body(message, "server_error", None, "engine_stalled"), 503)
        if engine.accepting and engine.is_running:
            return JSONResponse({"status": "ok"})
        return JSONResponse(error_body("the engine is not serving", "server_error", None, "unavailable"), 503)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return serving.models()

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_ERRORS)
    async def get_model(model_id: str) -> ModelCard:
        serving.check_model(model_id)
        return serving.models().data[0]

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.create_completion(body, request)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.create_chat_completion(body, request)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        return serving.tokenize(body)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        return serving.detokenize(body)

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=_PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


# ---- running it -------------------------------------------------------------------------------------------
def _format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"  # pragma: no cover


class _Server(uvicorn.Server):
    """uvicorn's server, plus: SIGTERM/SIGINT first stop admission; the bound URL is logged."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine, model_name: str):
        super().__init__(config)
        self._engine = engine
        self._model_name = model_name

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.should_exit:
            logger.info(
                "received %s: no new requests; letting in-flight requests finish", signal.Signals(sig).name
            )
        self._engine.stop_admission()
        super().handle_exit(sig, frame)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.started:
            return
        host, port = self.config.host, self.config.port
        for server in self.servers:
            for sock in server.sockets:
                port = sock.getsockname()[1]
                break
        shown = f"[{host}]" if ":" in host else host
        logger.info("serving %s at http://%s:%d (OpenAI API under /v1)", self._model_name, shown, port)
        self._monitor = asyncio.ensure_future(self._exit_when_engine_dies())

    async def _exit_when_engine_dies(self) -> None:
        """A dead engine cannot serve again: stop the server, so that the process exits non-zero and its
        supervisor restarts it."""
        while not self.should_exit:
            if self._engine.is_dead:
                logger.error("the engine died; shutting down the server")
                self._engine.stop_admission()
                self.should_exit = True
                return
            await asyncio.sleep(0.2)


def run_server(args: argparse.Namespace) -> int:
    """`tokenmill serve`: load the model, serve until SIGTERM/SIGINT, then drain and exit 0. `args`: the
    engine options (EngineArgs.add_cli_args) and the server's (host, port, max_waiting, ...)."""
    log_level = getattr(args, "log_level", "info")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = ServerOptions.from_cli_args(args)
    shutdown_timeout = float(getattr(args, "shutdown_timeout", 30.0))

    logger.info("loading model %s", args.model or "(default)")
    config = EngineArgs.from_cli_args(args).to_engine_config()
    engine = AsyncLLMEngine.from_config(config)
    cfg = engine.config
    logger.info(
        "model %s (%s) dtype=%s device=%s context=%d tokens; KV cache: %d tokens (%d blocks of %d), %d bytes (%s)",
        engine.model_name,
        engine.engine.source.path,
        str(cfg.torch_dtype).removeprefix("torch."),
        cfg.torch_device,
        engine.max_model_len,
        engine.kv_capacity_tokens,
        engine.engine.block_manager.num_blocks,
        cfg.block_size,
        engine.kv_capacity_bytes,
        _format_bytes(engine.kv_capacity_bytes),
    )
    if options.security.api_keys:
        logger.info("API keys: %d; every path but the public ones needs one", len(options.security.api_keys))
    elif not options.security.checks_host:
        logger.warning("serving on %s without an API key: anyone who can reach it can use it", args.host)
    app = build_app(engine, shutdown_timeout=shutdown_timeout, options=options)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=log_level,
        timeout_graceful_shutdown=shutdown_timeout,  # type: ignore[arg-type]
        access_log=not getattr(args, "no_access_log", False),
    )
    server = _Server(config, engine, engine.model_name)
    # uvicorn re-raises the signal that stopped it once it has shut down, with the handler that was there
    # before it started: make that a no-op, so that a graceful SIGTERM exits with status 0.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    logger.info("server stopped")
    if engine.is_dead:
        logger.error("exiting with status 3: the engine died (%s)", engine.dead_reason)
        return 3
    return 0 if server.started else 1
