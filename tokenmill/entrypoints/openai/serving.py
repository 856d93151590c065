"""Handlers of the OpenAI-compatible endpoints: request -> SamplingParams -> engine streams -> responses.

Everything that can be wrong with a request is found before the first byte is sent (pydantic ranges,
prompt/template checks, SamplingParams, engine admission), so it becomes a 4xx with the OpenAI error
body. After that, a stream can only fail if the engine does; it then ends with an SSE error event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from tokenmill.engine.async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    EngineError,
    EngineShuttingDownError,
    QueueFullError,
    RequestStream,
)
from tokenmill.entrypoints.openai import tools
from tokenmill.entrypoints.openai.fair_queue import FairGate, Ticket
from tokenmill.entrypoints.openai.limits import (
    LimitExceeded,
    check_count,
    check_output_budget,
    check_prompt_chars,
    check_stops,
)
from tokenmill.entrypoints.openai.protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    CompletionStreamResponse,
    DeltaMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    FunctionCallOut,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    ToolCall,
    UsageInfo,
)
from tokenmill.entrypoints.openai.server_options import ServerOptions
from tokenmill.errors import AdmissionError
from tokenmill.metrics import Metrics
from tokenmill.models.tokenizer import _bytes_to_unicode
from tokenmill.outputs import CompletionOutput, RequestOutput, TokenLogprobs
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured import StructuredOutputs

logger = logging.getLogger(__name__)

MAX_SEQUENCES_PER_REQUEST = 1024  # prompts x n
_OFFLOAD_CHARS = 8192  # tokenize/render texts longer than this in a worker thread, off the event loop
_DISCONNECT_POLL_S = 0.25
_BYTE_DECODER = {ch: b for b, ch in _bytes_to_unicode().items()}
_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class ApiError(Exception):
    """An error answered with the OpenAI error body."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def internal_error() -> ApiError:
    return ApiError(500, "Internal server error", type="server_error", code="internal_error")


class RequestTimeout(Exception):
    """The request's deadline (the server's --request-timeout, or the request's own `timeout`) passed."""

    def __init__(self, timeout: float):
        super().__init__(timeout)
        self.timeout = timeout


def timeout_error(exc: RequestTimeout) -> ApiError:
    return ApiError(
        408,
        f"the request did not finish within its timeout of {exc.timeout:g} s (the request's `timeout` field "
        "or the server's --request-timeout); it was stopped",
        type="timeout_error",
        code="request_timeout",
    )


def engine_failure(exc: EngineError) -> ApiError:
    """A request the engine failed (its message names the request and the cause, never a trace)."""
    return ApiError(500, str(exc) or "Internal server error", type="server_error", code="internal_error")


def limit_error(exc: LimitExceeded) -> ApiError:
    return ApiError(400, exc.message, param=exc.param, code="limit_exceeded")


def invalid_request(exc: AdmissionError, aliases: dict[str, str] | None = None) -> ApiError:
    """An AdmissionError as a 400 naming its parameter, under the name this endpoint gives it (`aliases`:
    engine name -> request field, e.g. chat's prompt -> messages, max_tokens -> max_completion_tokens)."""
    param = (aliases or {}).get(exc.param, exc.param)
    message = exc.message
    if param != exc.param and exc.param == "max_tokens":
        message = message.replace(exc.param, param)  # the message speaks of the field the client sent
    return ApiError(400, message, param=param, code=exc.code)


def admission_error(exc: BaseException, metrics: Metrics, aliases: dict[str, str] | None = None) -> ApiError:
    """The answer to a request the engine did not admit, by the error's type."""
    if isinstance(exc, AdmissionError):
        return invalid_request(exc, aliases)
    if isinstance(exc, QueueFullError):
        metrics.record_rejected()
        return ApiError(429, str(exc), type="rate_limit_error", code="rate_limit_exceeded")
    if isinstance(exc, EngineShuttingDownError | EngineDeadError):
        metrics.record_rejected()
        return ApiError(503, "the server is not accepting requests", type="server_error", code="unavailable")
    raise exc


def _text_size(prompt: Any) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return sum(len(p) for p in prompt)
    return 0


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"


