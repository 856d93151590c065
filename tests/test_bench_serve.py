"""`tokenmill bench serve` against a fake OpenAI-compatible streaming server (FastAPI + uvicorn in a
background thread on 127.0.0.1): its delays are known, so the measured metrics can be checked against
them, and it can fail on purpose. No model is loaded."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import threading
import time
from dataclasses import dataclass, field

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tokenmill.bench.serve import (
    BenchmarkConfig,
    BenchmarkError,
    arrival_offsets,
    build_workload,
    format_result,
    normalize_base_url,
    parse_rates,
    run_benchmark,
)

MODEL = "fake-model"
TOKENS_PER_WORD = 2  # the fake /tokenize's "tokenizer": two tokens per whitespace-separated word


# ---- the fake server --------------------------------------------------------------------------------------
@dataclass
class Behavior:
    """How the fake server answers. `schedule` is cycled by arrival order: ok, slow_ttft, slow_itl,
    http500 (error before streaming), break (connection dropped mid-stream)."""

    ttft: float = 0.02
    itl: float = 0.01
    chunks: int = 4
    tokens_per_chunk: int = 1
    usage: bool = True
    slow_ttft: float = 0.3
    slow_itl: float = 0.1
    schedule: list[str] = field(default_factory=lambda: ["ok"])


class FakeServer:
    def __init__(self) -> None:
        self.behavior = Behavior()
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self.lock = threading.Lock()
        self.app = self._build_app()

    def reset(self, **behavior) -> FakeServer:
        with self.lock:
            self.behavior = Behavior(**behavior)
            self.bodies = []
            self.in_flight = self.peak_in_flight = 0
        return self

    def _admit(self, body: dict) -> str:
        with self.lock:
            mode = self.behavior.schedule[len(self.bodies) % len(self.behavior.schedule)]
            self.bodies.append(body)
            return mode

    def _build_app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> dict:
            return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

        @app.post("/tokenize")
        async def tokenize(request: Request) -> dict:
            words = len((await request.json())["prompt"].split())
            return {"tokens": [7] * (words * TOKENS_PER_WORD), "count": words * TOKENS_PER_WORD}

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._generate(await request.json(), chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await self._generate(await request.json(), chat=True)

        return app

    async def _generate(self, body: dict, chat: bool):
        mode = self._admit(body)
        b = self.behavior
        if mode == "http500":
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)

        def chunk(text: str | None, finish: str | None = None, usage: dict | None = None) -> str:
            if chat:
                delta = {} if text is None else {"content": text}
                choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
            else:
                choices = [{"index": 0, "text": text or "", "finish_reason": finish}]
            return f"data: {json.dumps({'id': 'x', 'model': MODEL, 'choices': [] if usage else choices, 'usage': usage})}\n\n"

        async def stream():
            with self.lock:
                self.in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                if chat:  # the role-only first delta carries no text: it must not count as the first token
                    yield 'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}\n\n'
                await asyncio.sleep(b.slow_ttft if mode == "slow_ttft" else b.ttft)
                for i in range(b.chunks):
                    if i:
                        await asyncio.sleep(b.slow_itl if mode == "slow_itl" else b.itl)
                    if mode == "break" and i == 2:
                        raise RuntimeError("connection dropped on purpose")
                    yield chunk("tok " * b.tokens_per_chunk)
                yield chunk(None, finish="length")
                if b.usage and (body.get("stream_options") or {}).get("include_usage"):
                    n = b.chunks * b.tokens_per_chunk
                    yield chunk(
                        None, usage={"prompt_tokens": 11, "completion_tokens": n, "total_tokens": n + 11}
                    )
                yield "data: [DONE]\n\n"
            finally:
                with self.lock:
                    self.in_flight -= 1

        return StreamingResponse(stream(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def fake_server():
    server = FakeServer()
    uv = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=0, log_level="critical"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "fake server did not start"
        time.sleep(0.02)
    port = uv.servers[0].sockets[0].getsockname()[1]
    server.url = f"http://127.0.0.1:{port}"
    yield server
    uv.should_exit = True
    thread.join(timeout=10)


def config(server: FakeServer, **kw) -> BenchmarkConfig:
    kw.setdefault("num_prompts", 4)
    kw.setdefault("input_len", 32)
    kw.setdefault("output_len", 8)
    kw.setdefault("num_warmups", 0)
    return BenchmarkConfig(base_url=server.url, progress=False, **kw)


def bench(cfg: BenchmarkConfig):
    return asyncio.run(run_benchmark(cfg))


# ---- metrics ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", ["random", "chat"])
def test_metrics_match_the_servers_delays(fake_server, dataset):
    server = fake_server.reset(ttft=0.15, itl=0.04, chunks=5)
    r = bench(config(server, dataset=dataset, num_prompts=3, concurrency=1))
    assert (r.completed, r.failed) == (3, 0)
    assert r.model == MODEL  # discovered from /v1/models
    assert r.endpoint == ("/v1/chat/completions" if dataset == "chat" else "/v1/completions")
    assert 140 <= r.ttft.mean_ms <= 300 and r.ttft.count == 3
    assert 35 <= r.itl.p50_ms <= 120 and r.itl.count == 3 * 4
    assert 35 <= r.tpot.mean_ms <= 120
    assert 140 + 4 * 40 <= r.e2e.mean_ms <= 700
    for req in r.requests:  # TPOT is by definition (e2e - ttft) / (tokens - 1)
        assert req.tpot_s == pytest.approx((req.e2e_s - req.ttft_s) / 4)
    assert r.total_output_tokens == 15 and r.usage_reported
    assert r.total_input_tokens == 3 * 11  # the usage chunk's prompt_tokens
    assert r.output_throughput == pytest.approx(15 / r.duration_s)
    assert r.request_throughput == pytest.approx(3 / r.duration_s)

    body = server.bodies[0]
    assert body["model"] == MODEL and body["stream"] is True and body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 8 and body["temperature"] == 0.0
    assert ("messages" in body) == (dataset == "chat") and ("prompt" in body) == (dataset == "random")


@pytest.mark.parametrize(("usage", "tokens_per_chunk", "expected"), [(True, 3, 12), (False, 3, 4)])
def test_output_tokens_from_usage_else_chunks(fake_server, usage, tokens_per_chunk, expected):
    server = fake_server.reset(usage=usage, tokens_per_chunk=tokens_per_chunk, chunks=4)
    r = bench(config(server, num_prompts=2))
    assert [q.output_tokens for q in r.requests] == [expected, expected]
    assert r.usage_reported is usage


def test_goodput_counts_only_requests_meeting_both_slos(fake_server):
    # In arrival order: one passes both SLOs, one misses TTFT, one misses TPOT; twice over.
    server = fake_server.reset(ttft=0.02, itl=0.01, slow_ttft=0.4, slow_itl=0.15, chunks=3)
    server.behavior.schedule = ["ok", "slow_ttft", "slow_itl"]
    r = bench(config(server, num_prompts=6, concurrency=1, slo_ttft_s=0.2, slo_tpot_s=0.075))
    assert r.completed == 6
    assert [q.meets_slo(0.2, 0.075) for q in r.requests] == [True, False, False] * 2
    assert r.good_requests == 2 and r.slo_attainment == pytest.approx(2 / 6)
    assert r.goodput == pytest.approx(2 / r.duration_s)
    loose = bench(
        config(server.reset(ttft=0.02, itl=0.01, chunks=3), num_prompts=3, slo_ttft_s=5, slo_tpot_s=5)
    )
    assert loose.good_requests == 3 and loose.slo_attainment == 1.0


# ---- load ---------------------------------------------------------------------------------------------------
def test_concurrency_keeps_that_many_requests_in_flight(fake_server):
    server = fake_server.reset(ttft=0.1, itl=0.01, chunks=2)
    r = bench(config(server, num_prompts=9, concurrency=3))
    assert r.completed == 9 and len(server.bodies) == 9
    assert server.peak_in_flight == 3
    assert r.load == "concurrency=3"


def test_infinite_rate_sends_everything_at_once(fake_server):
    server = fake_server.reset(ttft=0.3, itl=0.01, chunks=2)
    r = bench(config(server, num_prompts=6))
    assert r.completed == 6 and server.peak_in_flight == 6
    assert max(q.start_s for q in r.requests) < 0.2


def test_rate_follows_seeded_poisson_arrivals(fake_server):
    server = fake_server.reset(ttft=0.01, itl=0.005, chunks=2)
    r = bench(config(server, num_prompts=6, request_rate=20.0, seed=3))
    expected = arrival_offsets(6, 20.0, seed=3)
    assert r.completed == 6 and r.load == "rate=20/s"
    for req, offset in zip(r.requests, expected, strict=True):
        assert req.start_s == pytest.approx(offset, abs=0.08)
    assert r.duration_s >= expected[-1]


def test_arrival_offsets_are_seeded_exponential_gaps():
    a = arrival_offsets(4000, 8.0, seed=1)
    assert a == arrival_offsets(4000, 8.0, seed=1) and a != arrival_offsets(4000, 8.0, seed=2)
    assert a[0] == 0.0 and all(x < y for x, y in itertools.pairwise(a))
    assert a[-1] / (len(a) - 1) == pytest.approx(1 / 8.0, rel=0.08)
    assert arrival_offsets(3, math.inf, seed=0) == [0.0, 0.0, 0.0]


# ---- failures -----------------------------------------------------------------------------------------------
def test_failed_requests_are_counted_not_fatal(fake_server):
    server = fake_server.reset(chunks=4)
    server.behavior.schedule = ["ok", "http500", "break", "ok"]
    r = bench(config(server, num_prompts=8, concurrency=1))
    assert (r.completed, r.failed) == (4, 4)
    assert r.errors["HTTP 500: boom"] == 2
    assert sum(r.errors.values()) == 4  # the two dropped streams are the others
    assert r.ttft.count == 4 and r.total_output_tokens == 4 * 4
    assert r.slo_attainment == pytest.approx(0.5)
    assert "HTTP 500: boom" in format_result(r)


def test_all_failing_still_reports(fake_server):
    server = fake_server.reset()
    server.behavior.schedule = ["http500"]
    r = bench(config(server, num_prompts=3))
    assert (r.completed, r.failed, r.good_requests) == (0, 3, 0)
    assert r.ttft.mean_ms is None
    assert "Failed requests:" in format_result(r)


def test_setup_errors_stop_the_run(fake_server):
    server = fake_server.reset()
    server.behavior.schedule = ["http500"]
    with pytest.raises(BenchmarkError, match="warm-up"):
        bench(config(server, num_warmups=1))
    with pytest.raises(BenchmarkError, match="cannot list models"):
        bench(BenchmarkConfig(base_url="http://127.0.0.1:9", progress=False))


# ---- workload -----------------------------------------------------------------------------------------------
def test_prompts_are_sized_with_the_servers_tokenizer(fake_server):
    server = fake_server.reset()
    r = bench(config(server, num_prompts=2, input_len=100, seed=5))
    assert r.words_per_token == pytest.approx(1 / TOKENS_PER_WORD)
    assert [len(b["prompt"].split()) for b in server.bodies] == [50, 50]
    expected = build_workload(config(server, num_prompts=2, input_len=100, seed=5), 0.5)
    assert [b["prompt"] for b in server.bodies] == expected  # seeded: reproducible


def test_workload_is_deterministic():
    cfg = BenchmarkConfig(base_url="x", dataset="chat", num_prompts=5, input_len=200, seed=1)
    a, b = build_workload(cfg, 0.75), build_workload(cfg, 0.75)
    assert a == b
    assert len(set(a)) == 5
    assert all(140 <= len(s.split()) <= 160 for s in a)


def test_small_helpers():
    assert normalize_base_url("http://h:1/v1/") == "http://h:1"
    assert normalize_base_url("http://h:1") == "http://h:1"
    assert parse_rates("1, 2.5,inf") == [1.0, 2.5, math.inf]
    with pytest.raises(ValueError):
        parse_rates("1,0")
    with pytest.raises(ValueError):
        BenchmarkConfig(base_url="x", concurrency=2, request_rate=3.0).validate()


# ---- the CLI ------------------------------------------------------------------------------------------------
def test_cli_writes_json_and_prints_the_table(fake_server, tmp_path, capsys):
    from tokenmill.entrypoints.cli import main

    server = fake_server.reset(chunks=3)
    out = tmp_path / "r.json"
    argv = ["bench", "serve", "--base-url", server.url + "/v1", "--dataset", "chat", "--concurrency", "2"]
    argv += ["--num-prompts", "4", "--output-len", "3", "--output-json", str(out), "--no-progress"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    for word in ("TTFT", "TPOT", "ITL", "E2E", "Goodput (req/s):", "Output token throughput"):
        assert word in table
    data = json.loads(out.read_text())
    assert data["completed"] == 4 and data["concurrency"] == 2 and data["model"] == MODEL
    assert set(data["ttft"]) >= {"mean_ms", "p50_ms", "p90_ms", "p99_ms"}
    assert len(data["requests"]) == 4 and data["requests"][0]["tpot_s"] > 0
    assert len(server.bodies) == 5  # one warm-up request, then the four


def test_cli_sweep_writes_json_and_png(fake_server, tmp_path, capsys):
    from tokenmill.entrypoints.cli import main

    server = fake_server.reset(chunks=2)
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    argv = ["bench", "serve", "--base-url", server.url, "--sweep", "20,inf", "--num-prompts", "3"]
    argv += ["--output-json", str(out), "--plot", str(png), "--no-progress", "--warmups", "0"]
    assert main(argv) == 0
    sweep = json.loads(out.read_text())["sweep"]
    assert [p["request_rate"] for p in sweep] == [20.0, "inf"]
    assert all(p["completed"] == 3 for p in sweep)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.count("Serving Benchmark Result") == 2


def test_cli_reports_an_unreachable_server(capsys):
    from tokenmill.entrypoints.cli import main

    assert main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--no-progress"]) == 1
    assert "cannot list models" in capsys.readouterr().err
