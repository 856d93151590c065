"""Online serving benchmark: drive any OpenAI-compatible server over streaming HTTP and measure what a
user of it sees (TTFT, TPOT, ITL, end-to-end latency, throughput, goodput under SLOs).

It only speaks the public OpenAI API (`/v1/models`, `/v1/completions`, `/v1/chat/completions` with
`stream=true`), so the same workload runs unchanged against tokenmill, llama-cpp-python or vLLM and the
numbers compare. Everything is measured on the client from the stream itself, never from server metrics.

    tokenmill bench serve --base-url http://127.0.0.1:8000 --concurrency 16 --num-prompts 64
    tokenmill bench serve --base-url http://127.0.0.1:8000 --sweep 1,2,4,inf --plot sweep.png

From Python::

    result = asyncio.run(run_benchmark(BenchmarkConfig(base_url="http://127.0.0.1:8000", concurrency=8)))
    print(format_result(result))
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

DATASETS = ("random", "chat")
NO_CONTENT = "no content in the stream"
DEFAULT_WORDS_PER_TOKEN = 0.75  # English prose; used when the server cannot tokenize for us
CHAT_TEMPLATES = (
    "Summarize the following passage from the Python documentation in a few sentences.\n\n{excerpt}",
    "Read this excerpt from the Python reference manual and explain it to a beginner.\n\n{excerpt}",
    "What are the key points of the following documentation text? Answer with a list.\n\n{excerpt}",
    "Here is part of the Python documentation:\n\n{excerpt}\n\nWrite three questions a student could answer from it.",
)


class BenchmarkError(RuntimeError):
    """The benchmark cannot run at all (server unreachable, no model, warm-up rejected)."""


# ---- configuration and results ----------------------------------------------------------------------------
@dataclass
class BenchmarkConfig:
    """One benchmark run. Load is either open-loop (`request_rate`, Poisson arrivals; inf sends everything
    at once) or closed-loop (`concurrency` workers, each sending its next request when the last ends)."""

    base_url: str
    model: str | None = None  # None: the first id of GET /v1/models
    dataset: str = "random"  # random -> /v1/completions, chat -> /v1/chat/completions
    num_prompts: int = 64
    input_len: int = 256  # approximate prompt tokens
    output_len: int = 128  # max_tokens (with ignore_eos, the exact count on servers that honour it)
    request_rate: float = math.inf
    concurrency: int | None = None
    temperature: float = 0.0
    ignore_eos: bool = True
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.2
    seed: int = 0
    num_warmups: int = 1  # short untimed requests first, so lazy server start-up is not in the numbers
    words_per_token: float | None = None  # None: calibrate with the server's /tokenize, else 0.75
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into every request body
    api_key: str | None = None
    timeout_s: float = 600.0  # per read: a request queued behind a long batch may wait a while
    progress: bool = True

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, not {self.dataset!r}")
        if self.num_prompts < 1 or self.input_len < 1 or self.output_len < 1:
            raise ValueError("num_prompts, input_len and output_len must be at least 1")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.concurrency is not None and not math.isinf(self.request_rate):
            raise ValueError("give either a request rate or a concurrency, not both")
        if not self.request_rate > 0:
            raise ValueError("request rate must be positive (inf sends all requests at once)")

    @property
    def load(self) -> str:
        return f"concurrency={self.concurrency}" if self.concurrency else f"rate={self.request_rate:g}/s"


@dataclass
class RequestResult:
    """What the client saw of one streamed request. Times are seconds; ITLs are gaps between content
    chunks (a chunk may carry several tokens on servers that coalesce them)."""

    success: bool = False
    error: str | None = None
    start_s: float = 0.0  # since the start of the run
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None  # from the usage chunk
    usage_reported: bool = False

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; undefined for a one-token answer."""
        if not self.success or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def meets_slo(self, slo_ttft_s: float, slo_tpot_s: float) -> bool:
        """DistServe: a request counts towards goodput only if it met every SLO (an undefined TPOT is met)."""
        if not self.success or self.ttft_s is None:
            return False
        tpot = self.tpot_s
        return self.ttft_s <= slo_ttft_s and (tpot is None or tpot <= slo_tpot_s)

    def to_dict(self, with_itl: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["tpot_s"] = self.tpot_s
        if not with_itl:
            del d["itl_s"]
        return d


@dataclass
class LatencyStats:
    """Summary of one latency distribution, in milliseconds (None when there were no samples)."""

    mean_ms: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    count: int = 0

    @classmethod
    def of(cls, seconds: Sequence[float]) -> LatencyStats:
        if len(seconds) == 0:
            return cls()
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(float(ms.mean()), float(p50), float(p90), float(p99), float(ms.max()), len(ms))


@dataclass
class BenchmarkResult:
    """The outcome of one run; `to_dict` is what --output-json writes."""

    base_url: str
    model: str
    endpoint: str
    dataset: str
    load: str
    request_rate: float
    concurrency: int | None
    num_prompts: int
    input_len: int
    output_len: int
    completed: int
    failed: int
    errors: dict[str, int]
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2e: LatencyStats
    slo_ttft_s: float
    slo_tpot_s: float
    good_requests: int
    goodput: float  # requests per second that met both SLOs
    slo_attainment: float  # fraction of all requests (failures included) that met both SLOs
    words_per_token: float
    usage_reported: bool  # whether output token counts came from the server's usage chunk
    requests: list[RequestResult] = field(default_factory=list, repr=False)

    def to_dict(self, with_requests: bool = True) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "requests"}
        d["request_rate"] = _json_number(self.request_rate)
        if with_requests:
            d["requests"] = [r.to_dict() for r in self.requests]
        return d