# ---- per-request bookkeeping ------------------------------------------------------------------------------
class _Tracked:
    """One engine request of an HTTP request: its stream and last output, for metrics and cleanup; `ticket`
    (the request's place in the fair gate) is given back when it closes."""

    def __init__(self, stream: RequestStream, ticket: Ticket | None = None):
        self.stream = stream
        self.ticket = ticket
        self.last: RequestOutput | None = None
        self.error = False
        self.closed = False

    def poll(self) -> RequestOutput | None:
        try:
            out = self.stream.poll()
        except EngineError:
            self.error = True
            raise
        if out is not None:
            self.last = out
        return out

    def close(self, metrics: Metrics) -> None:
        """Abort if unfinished (a client went away, or an error), then account it once. Sync, so that it
        is safe in a `finally` of a cancelled task."""
        if self.closed:
            return
        self.closed = True
        if self.ticket is not None:
            self.ticket.release()
        if self.error:
            metrics.record_request(None, "error")
            return
        if self.last is not None and self.last.finished:
            metrics.record_request(self.last)
            return
        self.stream.abort()
        if self.last is None:
            metrics.record_request(None, "abort")
        else:
            metrics.record_request(self.last, "abort")


class _ClientStalled(Exception):
    """The client read nothing for the stall timeout while the server had an event to send."""


class _EventStreamResponse(StreamingResponse):
    """Server-sent events; `cleanup` runs however the response ends, even if the body never started
    (a client that leaves before the first chunk). A send that cannot complete within `stall_timeout`
    seconds (the client stopped reading, its socket buffers are full) ends the response: the connection
    is closed and the request aborted, so that its KV blocks go back to the others."""

    def __init__(self, body: AsyncIterator[str], cleanup: Any, stall_timeout: float | None = None):
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._cleanup = cleanup
        self._stall_timeout = stall_timeout

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        stall = self._stall_timeout
        stalled = False

        async def guarded_send(message: Any) -> None:
            nonlocal stalled
            try:
                await asyncio.wait_for(send(message), stall)
            except TimeoutError:
                stalled = True
                raise _ClientStalled from None

        try:
            await super().__call__(scope, receive, send if stall is None else guarded_send)
        except Exception:
            if not stalled:
                raise
            logger.warning("a streaming client read nothing for %g s; aborting its request", stall)
        finally:
            self._cleanup()


async def _merge(
    tracked: list[_Tracked], deadline: float | None = None, timeout: float = 0.0
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come (the newest of each), tagged with the stream's index. Raises
    RequestTimeout once the event loop's clock passes `deadline` (the request's `timeout` seconds)."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    for t in tracked:
        t.stream.set_listener(wake)
    pending = [i for i, t in enumerate(tracked) if not t.stream.finished]
    while pending:
        wake.clear()
        for i in list(pending):
            out = tracked[i].poll()
            if out is not None:
                yield i, out
            if tracked[i].stream.finished:
                pending.remove(i)
        if not pending or any(tracked[i].stream.has_item for i in pending):
            continue
        if deadline is None:
            await wake.wait()
            continue
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise RequestTimeout(timeout)
        try:
            await asyncio.wait_for(wake.wait(), remaining)
        except TimeoutError:
            raise RequestTimeout(timeout) from None


@dataclass
class _Context:
    """Per HTTP request: whose it is (the API key's index; fair share) and when it must end."""

    key: object
    deadline: float | None  # on the event loop's clock
    timeout: float = 0.0


@dataclass
class _ChoiceState:
    """What a stream has sent of one choice so far."""

    text_len: int = 0
    num_tokens: int = 0
    text_offset: int = 0
    started: bool = False
    finished: bool = False


@dataclass
class _Prompt:
    text: str | None
    token_ids: list[int]


