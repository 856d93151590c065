"""The engine loop in a background thread, with one async stream per request.

`LLMEngine` is synchronous and not thread-safe, so exactly one thread touches it: the loop thread. It
drains a thread-safe command queue (add / abort / stop) between steps, runs `step()`, and hands each
request's outputs to that request's `asyncio.Queue` through `loop.call_soon_threadsafe`. Torch releases
the GIL inside its ops, so the event loop stays responsive while a step runs.

Admission happens in the loop thread too (it owns the scheduler's view of the waiting queue); its result
comes back through an asyncio future, so `add_request` raises `AdmissionError` (a bad request) or
`QueueFullError` before any output is streamed. A consumer that stops iterating (a client disconnect
cancels its task, or it closes the generator) aborts its request, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine, PromptInput
from tokenmill.errors import DUPLICATE_REQUEST_ID, AdmissionError
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = [
    "AsyncLLMEngine",
    "EngineDeadError",
    "EngineError",
    "EngineShuttingDownError",
    "EngineStats",
    "QueueFullError",
    "RequestStream",
]


class EngineError(RuntimeError):
    """The engine failed while running a request; the request's stream ends with this error."""


class EngineDeadError(EngineError):
    """The engine loop has stopped after a failure it could not recover from; no request is admitted."""


class EngineShuttingDownError(RuntimeError):
    """The engine stopped admitting requests because it is shutting down."""


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit (`max_waiting`); the caller should retry later."""


ARRIVAL_GAP_S = 0.01  # an idle engine's first step waits while requests keep arriving this close together...
BURST_WINDOW_S = 0.1  # ... for at most this long (AsyncLLMEngine._take_burst)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot published by the loop thread after every iteration (safe to read from any thread)."""

    num_requests_running: int = 0  # requests with at least one sequence holding KV blocks
    num_requests_waiting: int = 0  # admitted requests with no running sequence yet (or preempted)
    num_seqs_running: int = 0
    num_seqs_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    kv_bytes_used: int = 0  # in the cache's format: a smaller format holds more tokens in the same bytes
    kv_tokens_held: int = 0  # slots held by running sequences
    kv_format: str = ""  # e.g. fp32, int8
    kv_policy: str = "full"  # the engine's default eviction policy
    kv_evictions: int = 0  # compactions done by eviction policies
    kv_evicted_tokens: int = 0  # slots they freed
    spec_draft_tokens: int = 0  # speculative decoding: drafts proposed and verified so far
    spec_accepted_tokens: int = 0  # of those, accepted
    spec_mean_acceptance_length: float = 0.0  # tokens emitted per verification
    prefix_cache_hit_rate: float = 0.0
    num_preemptions: int = 0


# ---- commands: what callers hand the loop thread, through a thread-safe queue -------------------------------
@dataclass(frozen=True, eq=False)
class AddCommand:
    """Admit a request; the outcome (None or the admission error) resolves `future` on `stream.loop`."""

    prompt: PromptInput
    params: SamplingParams
    request_id: str
    stream: RequestStream
    future: asyncio.Future[None]
    arrival_time: float  # time.time() when submitted: a step may run before the loop thread takes it


@dataclass(frozen=True)
class AbortCommand:
    """Abort a request (unknown or finished ids are ignored)."""

    request_id: str


@dataclass(frozen=True)
class StopCommand:
    """Abort every request and end the loop thread."""


Command = AddCommand | AbortCommand | StopCommand


