"""The server's edge: API keys, Host and Origin checks, JSON-only bodies of bounded size.

Pure ASGI middlewares, so that they run before FastAPI reads or parses anything; every refusal is the OpenAI
error body. Order (outermost first): Host check -> CORS -> Origin check -> API key -> body. Extending:
a new public route (a static page) goes in `PUBLIC_PATHS` / `PUBLIC_PREFIXES`; every other path needs the
key when keys are set (default-deny, so that a route added later is never open by accident).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

# Always open, with or without keys: the web page and its assets (the page sends the key itself).
PUBLIC_PATHS = frozenset({"/", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)
# Paths that `--public-path` may open (health probes and scrapers often cannot send a key).
EXEMPTIBLE_PATHS = ("/health", "/metrics", "/v1/models")
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


@dataclass(frozen=True)
class SecurityOptions:
    """Who may call the server and with what. Defaults: no key, loopback Host check, no CORS, no docs."""

    api_keys: tuple[str, ...] = ()
    public_paths: tuple[str, ...] = ()  # of EXEMPTIBLE_PATHS: open even when keys are set
    allowed_origins: tuple[str, ...] = ()  # CORS; "*" allows any origin
    allowed_hosts: tuple[str, ...] = ()  # Host header values accepted besides the loopback names
    bind_host: str | None = None  # the address served: a loopback bind checks the Host header
    enable_docs: bool = False
    max_body_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        bad = [p for p in self.public_paths if p not in EXEMPTIBLE_PATHS]
        if bad:
            raise ValueError(f"--public-path must be one of {', '.join(EXEMPTIBLE_PATHS)}, got {bad[0]!r}")
        if any(not k for k in self.api_keys):
            raise ValueError("an API key must not be empty")
        if self.max_body_bytes < 1024:
            raise ValueError(f"--max-body-bytes must be >= 1024, got {self.max_body_bytes}")

    @property
    def checks_host(self) -> bool:
        return bool(self.allowed_hosts) or is_loopback(self.bind_host)


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host.strip("[]") in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def error_json(message: str, type: str, code: str | None, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "param": param, "code": code}}).encode()


async def send_error(
    send: Any,
    status: int,
    message: str,
    type: str,
    code: str | None,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    body = error_json(message, type, code)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def _host_name(host: str) -> str:
    """The name part of a Host header ("[::1]:8000" -> "[::1]", "localhost:80" -> "localhost")."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


# ---- Host: DNS-rebinding defence ------------------------------------------------------------------------------
class HostCheckMiddleware:
    """On a loopback bind (or with --allowed-hosts), refuse a Host header that names another site: a page on
    evil.example whose DNS answer flips to 127.0.0.1 would otherwise reach this server as same-origin."""

    def __init__(self, app: Any, options: SecurityOptions):
        self.app = app
        self.allowed = {h.lower() for h in LOOPBACK_NAMES} | {_host_name(h) for h in options.allowed_hosts}
        if options.bind_host:
            self.allowed.add(_host_name(options.bind_host))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = _header(scope, b"host")
            if host is None or _host_name(host) not in self.allowed:
                await send_error(
                    send,
                    403,
                    f"Host {host!r} is not served here (a loopback server accepts only localhost names; "
                    "add others with --allowed-hosts)",
                    "permission_error",
                    "host_not_allowed",
                )
                return
        await self.app(scope, receive, send)


# ---- Origin: browsers on other sites ----------------------------------------------------------------------------
class OriginCheckMiddleware:
    """A browser request from another site (an Origin that is neither this server nor --allowed-origins) is
    refused before it runs: CORS only hides the answer, this stops the side effect too."""

    def __init__(self, app: Any, options: SecurityOptions):
        self.app = app
        self.any_origin = "*" in options.allowed_origins
        self.allowed = {o.rstrip("/").lower() for o in options.allowed_origins}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not self.any_origin:
            origin = _header(scope, b"origin")
            if origin is not None and not self._same_origin(scope, origin):
                if origin.rstrip("/").lower() not in self.allowed:
                    await send_error(
                        send,
                        403,
                        f"Origin {origin!r} is not allowed (see --allowed-origins)",
                        "permission_error",
                        "origin_not_allowed",
                    )
                    return
        await self.app(scope, receive, send)

    @staticmethod
    def _same_origin(scope: dict[str, Any], origin: str) -> bool:
        host = _header(scope, b"host")
        if host is None or origin == "null":
            return False
        return urlsplit(origin).netloc.lower() == host.strip().lower()


# ---- API keys ------------------------------------------------------------------------------------------------------
class ApiKeyMiddleware:
    """`Authorization: Bearer KEY` on every path but the public ones. Compared in constant time against every
    key (no early exit). The matched key's index goes to `scope["state"]["api_key_index"]` (per-key fair
    share); the key itself is never stored or logged."""

    def __init__(self, app: Any, options: SecurityOptions):
        self.app = app
        self.keys = [k.encode() for k in options.api_keys]
        self.public = set(PUBLIC_PATHS) | set(options.public_paths)
        if options.enable_docs:
            self.public |= DOCS_PATHS

    def is_public(self, path: str) -> bool:
        return path in self.public or path.startswith(PUBLIC_PREFIXES)

    def match(self, authorization: str | None) -> int | None:
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        given = token.strip().encode("latin-1", errors="replace")
        found = None
        for i, key in enumerate(self.keys):
            if hmac.compare_digest(given, key) and found is None:
                found = i
        return found

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.keys and scope.get("method") != "OPTIONS":
            index = self.match(_header(scope, b"authorization"))
            if index is None and not self.is_public(scope.get("path", "")):
                await send_error(
                    send,
                    401,
                    "Incorrect or missing API key: send the header `Authorization: Bearer <key>`",
                    "invalid_request_error",
                    "invalid_api_key",
                    [(b"www-authenticate", b"Bearer")],
                )
                return
            if index is not None:
                scope.setdefault("state", {})["api_key_index"] = index
        await self.app(scope, receive, send)


# ---- bodies: JSON only, bounded ---------------------------------------------------------------------------------------
class JSONBodyMiddleware:
    """A request with a body must say `Content-Type: application/json` (415 otherwise: a form or text/plain
    POST, which browsers send cross-site without a preflight, never runs) and carry at most `max_body_bytes`
    (413, checked on Content-Length and again while reading, before anything parses it)."""

    def __init__(self, app: Any, options: SecurityOptions):
        self.app = app
        self.limit = options.max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method", "").encode() not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        content_type = (_header(scope, b"content-type") or "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            shown = content_type or "none"
            await send_error(
                send,
                415,
                f"the request body must be JSON with `Content-Type: application/json` (got {shown})",
                "invalid_request_error",
                "unsupported_media_type",
            )
            return
        too_large = (
            f"the request body is larger than the server's limit of {self.limit} bytes (--max-body-bytes)"
        )
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.limit:
            await send_error(send, 413, too_large, "invalid_request_error", "request_too_large")
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await send_error(send, 413, too_large, "invalid_request_error", "request_too_large")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: http.disconnect, for streaming responses

        await self.app(scope, replay, send)