def _json_number(x: float) -> float | str:
    """JSON has no Infinity: write an infinite rate as the string "inf"."""
    return "inf" if math.isinf(x) else x


# ---- workload ---------------------------------------------------------------------------------------------
@functools.cache
def corpus_words() -> tuple[str, ...]:
    """Words of CPython's pydoc topics: real English-and-code text that every Python install has, so the
    workload needs no download and is the same on every machine."""
    from pydoc_data.topics import topics

    return tuple(" ".join(topics[k] for k in sorted(topics)).split())


def build_workload(config: BenchmarkConfig, words_per_token: float) -> list[str]:
    """`num_prompts` prompts of about `input_len` tokens each: seeded random spans of the corpus (random),
    or a question template around such a span (chat, the user message)."""
    rng = random.Random(config.seed)
    words = corpus_words()
    n_words = max(1, round(config.input_len * words_per_token))
    samples = []
    for _ in range(config.num_prompts):
        if config.dataset == "chat":
            template = rng.choice(CHAT_TEMPLATES)
            excerpt = _span(words, max(1, n_words - len(template.split()) + 1), rng)
            text = template.format(excerpt=excerpt)
        else:
            text = _span(words, n_words, rng)
        samples.append(text)
    return samples


def _span(words: Sequence[str], n: int, rng: random.Random) -> str:
    start = rng.randrange(len(words))
    return " ".join(words[(start + i) % len(words)] for i in range(n))


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of a Poisson process: exponential gaps with mean 1/rate, the
    first request at 0. An infinite rate sends everything at once."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(n):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


# ---- talking to the server ------------------------------------------------------------------------------
def normalize_base_url(url: str) -> str:
    """Accept both http://host:port and http://host:port/v1 (what OpenAI clients are usually given)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


async def fetch_model(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model the server lists: the one it serves, on single-model servers."""
    try:
        resp = await client.get(f"{base_url}/v1/models")
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except httpx.HTTPError as exc:
        raise BenchmarkError(f"cannot list models at {base_url}/v1/models: {exc}; pass --model") from exc
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise BenchmarkError(f"{base_url}/v1/models lists no model; pass --model") from exc