class RequestStream:
    """Async iterator over one request's outputs (cumulative snapshots; a slow consumer gets the latest).

    Ends after the output with `finished=True`; raises `EngineError` if the engine failed the request.
    `abort()` (sync, idempotent) cancels the request; leaving an unfinished stream should always abort it.
    Back-pressure: the stream holds one item, the newest (outputs are cumulative, so a newer one replaces an
    unread older one), so however slowly its consumer reads, its memory stays one snapshot.
    """

    def __init__(self, request_id: str, owner: AsyncLLMEngine, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.loop = loop
        self._owner = owner
        self._latest: RequestOutput | BaseException | None = None
        self._ready = asyncio.Event()
        self._listener: asyncio.Event | None = None  # also set on every new item (merging several streams)
        self._done = False  # the final output or an error has been handed to the consumer
        self._closed = False  # the final output or an error has been delivered
        self._aborted = False

    @property
    def finished(self) -> bool:
        return self._done

    @property
    def has_item(self) -> bool:
        return self._latest is not None

    def set_listener(self, event: asyncio.Event) -> None:
        self._listener = event
        if self._latest is not None:
            event.set()

    def _put(self, item: RequestOutput | BaseException) -> None:  # on the event loop
        if self._closed:
            return
        if isinstance(item, BaseException) or item.finished:
            self._closed = True
        self._latest = item
        self._ready.set()
        if self._listener is not None:
            self._listener.set()

    def poll(self) -> RequestOutput | None:
        """The newest output not yet taken, or None; raises the engine's error for this request."""
        item = self._latest
        if item is None or self._done:
            return None
        self._latest = None
        self._ready.clear()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finished:
            self._done = True
        return item

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        while self._latest is None:
            await self._ready.wait()  # cancel-safe: nothing is taken until it returns
        item = self.poll()
        assert item is not None
        return item

    def abort(self) -> None:
        """Stop the request and free its blocks; a no-op once it has finished."""
        if self._done or self._aborted:
            return
        self._aborted = True
        self._owner._abort_nowait(self.request_id)


class AsyncLLMEngine:
    """Runs an `LLMEngine` in one background thread and serves it to asyncio code.

    Public API:
      `await add_request(prompt, params, request_id)` -> RequestStream  (raises on admission errors)
      `generate(prompt, params, request_id)` -> async iterator of RequestOutput
      `await abort(request_id)`, `stop_admission()`, `await shutdown(timeout)`, `start()`
      read-only: tokenizer, model_config, max_model_len, kv_capacity_tokens, model_name, config, stats
    """

    def __init__(self, engine: LLMEngine, max_waiting: int | None = None):
        if max_waiting is not None and max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1 (or None for no limit), got {max_waiting}")
        self.engine = engine
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders command submission against the loop thread's exit
        self._closed = False  # the loop thread has exited (or never will run again)
        self._accepting = True
        self._dead: BaseException | None = None
        self._thread: threading.Thread | None = None
        # Watchdog: the loop thread stamps this whenever it makes progress; with work pending, a stamp older
        # than watchdog_timeout seconds means a step hangs (stalled_for; the server's /health turns 503).
        self.watchdog_timeout: float | None = None
        self._heartbeat = time.monotonic()
        self._streams: dict[str, RequestStream] = {}  # loop thread only
        self._active: set[RequestStream] = set()  # event loop side: admitted, not yet finished
        self._stats = EngineStats(
            kv_blocks_total=engine.block_manager.num_blocks,
            kv_format=engine.kv_spec.format,
            kv_policy=str(engine.config.kv_policy),
        )

    @classmethod
    def from_config(cls, config: EngineConfig, max_waiting: int | None = None) -> AsyncLLMEngine:
        """Load the engine on a short-lived thread, not the caller's: see `build_off_thread`."""
        return cls(build_off_thread(config), max_waiting=max_waiting)

    @classmethod
    def from_engine_args(
        cls, model: str | None = None, max_waiting: int | None = None, **engine_options: Any
    ) -> AsyncLLMEngine:
        return cls.from_config(EngineConfig(model=model, **engine_options), max_waiting=max_waiting)

    # ---- read-only facts (immutable after load, safe from any thread) ---------------------------
    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_config(self):
        return self.engine.model_config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def kv_capacity_tokens(self) -> int:
        return self.engine.kv_capacity_tokens

    @property
    def kv_capacity_bytes(self) -> int:
        return self.engine.kv_capacity_tokens * self.engine.kv_bytes_per_token

    @property
    def structured(self):
        """The engine's grammar compiler (thread-safe): the server compiles constraints with it in worker
        threads before submitting, so the engine thread only finds them in its cache."""
        return self.engine.structured

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def stats(self) -> EngineStats:
        return self._stats

    @property
    def num_active_requests(self) -> int:
        return len(self._active)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    @property
    def dead_reason(self) -> str:
        return "" if self._dead is None else f"{type(self._dead).__name__}: {self._dead}"

    def stalled_for(self) -> float | None:
        """Seconds since the loop last made progress, if work is pending and that is beyond
        `watchdog_timeout`; else None (healthy, idle, or no watchdog)."""
        if self.watchdog_timeout is None or not self.is_running:
            return None
        if not self._active and self._commands.empty():
            return None
        idle = time.monotonic() - self._heartbeat
        return idle if idle > self.watchdog_timeout else None

    @property
    def accepting(self) -> bool:
        return self._accepting and not self._closed and self._dead is None

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the loop thread (idempotent)."""
        with self._lock:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
            self._thread.start()

    def stop_admission(self) -> None:
        """New requests are refused with EngineShuttingDownError; admitted ones run on (signal-safe)."""
        self._accepting = False

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop admission, wait up to `timeout` seconds for in-flight requests, abort the rest, stop."""
        self.stop_admission()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        while self._active and self.is_running and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self._active:
            logger.warning("shutdown: aborting %d unfinished request(s)", len(self._active))
        self._submit(StopCommand())
        thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join, 30.0)
        with self._lock:
            self._closed = True

    # ---- requests -------------------------------------------------------------------------------
    async def add_request(
        self,
        prompt: PromptInput,
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> RequestStream:
        """Admit a request and return its output stream.

        Raises AdmissionError (invalid request: prompt too long, bad token ids, id in use, ...), QueueFullError,
        EngineShuttingDownError or EngineDeadError before anything is streamed."""
        if self._dead is not None:
            raise EngineDeadError("the engine has stopped after an error")
        if not self._accepting:
            raise EngineShuttingDownError("the server is shutting down")
        self.start()
        loop = asyncio.get_running_loop()
        if request_id is None:
            request_id = f"req-{uuid.uuid4().hex}"
        stream = RequestStream(request_id, self, loop)
        future: asyncio.Future[None] = loop.create_future()
        self._submit(AddCommand(prompt, params or SamplingParams(), request_id, stream, future, time.time()))
        try:
            await future
        except asyncio.CancelledError:
            self._abort_nowait(request_id)  # the add may still succeed in the loop thread
            raise
        if not stream._closed:  # its final output may already have been delivered
            self._active.add(stream)
        return stream

    async def generate(
        self,
        prompt: PromptInput,
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until it finishes. Admission errors are raised by the first
        `__anext__`, before any output; closing or cancelling the iteration aborts the request."""
        stream = await self.add_request(prompt, params, request_id)
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    async def abort(self, request_id: str) -> None:
        self._abort_nowait(request_id)

    def _abort_nowait(self, request_id: str) -> None:
        self._submit(AbortCommand(request_id))

    def _submit(self, command: Command) -> None:
        with self._lock:
            if not self._closed:
                self._commands.put(command)
                return
        # The loop thread is gone: answer here so that no caller waits forever.
        if isinstance(command, AddCommand):
            _resolve_threadsafe(command.stream.loop, command.future, self._closed_error())

    def _closed_error(self) -> BaseException:
        """What an add gets once the loop thread has exited."""
        if self._dead is not None:
            return EngineDeadError("the engine has stopped after an error")
        return EngineShuttingDownError("the engine has shut down")

    # ---- the loop thread ------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        wait: float | None = None  # how long to block for commands: None forever, 0 not at all
        batch: deque[Command] = deque()  # commands taken off the queue, not yet handled
        try:
            while True:
                idle = not engine.has_unfinished_requests()
                batch.extend(self._take_commands(None if idle else wait))
                if idle and any(isinstance(command, AddCommand) for command in batch):
                    batch.extend(self._take_burst())
                self._heartbeat = time.monotonic()
                stop = False
                while batch:
                    command = batch.popleft()
                    if isinstance(command, AddCommand):
                        self._handle_add(command)
                    elif isinstance(command, AbortCommand):
                        self._handle_abort(command.request_id)
                    else:
                        stop = True
                if stop:
                    self._abort_all()
                    break
                wait = 0.0
                if engine.has_unfinished_requests():
                    try:
                        outputs = engine.step()
                    except Exception as exc:
                        logger.exception("engine step failed; failing the requests in flight")
                        if not self._recover(exc):
                            break
                    else:
                        self._dispatch(outputs)
                        if not outputs:
                            wait = 0.001  # nothing sampled this step: don't spin if nothing can run
                    self._heartbeat = time.monotonic()
                self._publish_stats()
        except BaseException as exc:  # a bug in the loop itself: fail everything, never hang a client
            logger.exception("engine loop crashed")
            self._dead = exc
            self._fail_all(EngineDeadError("the engine loop crashed"))
        finally:
            try:
                self._publish_stats()
            except Exception:
                pass
            with self._lock:
                self._closed = True
            # Answer the adds that will never be handled (taken off the queue, or submitted before
            # _closed was set), so that no caller waits forever.
            while True:
                try:
                    batch.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            error = self._closed_error()
            for command in batch:
                if isinstance(command, AddCommand):
                    _resolve_threadsafe(command.stream.loop, command.future, error)

    def _take_burst(self) -> list[Command]:
        """Commands that keep arriving within ARRIVAL_GAP_S of each other, for at most BURST_WINDOW_S.

        Requests that reach an idle engine together (clients starting at once) are parsed one by one on the
        event loop; without this the first would start a step alone while the rest queue behind it, and the
        step budget could not plan their first tokens together (step_budget.on_time_budget). A lone request
        waits ARRIVAL_GAP_S."""
        commands: list[Command] = []
        deadline = time.monotonic() + BURST_WINDOW_S
        while (left := deadline - time.monotonic()) > 0:
            more = self._take_commands(min(ARRIVAL_GAP_S, left))
            if not more:
                break
            commands += more
        return commands

    def _take_commands(self, timeout: float | None) -> list[Command]:
        commands = []
        try:
            if timeout is None:
                commands.append(self._commands.get())
            elif timeout > 0:
                commands.append(self._commands.get(timeout=timeout))
        except queue.Empty:
            return commands
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _num_waiting_requests(self) -> int:
        scheduler = self.engine.scheduler
        running = {seq.request.request_id for seq in scheduler.running}
        return len({seq.request.request_id for seq in scheduler.waiting} - running)

    def _handle_add(self, command: AddCommand) -> None:
        request_id, stream, future = command.request_id, command.stream, command.future
        try:
            if not self._accepting:
                raise EngineShuttingDownError("the server is shutting down")
            if self.max_waiting is not None and self._num_waiting_requests() >= self.max_waiting:
                raise QueueFullError(
                    f"the server is busy: {self.max_waiting} request(s) are already waiting; retry later"
                )
            if request_id in self._streams:
                raise AdmissionError(
                    "request_id", DUPLICATE_REQUEST_ID, f"request id {request_id!r} is already in use"
                )
            self.engine.add_request(command.prompt, command.params, request_id, command.arrival_time)
        except Exception as exc:
            _resolve_threadsafe(stream.loop, future, exc)
            return
        self._streams[request_id] = stream
        _resolve_threadsafe(stream.loop, future, None)

    def _handle_abort(self, request_id: str) -> None:
        output = self.engine.abort_request(request_id)
        stream = self._streams.pop(request_id, None)
        if stream is not None and output is not None:
            self._deliver_threadsafe([(stream, output)])

    def _abort_all(self) -> None:
        for request_id in list(self.engine.requests):
            self._handle_abort(request_id)
        self._fail_all(EngineShuttingDownError("the engine has shut down"))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        items: list[tuple[RequestStream, RequestOutput | BaseException]] = []
        failures = self.engine.failures
        for output in outputs:
            if output.finished:
                stream = self._streams.pop(output.request_id, None)
            else:
                stream = self._streams.get(output.request_id)
            reason = failures.pop(output.request_id, None) if failures else None
            if stream is not None:
                items.append((stream, output if reason is None else EngineError(reason)))
        self._deliver_threadsafe(items)

    def _recover(self, exc: BaseException) -> bool:
        """After a failed step: fail the streams in flight, abort their requests, and go on if the engine
        is back to a clean state (no request, no used block). Returns False if the engine is now dead."""
        self._fail_all(EngineError("the engine failed while running this request"))
        for request_id in list(self.engine.requests):
            try:
                self.engine.abort_request(request_id)
            except Exception:
                logger.exception("abort after a failed step failed")
        bm, scheduler = self.engine.block_manager, self.engine.scheduler
        if self.engine.requests or scheduler.has_work() or bm.num_used_blocks:
            logger.error("the engine is not clean after a failed step; refusing new requests")
            self._dead = exc
            return False
        return True

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = list(self._streams.values()), {}
        self._deliver_threadsafe([(stream, error) for stream in streams])

    def _deliver_threadsafe(self, items: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, item in items:
            by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._deliver, batch)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _deliver(self, batch: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
        for stream, item in batch:  # on the event loop
            stream._put(item)
            if stream._closed:
                self._active.discard(stream)

    def _publish_stats(self) -> None:
        scheduler, bm = self.engine.scheduler, self.engine.block_manager
        running = {seq.request.request_id for seq in scheduler.running}
        waiting = {seq.request.request_id for seq in scheduler.waiting} - running
        self._stats = EngineStats(
            num_requests_running=len(running),
            num_requests_waiting=len(waiting),
            num_seqs_running=len(scheduler.running),
            num_seqs_waiting=len(scheduler.waiting),
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_total=bm.num_blocks,
            kv_bytes_used=bm.num_used_blocks * self.engine.kv_spec.bytes_per_block,
            kv_tokens_held=sum(seq.num_kv_slots for seq in scheduler.running),
            kv_format=self.engine.kv_spec.format,
            kv_policy=str(self.engine.config.kv_policy),
            kv_evictions=self.engine.kv_compressor.stats.evictions,
            kv_evicted_tokens=self.engine.kv_compressor.stats.evicted_tokens,
            spec_draft_tokens=self.engine.spec_stats.num_draft_tokens,
            spec_accepted_tokens=self.engine.spec_stats.num_accepted_tokens,
            spec_mean_acceptance_length=self.engine.spec_stats.mean_acceptance_length,
            prefix_cache_hit_rate=bm.stats.hit_rate,
            num_preemptions=scheduler.num_preemptions,
        )


def _resolve_threadsafe(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[None], error: BaseException | None
) -> None:
    def resolve() -> None:
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    try:
        loop.call_soon_threadsafe(resolve)
    except RuntimeError:  # the loop is closed
        pass


def build_off_thread(config: EngineConfig) -> LLMEngine:
    """`LLMEngine(config)` on a thread that exits once the engine is built (its errors re-raised here), with
    its step-time line calibrated when the config has a TPOT target (the step budget plans only then).

    Why: libgomp (torch's OpenMP) gives every thread that starts a parallel region its own worker pool,
    kept until that thread exits. Loading runs parallel kernels; had it run on the server's main thread,
    that pool would outlive the load beside the loop thread's own, and with more OpenMP threads than cores
    libgomp stops spinning between regions: every one of a decode step's ~150 kernels then waits on a
    futex wake-up (a 16-sequence decode step of the default model on 2 cores: 154-262 ms, 98-114 ms on the
    main thread)."""
    built: list[LLMEngine] = []
    failed: list[BaseException] = []

    def build() -> None:
        try:
            engine = LLMEngine(config)
            if engine.step_budget.slo_tpot_s is not None:  # the budget plans with the line only then
                engine.calibrate_step_time()
            built.append(engine)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread below
            failed.append(exc)

    thread = threading.Thread(target=build, name="tokenmill-load", daemon=True)  # Ctrl-C need not wait
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return built[0]