class OpenAIServing:
    def __init__(
        self,
        engine: AsyncLLMEngine,
        metrics: Metrics,
        served_model_names: Sequence[str],
        options: ServerOptions | None = None,
    ):
        self.engine = engine
        self.options = options = options or ServerOptions()
        self.limits = options.limits.resolved(engine.max_model_len)
        self.gate = FairGate(
            options.max_in_engine or engine.config.max_num_seqs,
            options.max_waiting,
            options.max_concurrent_per_key,
        )
        self.metrics = metrics
        self.served_model_names = list(served_model_names)
        self.model_name = self.served_model_names[0]
        self.tokenizer = engine.tokenizer
        self.vocab_size = engine.model_config.vocab_size
        # The most tokens one sequence may hold: the context, or the whole KV cache if that is smaller.
        self.token_limit = min(engine.max_model_len, engine.kv_capacity_tokens)
        import tokenizers.decoders

        self._byte_level = isinstance(self.tokenizer.backend.decoder, tokenizers.decoders.ByteLevel)
        self._token_bytes_cache: dict[int, list[int]] = {}

    # ---- common checks ------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_model_names:
            raise ApiError(
                404,
                f"The model `{model}` does not exist. This server serves {self.model_name!r}.",
                param="model",
                code="model_not_found",
            )

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, max_model_len=self.engine.max_model_len)])

    def _context(
        self, req: CompletionRequest | ChatCompletionRequest, raw_request: Request | None
    ) -> _Context:
        key = None
        if raw_request is not None:
            key = raw_request.scope.get("state", {}).get("api_key_index")
        timeout = self.options.request_timeout
        if req.timeout is not None:
            timeout = req.timeout if timeout is None else min(timeout, req.timeout)
        if timeout is None:
            return _Context(key, None)
        return _Context(key, asyncio.get_running_loop().time() + timeout, timeout)

    def _check_common(self, req: CompletionRequest | ChatCompletionRequest) -> None:
        self.check_model(req.model)
        try:
            check_stops(self.limits, req.stop)
        except LimitExceeded as exc:
            raise limit_error(exc) from None
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
        if req.logit_bias:
            self._logit_bias(req)  # 400 on a key that is not a token id
        if isinstance(req.stop, list) and len(req.stop) > 64:
            raise ApiError(400, f"stop must be at most 64 strings, got {len(req.stop)}", param="stop")
        bad = [t for t in req.stop_token_ids or [] if t >= self.vocab_size]
        if bad:
            raise ApiError(400, f"stop_token_ids must be in [0, {self.vocab_size})", param="stop_token_ids")

    def _logit_bias(self, req: CompletionRequest | ChatCompletionRequest) -> dict[int, float] | None:
        if not req.logit_bias:
            return None
        bias = {}
        for key, value in req.logit_bias.items():
            if not key.isdigit() or int(key) >= self.vocab_size:
                raise ApiError(
                    400,
                    f"logit_bias keys must be token ids in [0, {self.vocab_size}), got {key!r}",
                    param="logit_bias",
                )
            bias[int(key)] = value
        if len(bias) > 1024:
            raise ApiError(400, "logit_bias takes at most 1024 tokens", param="logit_bias")
        return bias

    def _structured_request(
        self, req: CompletionRequest | ChatCompletionRequest
    ) -> tuple[StructuredOutputs, str] | None:
        """The output constraint a request asks for and the field that asked: response_format (json_object,
        json_schema) or one of the guided_* extra fields (vLLM's names). More than one is a 400."""
        found: list[tuple[StructuredOutputs, str]] = []

        def add(field: str, **constraint: Any) -> None:
            try:
                found.append((StructuredOutputs(**constraint), field))
            except AdmissionError as exc:
                raise ApiError(400, f"{field}: {exc.message}", param=field) from None

        rf = req.response_format
        if rf is not None and rf.type == "json_object":
            add("response_format", json_object=True)
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None:
                raise ApiError(
                    400, "response_format json_schema needs a json_schema object", param="response_format"
                )
            add("response_format", json=rf.json_schema.schema_)
        if req.guided_json is not None:
            add("guided_json", json=req.guided_json)
        if req.guided_regex is not None:
            add("guided_regex", regex=req.guided_regex)
        if req.guided_choice is not None:
            add("guided_choice", choice=tuple(req.guided_choice))
        if req.guided_grammar is not None:
            add("guided_grammar", grammar=req.guided_grammar)
        if len(found) > 1:
            raise ApiError(
                400,
                f"give one output constraint, got {', '.join(f for _, f in found)}",
                param=found[1][1],
            )
        return found[0] if found else None

    async def _compile(self, spec: StructuredOutputs, param: str) -> None:
        """Compile (or find cached) a constraint in a worker thread, so the engine thread never compiles; an
        invalid schema, regex or grammar is a 400 naming `param`."""
        try:
            await asyncio.to_thread(self.engine.structured.compile, spec)
        except AdmissionError as exc:
            raise ApiError(400, f"{param}: {exc.message}", param=param) from None

    def _sampling_params(
        self,
        req: CompletionRequest | ChatCompletionRequest,
        max_tokens: int,
        logprobs: int | None,
        max_tokens_param: str,
        structured: StructuredOutputs | None = None,
    ) -> SamplingParams:
        kwargs: dict[str, Any] = {
            "structured": structured,
            "logit_bias": self._logit_bias(req),
            "prompt_logprobs": req.prompt_logprobs
            if req.prompt_logprobs is not None
            else (req.logprobs if getattr(req, "echo", False) and isinstance(req.logprobs, int) else None),
            "n": req.n,
            "max_tokens": max_tokens,
            "min_tokens": req.min_tokens,
            "seed": req.seed,
            "stop": [req.stop] if isinstance(req.stop, str) else list(req.stop or []),
            "stop_token_ids": list(req.stop_token_ids or []),
            "ignore_eos": req.ignore_eos,
            "logprobs": logprobs,
            "skip_special_tokens": req.skip_special_tokens,
            "kv_policy": req.kv_policy,
        }
        for name in (
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
        ):
            value = getattr(req, name)
            if value is not None:
                kwargs[name] = value
        if kwargs["min_tokens"] > max_tokens:
            raise ApiError(400, f"min_tokens must be <= {max_tokens_param}", param="min_tokens")
        try:
            return SamplingParams(**kwargs)
        except AdmissionError as exc:
            raise invalid_request(exc, {"max_tokens": max_tokens_param}) from None

    def _default_max_tokens(self, num_prompt_tokens: int) -> int:
        """As many new tokens as fit; if none do, 1 so that the engine reports why."""
        return max(self.token_limit - num_prompt_tokens, 1)

    async def _admit(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        request_id: str,
        aliases: dict[str, str] | None = None,
        ctx: _Context | None = None,
    ) -> list[_Tracked]:
        """Wait for the request's fair share of the engine (the gate), then admit one engine request per
        prompt, all or none. `aliases`: see invalid_request."""
        ctx = ctx or _Context(None, None)
        weight = sum(p.n for p in params)
        try:
            if ctx.deadline is None:
                ticket = await self.gate.acquire(ctx.key, weight)
            else:
                remaining = ctx.deadline - asyncio.get_running_loop().time()
                ticket = await asyncio.wait_for(self.gate.acquire(ctx.key, weight), max(remaining, 0.0))
        except QueueFullError as exc:
            raise admission_error(exc, self.metrics, aliases) from None
        except TimeoutError:
            self.metrics.record_request(None, "abort")
            raise timeout_error(RequestTimeout(ctx.timeout)) from None
        tracked: list[_Tracked] = []
        try:
            for i, (ids, p) in enumerate(zip(prompts, params, strict=True)):
                stream = await self.engine.add_request({"prompt_token_ids": ids}, p, f"{request_id}-{i}")
                tracked.append(_Tracked(stream, ticket))
        except (AdmissionError, QueueFullError, EngineShuttingDownError, EngineDeadError) as exc:
            ticket.release()
            for t in tracked:
                t.stream.abort()
            raise admission_error(exc, self.metrics, aliases) from None
        except BaseException:
            ticket.release()
            for t in tracked:
                t.stream.abort()
            raise
        return tracked

    async def _collect(
        self, tracked: list[_Tracked], raw_request: Request | None, ctx: _Context | None = None
    ) -> list[RequestOutput] | None:
        """Wait for all final outputs; None if the client went away (its requests are aborted)."""
        ctx = ctx or _Context(None, None)

        async def drain() -> None:
            async for _ in _merge(tracked, ctx.deadline, ctx.timeout):
                pass

        task = asyncio.ensure_future(drain())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
                if done:
                    task.result()
                    break
                if raw_request is not None and await raw_request.is_disconnected():
                    logger.info("client disconnected; aborting its request")
                    return None
        except EngineError as exc:
            raise engine_failure(exc) from None
        except RequestTimeout as exc:
            raise timeout_error(exc) from None
        finally:
            task.cancel()
            for t in tracked:
                t.close(self.metrics)
        return [t.last for t in tracked]  # type: ignore[misc]

    # ---- logprobs -------------------------------------------------------------------------------------
    def token_bytes(self, token_id: int) -> list[int]:
        cached = self._token_bytes_cache.get(token_id)
        if cached is not None:
            return cached
        raw = self.tokenizer.id_to_token(token_id)
        m = _SP_BYTE.fullmatch(raw)
        if m:
            data = bytes([int(m.group(1), 16)])
        elif self._byte_level and raw and all(ch in _BYTE_DECODER for ch in raw):
            data = bytes(_BYTE_DECODER[ch] for ch in raw)
        else:
            data = self.tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")
        result = list(data)
        if len(self._token_bytes_cache) < 65536:
            self._token_bytes_cache[token_id] = result
        return result

    @staticmethod
    def _top(entry: TokenLogprobs, k: int) -> list[tuple[int, Any]]:
        return sorted(((tid, lp) for tid, lp in entry.items() if lp.rank <= k), key=lambda x: x[1].rank)[:k]

    def _completion_logprobs(
        self,
        token_ids: Sequence[int],
        entries: Sequence[TokenLogprobs],
        k: int,
        text_offset: int,
        prompt_ids: Sequence[int] = (),
        prompt_entries: Sequence[TokenLogprobs | None] | None = None,
    ) -> tuple[CompletionLogprobs, int]:
        out = CompletionLogprobs()
        decode = self.tokenizer.decode
        for i, tid in enumerate(prompt_ids):  # echo: the prompt's own logprobs (the first token has none)
            entry = prompt_entries[i] if prompt_entries is not None and i < len(prompt_entries) else None
            scored = entry.get(tid) if entry else None
            token = scored.decoded_token if scored else decode([tid], skip_special_tokens=False)
            out.tokens.append(token)
            out.token_logprobs.append(scored.logprob if scored else None)
            if scored is None:
                out.top_logprobs.append(None)
            else:
                top = {lp.decoded_token: lp.logprob for _, lp in self._top(entry, k)}
                top.setdefault(scored.decoded_token, scored.logprob)
                out.top_logprobs.append(top)
            out.text_offset.append(text_offset)
            text_offset += len(token)
        for tid, entry in zip(token_ids, entries, strict=False):
            sampled = entry.get(tid)
            token = sampled.decoded_token if sampled else decode([tid], skip_special_tokens=False)
            out.tokens.append(token)
            out.token_logprobs.append(sampled.logprob if sampled else None)
            top = {lp.decoded_token: lp.logprob for _, lp in self._top(entry, k)}
            if sampled is not None:
                top.setdefault(sampled.decoded_token, sampled.logprob)
            out.top_logprobs.append(top)
            out.text_offset.append(text_offset)
            text_offset += len(token)
        return out, text_offset

    def _chat_logprobs(
        self, token_ids: Sequence[int], entries: Sequence[TokenLogprobs], k: int
    ) -> ChatChoiceLogprobs:
        content = []
        for tid, entry in zip(token_ids, entries, strict=False):
            sampled = entry.get(tid)
            if sampled is None:
                continue
            content.append(
                ChatTokenLogprob(
                    token=sampled.decoded_token,
                    logprob=sampled.logprob,
                    bytes=self.token_bytes(tid),
                    top_logprobs=[
                        ChatTopLogprob(token=lp.decoded_token, logprob=lp.logprob, bytes=self.token_bytes(t))
                        for t, lp in self._top(entry, k)
                    ],
                )
            )
        return ChatChoiceLogprobs(content=content)

    @staticmethod
    def _usage(outputs: Sequence[RequestOutput | None]) -> UsageInfo:
        prompt = sum(len(o.prompt_token_ids) for o in outputs if o is not None)
        completion = sum(len(c.token_ids) for o in outputs if o is not None for c in o.outputs)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    # ---- /v1/completions ------------------------------------------------------------------------------
    def _completion_prompts(self, prompt: Any) -> list[_Prompt]:
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif not prompt:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        elif isinstance(prompt[0], int):
            items = [prompt]
        else:
            items = list(prompt)
        prompts = []
        for item in items:
            if isinstance(item, str):
                if not item:
                    raise ApiError(400, "prompt must not be an empty string", param="prompt")
                prompts.append(_Prompt(item, self.tokenizer.encode(item)))
            else:
                if not item:
                    raise ApiError(400, "prompt token list must not be empty", param="prompt")
                bad = [t for t in item if t >= self.vocab_size]
                if bad:
                    raise ApiError(
                        400,
                        f"prompt token ids must be in [0, {self.vocab_size}), got {bad[:5]}",
                        param="prompt",
                    )
                prompts.append(_Prompt(None, list(item)))
        return prompts

    def _check_budget(self, num_prompts: int, n: int, max_tokens: int, top: int | None, param: str) -> None:
        try:
            check_output_budget(self.limits, num_prompts, n, max_tokens, top or 0, param)
        except LimitExceeded as exc:
            raise limit_error(exc) from None

    def _check_completion_limits(self, req: CompletionRequest) -> None:
        """Counts and sizes of the body as sent, before anything is tokenized."""
        prompt = req.prompt
        num_prompts = (
            len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
        )
        try:
            check_count(self.limits.max_prompts, num_prompts, "prompt", "prompts", "--max-prompts")
            check_prompt_chars(self.limits, _text_size(prompt), "prompt")
        except LimitExceeded as exc:
            raise limit_error(exc) from None
        if req.max_tokens is not None:
            self._check_budget(num_prompts, req.n, req.max_tokens, req.logprobs, "max_tokens")

    def _check_chat_limits(self, req: ChatCompletionRequest | TokenizeRequest) -> list[dict[str, str]]:
        messages = self._chat_messages(req)
        try:
            check_count(self.limits.max_messages, len(messages), "messages", "messages", "--max-messages")
            check_prompt_chars(
                self.limits, sum(len(str(m.get("content") or "")) for m in messages), "messages"
            )
        except LimitExceeded as exc:
            raise limit_error(exc) from None
        return messages

    async def create_completion(self, req: CompletionRequest, raw_request: Request | None = None) -> Response:
        self._check_common(req)
        if req.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise ApiError(400, "best_of is not supported (it must equal n)", param="best_of")
        self._check_completion_limits(req)
        ctx = self._context(req, raw_request)
        if _text_size(req.prompt) > _OFFLOAD_CHARS:
            prompts = await asyncio.to_thread(self._completion_prompts, req.prompt)
        else:
            prompts = self._completion_prompts(req.prompt)
        if len(prompts) * req.n > MAX_SEQUENCES_PER_REQUEST:
            raise ApiError(
                400,
                f"prompts x n must be at most {MAX_SEQUENCES_PER_REQUEST}, got {len(prompts) * req.n}",
                param="n",
            )
        constraint = self._structured_request(req)
        if constraint is not None:
            await self._compile(*constraint)
        params = [
            self._sampling_params(
                req,
                req.max_tokens if req.max_tokens is not None else self._default_max_tokens(len(p.token_ids)),
                req.logprobs,
                "max_tokens",
                constraint[0] if constraint else None,
            )
            for p in prompts
        ]
        if req.max_tokens is None:
            self._check_budget(
                len(prompts), req.n, max(p.max_tokens or 0 for p in params), req.logprobs, "max_tokens"
            )
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        tracked = await self._admit([p.token_ids for p in prompts], params, request_id, ctx=ctx)
        if req.stream:
            return self._streaming_response(
                self._stream_completion(req, request_id, created, prompts, tracked, ctx), tracked
            )
        finals = await self._collect(tracked, raw_request, ctx)
        if finals is None:
            return Response(status_code=499)
        choices = []
        for i, (prompt, final) in enumerate(zip(prompts, finals, strict=True)):
            for c in final.outputs:
                prefix = self._echo_text(prompt) if req.echo else ""
                logprobs = None
                if req.logprobs is not None:
                    logprobs, _ = self._completion_logprobs(
                        c.token_ids,
                        c.logprobs or [],
                        req.logprobs,
                        0,
                        prompt.token_ids if req.echo else (),
                        final.prompt_logprobs,
                    )
                choices.append(
                    CompletionChoice(
                        index=i * req.n + c.index,
                        text=prefix + c.text,
                        logprobs=logprobs,
                        prompt_logprobs=self._prompt_logprobs(final)
                        if req.prompt_logprobs is not None
                        else None,
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                    )
                )
        response = CompletionResponse(
            id=request_id, created=created, model=self.model_name, choices=choices, usage=self._usage(finals)
        )
        return Response(response.model_dump_json(), media_type="application/json")

    @staticmethod
    def _prompt_logprobs(out: RequestOutput) -> list[dict[str, dict[str, Any]] | None] | None:
        """vLLM's prompt_logprobs form: per prompt token None (the first) or {token id: {logprob, rank,
        decoded_token}} holding the prompt token and the top k."""
        if out.prompt_logprobs is None:
            return None
        return [
            None
            if entry is None
            else {
                str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
                for t, lp in entry.items()
            }
            for entry in out.prompt_logprobs
        ]

    def _echo_text(self, prompt: _Prompt) -> str:
        if prompt.text is not None:
            return prompt.text
        return self.tokenizer.decode(prompt.token_ids, skip_special_tokens=False)

    async def _stream_completion(
        self,
        req: CompletionRequest,
        request_id: str,
        created: int,
        prompts: list[_Prompt],
        tracked: list[_Tracked],
        ctx: _Context,
    ) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        exclude = None if include_usage else {"usage"}
        states: dict[int, _ChoiceState] = {}
        try:
            async for i, out in _merge(tracked, ctx.deadline, ctx.timeout):
                for c in out.outputs:
                    index = i * req.n + c.index
                    st = states.setdefault(index, _ChoiceState())
                    prefix = ""
                    echo_ids: Sequence[int] = ()
                    if req.echo and not st.started:
                        prefix = self._echo_text(prompts[i])
                        echo_ids = prompts[i].token_ids
                    st.started = True
                    text = self._delta(c, st)
                    logprobs = None
                    if req.logprobs is not None and (len(c.token_ids) > st.num_tokens or echo_ids):
                        logprobs, st.text_offset = self._completion_logprobs(
                            c.token_ids[st.num_tokens :],
                            (c.logprobs or [])[st.num_tokens :],
                            req.logprobs,
                            st.text_offset,
                            echo_ids,
                            out.prompt_logprobs,
                        )
                    st.num_tokens = len(c.token_ids)
                    finish = c.finish_reason if c.finish_reason and not st.finished else None
                    st.finished = st.finished or finish is not None
                    if not (prefix or text or logprobs or finish):
                        continue
                    chunk = CompletionStreamResponse(
                        id=request_id,
                        created=created,
                        model=self.model_name,
                        choices=[
                            CompletionStreamChoice(
                                index=index,
                                text=prefix + text,
                                logprobs=logprobs,
                                finish_reason=finish,
                                stop_reason=c.stop_reason if finish else None,
                            )
                        ],
                    )
                    yield sse(chunk.model_dump_json(exclude=exclude))
            if include_usage:
                chunk = CompletionStreamResponse(
                    id=request_id,
                    created=created,
                    model=self.model_name,
                    choices=[],
                    usage=self._usage([t.last for t in tracked]),
                )
                yield sse(chunk.model_dump_json())
            yield SSE_DONE
        except Exception as exc:
            yield self._stream_error(exc, request_id)
            yield SSE_DONE
        finally:
            for t in tracked:
                t.close(self.metrics)

    def _stream_error(self, exc: Exception, request_id: str) -> str:
        """The SSE error event that ends a stream which cannot go on (its requests are then aborted)."""
        if isinstance(exc, RequestTimeout):
            logger.info("stream %s: %s s deadline passed", request_id, exc.timeout)
            return sse(json.dumps(timeout_error(exc).body()))
        if isinstance(exc, EngineError):
            logger.warning("stream %s: %s", request_id, exc)
            return sse(json.dumps(engine_failure(exc).body()))
        logger.exception("stream %s failed", request_id, exc_info=exc)
        return sse(json.dumps(internal_error().body()))

    @staticmethod
    def _delta(c: CompletionOutput, st: _ChoiceState) -> str:
        text = c.text[st.text_len :]
        st.text_len = max(st.text_len, len(c.text))
        return text

    def _streaming_response(self, body: AsyncIterator[str], tracked: list[_Tracked]) -> StreamingResponse:
        def cleanup() -> None:
            for t in tracked:
                t.close(self.metrics)

        return _EventStreamResponse(body, cleanup, self.options.stream_stall_timeout)

    # ---- /v1/chat/completions -------------------------------------------------------------------------
    def _chat_messages(self, req: ChatCompletionRequest | TokenizeRequest) -> list[dict[str, Any]]:
        messages = []
        for m in req.messages or []:
            if isinstance(m.content, list):
                content = "".join(part.text for part in m.content)
            else:
                content = m.content or ""
            msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
            if m.tool_calls:
                msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            if m.name is not None and m.role == "tool":
                msg["name"] = m.name
            messages.append(msg)
        return messages

    def _chat_prompt_ids(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=True, tools=tools
            )
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise ApiError(
                400, str(exc) or "the chat template failed on these messages", param="messages"
            ) from None
        return list(ids)

    async def _check_tools(self, req: ChatCompletionRequest) -> None:
        """Every tool's parameters must be a JSON schema the grammar engine takes (they constrain required /
        named calls); a named tool_choice must name one of the tools."""
        if req.tool_choice is not None and not req.tools and req.tool_choice != "none":
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        for i, tool in enumerate(req.tools or []):
            if tool.function.parameters is not None:
                await self._compile(
                    StructuredOutputs(json=tool.function.parameters), f"tools.{i}.function.parameters"
                )
        if tools.tool_choice_mode(req) == "named" and tools.named_tool(req) is None:
            raise ApiError(
                400,
                f"tool_choice names {req.tool_choice.function.name!r}, which is not in tools",
                param="tool_choice",
            )

    async def create_chat_completion(
        self, req: ChatCompletionRequest, raw_request: Request | None = None
    ) -> Response:
        self._check_common(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        messages = self._check_chat_limits(req)
        max_asked = req.max_completion_tokens or req.max_tokens
        top_k = (req.top_logprobs or 0) if req.logprobs else 0
        if max_asked is not None:
            self._check_budget(1, req.n, max_asked, top_k, "max_completion_tokens")
        ctx = self._context(req, raw_request)
        await self._check_tools(req)
        constraint = self._structured_request(req)
        tool_spec = tools.tool_constraint(req)
        if tool_spec is not None:
            constraint = (tool_spec, "tools")
        if constraint is not None:
            await self._compile(*constraint)
        messages, tool_list = tools.render_messages(
            req, messages, tools.template_knows_tools(self.tokenizer.chat_template)
        )
        if sum(len(m["content"]) for m in messages) > _OFFLOAD_CHARS:
            ids = await asyncio.to_thread(self._chat_prompt_ids, messages, True, tool_list)
        else:
            ids = self._chat_prompt_ids(messages, True, tool_list)
        if req.max_completion_tokens is not None:
            max_tokens, max_param = req.max_completion_tokens, "max_completion_tokens"
        elif req.max_tokens is not None:
            max_tokens, max_param = req.max_tokens, "max_tokens"
        else:
            max_tokens, max_param = self._default_max_tokens(len(ids)), "max_completion_tokens"
            self._check_budget(1, req.n, max_tokens, top_k, max_param)
        top_k = req.top_logprobs or 0
        params = self._sampling_params(
            req, max_tokens, top_k if req.logprobs else None, max_param, constraint[0] if constraint else None
        )
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        tracked = await self._admit(
            [ids], [params], request_id, {"prompt": "messages", "max_tokens": max_param}, ctx
        )
        if req.stream:
            return self._streaming_response(
                self._stream_chat(req, request_id, created, tracked, ctx), tracked
            )
        finals = await self._collect(tracked, raw_request, ctx)
        if finals is None:
            return Response(status_code=499)
        final = finals[0]
        choices = []
        for c in final.outputs:
            content, calls = tools.parse_reply(req, c.text)
            choices.append(
                ChatCompletionChoice(
                    index=c.index,
                    message=ChatResponseMessage(
                        content=content,
                        tool_calls=[
                            ToolCall(
                                id=call.id, function=FunctionCallOut(name=call.name, arguments=call.arguments)
                            )
                            for call in calls
                        ],
                    ),
                    logprobs=self._chat_logprobs(c.token_ids, c.logprobs or [], top_k)
                    if req.logprobs
                    else None,
                    finish_reason="tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason,
                    stop_reason=c.stop_reason,
                )
            )
        response = ChatCompletionResponse(
            id=request_id,
            created=created,
            model=self.model_name,
            choices=choices,
            usage=self._usage(finals),
            prompt_logprobs=self._prompt_logprobs(final) if req.prompt_logprobs is not None else None,
        )
        return Response(response.model_dump_json(), media_type="application/json")

    async def _stream_chat(
        self,
        req: ChatCompletionRequest,
        request_id: str,
        created: int,
        tracked: list[_Tracked],
        ctx: _Context,
    ) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        exclude = None if include_usage else {"usage"}
        top_k = req.top_logprobs or 0

        def chunk(choice: ChatCompletionStreamChoice) -> str:
            return sse(
                ChatCompletionStreamResponse(
                    id=request_id, created=created, model=self.model_name, choices=[choice]
                ).model_dump_json(exclude=exclude)
            )

        states = [_ChoiceState() for _ in range(req.n)]
        replies = [tools.ReplyStreamer(req) for _ in range(req.n)]
        try:
            for index in range(req.n):
                yield chunk(
                    ChatCompletionStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))
                )
            async for _, out in _merge(tracked, ctx.deadline, ctx.timeout):
                for c in out.outputs:
                    st = states[c.index]
                    text = self._delta(c, st)
                    logprobs = None
                    if req.logprobs and len(c.token_ids) > st.num_tokens:
                        logprobs = self._chat_logprobs(
                            c.token_ids[st.num_tokens :], (c.logprobs or [])[st.num_tokens :], top_k
                        )
                    st.num_tokens = len(c.token_ids)
                    finish = c.finish_reason if c.finish_reason and not st.finished else None
                    st.finished = st.finished or finish is not None
                    reply = replies[c.index]
                    text, calls = reply.feed(text, finish is not None)
                    if finish == "stop" and reply.called:
                        finish = "tool_calls"
                    if not (text or calls or logprobs or finish):
                        continue
                    yield chunk(
                        ChatCompletionStreamChoice(
                            index=c.index,
                            delta=DeltaMessage(content=text or None, tool_calls=calls or None),
                            logprobs=logprobs,
                            finish_reason=finish,
                            stop_reason=c.stop_reason if finish else None,
                        )
                    )
            if include_usage:
                usage = ChatCompletionStreamResponse(
                    id=request_id,
                    created=created,
                    model=self.model_name,
                    choices=[],
                    usage=self._usage([t.last for t in tracked]),
                )
                yield sse(usage.model_dump_json())
            yield SSE_DONE
        except Exception as exc:
            yield self._stream_error(exc, request_id)
            yield SSE_DONE
        finally:
            for t in tracked:
                t.close(self.metrics)

    # ---- tokenizer endpoints --------------------------------------------------------------------------
    def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "give exactly one of prompt or messages", param="prompt")
        if req.prompt is not None:
            try:
                check_prompt_chars(self.limits, len(req.prompt), "prompt")
            except LimitExceeded as exc:
                raise limit_error(exc) from None
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            ids = self._chat_prompt_ids(self._check_chat_limits(req), req.add_generation_prompt)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.engine.max_model_len)

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(req.model)
        bad = [t for t in req.tokens if t >= self.vocab_size]
        if bad:
            raise ApiError(400, f"token ids must be in [0, {self.vocab_size}), got {bad[:5]}", param="tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens))