async def calibrate_words_per_token(
    client: httpx.AsyncClient, base_url: str, model: str, seed: int
) -> float | None:
    """Words per token of the corpus under the server's own tokenizer, so prompts land near --input-len.
    Tries vLLM/tokenmill's POST /tokenize, then llama-cpp-python's /extras/tokenize; None if neither."""
    rng = random.Random(seed + 1)
    words = corpus_words()
    sample = " ".join(_span(words, 250, rng) for _ in range(8))
    n_words = len(sample.split())
    attempts = (
        (f"{base_url}/tokenize", {"model": model, "prompt": sample, "add_special_tokens": False}),
        (f"{base_url}/extras/tokenize", {"input": sample}),
    )
    for url, body in attempts:
        try:
            resp = await client.post(url, json=body)
            if resp.status_code != 200:
                continue
            data = resp.json()
            count = data.get("count") or len(data.get("tokens") or [])
        except (httpx.HTTPError, ValueError, AttributeError):
            continue
        if count:
            return n_words / count
    return None


def request_body(config: BenchmarkConfig, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": float(config.temperature),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.ignore_eos:
        body["ignore_eos"] = True
    if config.dataset == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    body.update(config.extra_body)
    return body


def endpoint_path(dataset: str) -> str:
    return "/v1/chat/completions" if dataset == "chat" else "/v1/completions"


def _chunk_text(choice: dict[str, Any]) -> str:
    """The generated text of one streamed choice: `text` (completions) or the chat delta's content
    (reasoning_content too, which reasoning models stream before the answer)."""
    if "delta" in choice:
        delta = choice.get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


async def send_request(client: httpx.AsyncClient, url: str, body: dict[str, Any], t0: float) -> RequestResult:
    """Stream one request and time it. Never raises (except on cancellation): an HTTP error, an error
    event in the stream or a stream cut short becomes a failed RequestResult."""
    result = RequestResult()
    start = time.perf_counter()
    result.start_s = start - t0
    last = start
    chunks = 0
    completion_tokens: int | None = None
    done = False
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {_error_message(text)}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, `event:` lines
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    result.error = f"error in stream: {_error_message(json.dumps(chunk))}"
                    return result
                usage = chunk.get("usage")
                if usage:
                    completion_tokens = usage.get("completion_tokens")
                    result.prompt_tokens = usage.get("prompt_tokens")
                for choice in chunk.get("choices") or ():
                    if choice.get("finish_reason"):
                        done = True
                    if _chunk_text(choice):
                        now = time.perf_counter()
                        if result.ttft_s is None:
                            result.ttft_s = now - start
                        else:
                            result.itl_s.append(now - last)
                        last = now
                        chunks += 1
            result.e2e_s = time.perf_counter() - start  # before closing: that is not the server's time
    except Exception as exc:  # noqa: BLE001 - any failure of one request is data, not a crash
        result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return result
    if not done:
        result.error = "stream ended before [DONE] or a finish_reason"
    elif chunks == 0:
        result.error = NO_CONTENT
    else:
        result.success = True
        result.usage_reported = completion_tokens is not None
        result.output_tokens = completion_tokens if completion_tokens is not None else chunks
    return result


def _error_message(text: str, limit: int = 200) -> str:
    """The `error.message` of an OpenAI-style error body if there is one, else the raw text, shortened."""
    try:
        err = json.loads(text).get("error")
        text = err.get("message", str(err)) if isinstance(err, dict) else str(err or text)
    except (ValueError, AttributeError):
        pass
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- load generation ------------------------------------------------------------------------------------
Send = Callable[[int], Awaitable[RequestResult]]


async def open_loop(n: int, rate: float, seed: int, send: Send) -> list[RequestResult]:
    """Poisson arrivals: each request starts on schedule whether or not earlier ones have finished, as
    independent users would."""
    start = time.perf_counter()
    tasks = []
    for i, offset in enumerate(arrival_offsets(n, rate, seed)):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(i)))
    return list(await asyncio.gather(*tasks))


async def closed_loop(n: int, concurrency: int, send: Send) -> list[RequestResult]:
    """`concurrency` workers, each sending its next request as soon as its last one ended."""
    results: list[RequestResult | None] = [None] * n
    todo = iter(range(n))

    async def worker() -> None:
        for i in todo:  # one shared iterator: each index goes to exactly one worker
            results[i] = await send(i)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
    return [r for r in results if r is not None]


# ---- running --------------------------------------------------------------------------------------------
@dataclass
class PreparedRun:
    """What every run against one server shares: the client, the model, the prompts."""

    client: httpx.AsyncClient
    base_url: str
    model: str
    words_per_token: float
    workload: list[str]  # prompts


def make_client(config: BenchmarkConfig) -> httpx.AsyncClient:
    # No connection cap: with --rate inf every request must be in flight at once, or the client itself
    # would queue them and hide the server's queueing.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(timeout=httpx.Timeout(config.timeout_s, connect=30.0), limits=limits)


async def prepare(config: BenchmarkConfig, client: httpx.AsyncClient) -> PreparedRun:
    """Resolve the model, size the prompts with the server's tokenizer, build the workload, warm up."""
    config.validate()
    base_url = normalize_base_url(config.base_url)
    api_key = config.api_key or os.environ.get("OPENAI_API_KEY")
    if api_key:
        client.headers["Authorization"] = f"Bearer {api_key}"
    model = config.model or await fetch_model(client, base_url)
    wpt = config.words_per_token
    if wpt is None:
        wpt = await calibrate_words_per_token(client, base_url, model, config.seed) or DEFAULT_WORDS_PER_TOKEN
    run = PreparedRun(client, base_url, model, wpt, build_workload(config, wpt))
    await warm_up(config, run)
    return run


async def warm_up(config: BenchmarkConfig, run: PreparedRun) -> None:
    """A few short requests before timing. A failure here means the setup is wrong (model name,
    endpoint), so it stops the benchmark with the server's message instead of failing every request."""
    url = run.base_url + endpoint_path(config.dataset)
    for i in range(config.num_warmups):
        body = request_body(config, run.model, run.workload[i % len(run.workload)], 4)
        result = await send_request(run.client, url, body, time.perf_counter())
        if not result.success and result.error != NO_CONTENT:  # an early EOS is not a setup problem
            raise BenchmarkError(f"warm-up request to {url} failed: {result.error}")


async def execute(config: BenchmarkConfig, run: PreparedRun) -> BenchmarkResult:
    """One timed pass of the workload under the configured load."""
    config.validate()
    url = run.base_url + endpoint_path(config.dataset)
    bodies = [request_body(config, run.model, s, config.output_len) for s in run.workload]
    bar = tqdm(total=len(bodies), desc=config.load, unit="req", disable=not config.progress, file=sys.stderr)
    t0 = time.perf_counter()

    async def send(i: int) -> RequestResult:
        result = await send_request(run.client, url, bodies[i], t0)
        bar.update(1)
        return result

    try:
        if config.concurrency:
            results = await closed_loop(len(bodies), config.concurrency, send)
        else:
            results = await open_loop(len(bodies), config.request_rate, config.seed, send)
    finally:
        bar.close()
    duration = time.perf_counter() - t0
    return summarize(config, run, results, duration)


def summarize(
    config: BenchmarkConfig, run: PreparedRun, results: list[RequestResult], duration: float
) -> BenchmarkResult:
    ok = [r for r in results if r.success]
    good = sum(r.meets_slo(config.slo_ttft_s, config.slo_tpot_s) for r in results)
    errors = Counter(r.error or "unknown" for r in results if not r.success)
    input_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else config.input_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    duration = max(duration, 1e-9)
    return BenchmarkResult(
        base_url=run.base_url,
        model=run.model,
        endpoint=endpoint_path(config.dataset),
        dataset=config.dataset,
        load=config.load,
        request_rate=config.request_rate,
        concurrency=config.concurrency,
        num_prompts=len(results),
        input_len=config.input_len,
        output_len=config.output_len,
        completed=len(ok),
        failed=len(results) - len(ok),
        errors=dict(errors.most_common(10)),
        duration_s=duration,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=len(ok) / duration,
        output_throughput=output_tokens / duration,
        total_token_throughput=(input_tokens + output_tokens) / duration,
        ttft=LatencyStats.of([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot=LatencyStats.of([t for r in ok if (t := r.tpot_s) is not None]),
        itl=LatencyStats.of([x for r in ok for x in r.itl_s]),
        e2e=LatencyStats.of([r.e2e_s for r in ok if r.e2e_s is not None]),
        slo_ttft_s=config.slo_ttft_s,
        slo_tpot_s=config.slo_tpot_s,
        good_requests=good,
        goodput=good / duration,
        slo_attainment=good / len(results) if results else 0.0,
        words_per_token=run.words_per_token,
        usage_reported=bool(ok) and all(r.usage_reported for r in ok),
        requests=results,
    )


async def run_benchmark(config: BenchmarkConfig) -> BenchmarkResult:
    """Prepare and run one benchmark; the Python entry point for scripts."""
    async with make_client(config) as client:
        return await execute(config, await prepare(config, client))


async def run_sweep(config: BenchmarkConfig, rates: Sequence[float]) -> list[BenchmarkResult]:
    """The same workload at each request rate in turn (open loop), on one connection pool and one set of
    prompts, so only the load changes between points."""
    async with make_client(config) as client:
        run = await prepare(replace(config, concurrency=None), client)
        return [await execute(replace(config, request_rate=rate, concurrency=None), run) for rate in rates]


# ---- reporting ----------------------------------------------------------------------------------------------
def format_result(r: BenchmarkResult) -> str:
    """The human-readable table."""

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    lines = [
        f"{' Serving Benchmark Result ':=^60}",
        f"{'Model:':<40}{r.model}",
        f"{'Endpoint:':<40}{r.base_url}{r.endpoint}",
        f"{'Load:':<40}{r.load}",
        f"{'Successful requests:':<40}{r.completed}",
        f"{'Failed requests:':<40}{r.failed}",
        f"{'Benchmark duration (s):':<40}{r.duration_s:.2f}",
        f"{'Total input tokens:':<40}{r.total_input_tokens}",
        f"{'Total output tokens:':<40}{r.total_output_tokens}"
        + ("" if r.usage_reported else "  (counted chunks)"),
        f"{'Request throughput (req/s):':<40}{r.request_throughput:.2f}",
        f"{'Output token throughput (tok/s):':<40}{r.output_throughput:.2f}",
        f"{'Total token throughput (tok/s):':<40}{r.total_token_throughput:.2f}",
        f"{'Goodput (req/s):':<40}{r.goodput:.2f}",
        f"{'SLO attainment:':<40}{r.slo_attainment:.1%}  (TTFT <= {r.slo_ttft_s:g} s, TPOT <= {r.slo_tpot_s:g} s)",
        f"{'-' * 60}",
        f"{'(ms)':<12}{'mean':>12}{'p50':>12}{'p90':>12}{'p99':>12}",
    ]
    for name, s in (("TTFT", r.ttft), ("TPOT", r.tpot), ("ITL", r.itl), ("E2E", r.e2e)):
        lines.append(f"{name:<12}{ms(s.mean_ms):>12}{ms(s.p50_ms):>12}{ms(s.p90_ms):>12}{ms(s.p99_ms):>12}")
    if r.errors:
        lines.append(f"{'-' * 60}")
        lines += [f"{count:>5} x {message}" for message, count in r.errors.items()]
    lines.append("=" * 60)
    return "\n".join(lines)


def results_json(results: Sequence[BenchmarkResult], sweep: bool) -> str:
    if sweep:
        return json.dumps({"sweep": [r.to_dict() for r in results]}, indent=2)
    return json.dumps(results[0].to_dict(), indent=2)


def plot_sweep(results: Sequence[BenchmarkResult], path: str) -> None:
    """Latency percentiles and goodput against offered request rate, one PNG. An infinite rate is drawn
    one step right of the largest finite one and labelled "inf"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r.request_rate for r in results if not math.isinf(r.request_rate)]
    log_x = len(finite) > 1 and max(finite) / min(finite) >= 8  # rates usually double: spread them evenly
    inf_x = (max(finite) * (2.0 if log_x else 1.25)) if finite else 1.0
    xs = [inf_x if math.isinf(r.request_rate) else r.request_rate for r in results]
    labels = ["inf" if math.isinf(r.request_rate) else f"{r.request_rate:g}" for r in results]

    def series(attr: str, stat: str) -> list[float]:
        return [getattr(getattr(r, attr), stat) or math.nan for r in results]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    first = results[0]
    for ax, attr, name, slo in (
        (axes[0], "ttft", "TTFT", first.slo_ttft_s),
        (axes[1], "tpot", "TPOT", first.slo_tpot_s),
    ):
        ax.plot(xs, series(attr, "p50_ms"), "o-", label=f"{name} p50")
        ax.plot(xs, series(attr, "p99_ms"), "s--", label=f"{name} p99")
        ax.axhline(slo * 1000, color="red", linestyle=":", label=f"SLO {slo:g} s")
        ax.set_ylabel(f"{name} (ms)")
        ax.set_title(f"{name} vs request rate")
    ax = axes[2]
    ax.plot(xs, [r.goodput for r in results], "o-", color="green", label="goodput")
    ax.plot(xs, [r.request_throughput for r in results], "^:", color="gray", label="throughput")
    ax.set_ylabel("requests/s")
    ax.set_title("goodput vs request rate")
    twin = ax.twinx()
    twin.plot(xs, [100 * r.slo_attainment for r in results], "x--", color="purple", label="SLO attainment")
    twin.set_ylabel("SLO attainment (%)")
    twin.set_ylim(0, 105)
    for ax in axes:
        if log_x:
            ax.set_xscale("log")
            ax.minorticks_off()  # only the swept rates are labelled
        ax.set_xlabel("request rate (req/s)")
        ax.set_xticks(xs, labels)
        ax.grid(True, alpha=0.3)
    handles, names = axes[2].get_legend_handles_labels()
    more_handles, more_names = twin.get_legend_handles_labels()
    axes[2].legend(handles + more_handles, names + more_names, loc="best", fontsize="small")
    axes[0].legend(fontsize="small")
    axes[1].legend(fontsize="small")
    fig.suptitle(
        f"{first.model} ({first.dataset}, {first.num_prompts} prompts, {first.output_len} output tokens)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_rates(text: str) -> list[float]:
    """`1,2,4,inf` -> [1.0, 2.0, 4.0, inf]."""
    rates = [float(x) for x in text.split(",") if x.strip()]
    if not rates or any(not r > 0 for r in rates):
        raise ValueError(f"--sweep wants a comma-separated list of positive rates, got {text!r}")
    return rates


def run_cli(args: Any) -> int:
    """`tokenmill bench serve`: the argparse namespace from the CLI -> run, print, write files."""
    config = BenchmarkConfig(
        base_url=args.base_url,
        model=args.model,
        dataset=args.dataset,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        request_rate=args.rate if args.rate is not None else math.inf,
        concurrency=args.concurrency,
        temperature=args.temperature,
        ignore_eos=not args.no_ignore_eos,
        slo_ttft_s=args.slo_ttft,
        slo_tpot_s=args.slo_tpot,
        seed=args.seed,
        num_warmups=args.warmups,
        extra_body=json.loads(args.extra_body) if args.extra_body else {},
        api_key=args.api_key,
        progress=not args.no_progress,
    )
    try:
        if args.sweep:
            results = asyncio.run(run_sweep(config, parse_rates(args.sweep)))
        else:
            results = [asyncio.run(run_benchmark(config))]
    except BenchmarkError as exc:
        print(f"tokenmill bench serve: error: {exc}", file=sys.stderr)
        return 1
    for r in results:
        print(format_result(r))
    if args.sweep:
        plot_sweep(results, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    if args.output_json:
        with open(args.output_json, "w") as f:
            f.write(results_json(results, sweep=bool(args.sweep)))
    return 0
