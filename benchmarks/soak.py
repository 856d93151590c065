"""Soak: does the server hold up under well-behaved load plus clients that misbehave?

    python benchmarks/soak.py                                  # 10-minute soak, 24 clients, default model
    python benchmarks/soak.py --duration 60 --clean-duration 30  # a quick check

Starts `tokenmill serve` on 127.0.0.1 (a free port; loopback only, never another host) with an API key and a
stream-stall timeout, then runs two bounded phases, each a fixed number of seconds:

1. clean: the well-behaved clients alone (the TTFT baseline);
2. soak: the same well-behaved clients plus ~10% misbehaving ones, each cycling through: disconnect
   mid-stream, stop reading (a small receive window, never read), an oversized body, bad JSON, a wrong key.

Reports, as a Markdown table (and JSON with --output-json): well-behaved requests lost (not a complete
200 stream), KV blocks still used once idle at the end, server RSS growth from the end of warm-up (the first
`--warmup-fraction` of the soak) to the end, p99 TTFT of well-behaved clients in the soak vs the clean run,
and what the misbehaving clients got back. Exit status 1 if a target is missed (no lost request, no leaked
block, RSS growth < 5%, p99 TTFT ratio <= 1.5).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx
import psutil

API_KEY = "soak-key"


# ---- the server ------------------------------------------------------------------------------------------------
class Server:
    def __init__(self, model: str | None, extra: list[str]):
        self.args = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve"]
        if model:
            self.args.append(model)
        self.args += ["--host", "127.0.0.1", "--port", "0", "--api-key", API_KEY, "--no-access-log", *extra]
        self.log = tempfile.NamedTemporaryFile(prefix="soak-server-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 600) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"serving \S+ at (http://\S+) ", self.text())
            if m:
                self.url = m.group(1)
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not start:\n" + self.text()[-3000:])

    def text(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# ---- clients ---------------------------------------------------------------------------------------------------
@dataclass
class Tally:
    ttft: list[float] = field(default_factory=list)
    ok: int = 0
    lost: int = 0
    lost_reasons: dict[str, int] = field(default_factory=dict)
    misbehaved: dict[str, dict[str, int]] = field(default_factory=dict)

    def lose(self, reason: str) -> None:
        self.lost += 1
        self.lost_reasons[reason] = self.lost_reasons.get(reason, 0) + 1

    def misbehave(self, kind: str, outcome: str) -> None:
        d = self.misbehaved.setdefault(kind, {})
        d[outcome] = d.get(outcome, 0) + 1


def _body(rng: random.Random, args: argparse.Namespace, stream: bool = True) -> dict:
    words = " ".join(
        rng.choice(["alpha", "beta", "gamma", "delta", "river", "stone"]) for _ in range(args.prompt_words)
    )
    return {
        "messages": [{"role": "user", "content": f"Continue: {words}"}],
        "max_tokens": args.max_tokens,
        "ignore_eos": True,
        "temperature": 0.7,
        "stream": stream,
        "stream_options": {"include_usage": True},
    }


async def good_client(
    client: httpx.AsyncClient, rng: random.Random, args, tally: Tally, stop_at: float
) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    while time.monotonic() < stop_at:
        start = time.perf_counter()
        first = None
        usage = None
        done = False
        try:
            async with client.stream(
                "POST", "/v1/chat/completions", json=_body(rng, args), headers=headers
            ) as r:
                if r.status_code != 200:
                    tally.lose(f"status {r.status_code}")
                    await asyncio.sleep(0.5)
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        break
                    if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                        first = time.perf_counter() - start
                    usage = chunk.get("usage") or usage
        except httpx.HTTPError as exc:
            tally.lose(type(exc).__name__)
            continue
        if done and usage and usage["completion_tokens"] == args.max_tokens:
            tally.ok += 1
            if first is not None:
                tally.ttft.append(first)
        else:
            tally.lose("incomplete stream")


async def _raw_stall(url: str, body: bytes, hold: float) -> str:
    """A streaming request on a socket with a tiny receive window that is then never read: the server should
    give up on it (its stall timeout) and close the connection."""
    host, port = url.removeprefix("http://").rsplit(":", 1)

    def run() -> str:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(hold)
        sock.connect((host, int(port)))
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        time.sleep(hold)  # reads nothing
        try:  # then drain: a closed connection ends with b""
            sock.settimeout(5)
            while sock.recv(1 << 20):
                pass
            return "closed by server"
        except (TimeoutError, OSError):
            return "still open"
        finally:
            sock.close()

    return await asyncio.to_thread(run)


async def bad_client(
    client: httpx.AsyncClient, rng: random.Random, args, tally: Tally, stop_at: float
) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    kinds = ["disconnect mid-stream", "stop reading", "oversized body", "bad JSON", "wrong key"]
    i = rng.randrange(len(kinds))
    while time.monotonic() < stop_at:
        kind = kinds[i % len(kinds)]
        i += 1
        try:
            if kind == "disconnect mid-stream":
                async with client.stream(
                    "POST", "/v1/chat/completions", json=_body(rng, args), headers=headers
                ) as r:
                    n = 0
                    async for line in r.aiter_lines():
                        n += line.startswith("data: ")
                        if n >= 3:
                            break
                tally.misbehave(kind, f"left after {n} events")
            elif kind == "stop reading":
                body = dict(
                    _body(rng, args), max_tokens=args.stall_tokens, n=2, logprobs=True, top_logprobs=20
                )
                tally.misbehave(
                    kind,
                    await _raw_stall(
                        client.base_url.__str__().rstrip("/"), json.dumps(body).encode(), args.stall_hold
                    ),
                )
            elif kind == "oversized body":
                big = b'{"messages": [{"role": "user", "content": "' + b"x" * (5 * 2**20) + b'"}]}'
                r = await client.post("/v1/chat/completions", content=big, headers=headers)
                tally.misbehave(kind, str(r.status_code))
            elif kind == "bad JSON":
                r = await client.post("/v1/chat/completions", content=b'{"messages": [', headers=headers)
                tally.misbehave(kind, str(r.status_code))
            else:
                r = await client.post(
                    "/v1/chat/completions",
                    json=_body(rng, args, stream=False),
                    headers={"Authorization": "Bearer wrong"},
                )
                tally.misbehave(kind, str(r.status_code))
        except httpx.HTTPError as exc:
            tally.misbehave(kind, type(exc).__name__)
        await asyncio.sleep(rng.uniform(0.1, 0.5))


async def run_phase(url: str, args, num_good: int, num_bad: int, seconds: float, seed: int) -> Tally:
    tally = Tally()
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=num_good + num_bad + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=url, timeout=httpx.Timeout(300, connect=30), limits=limits
    ) as client:
        tasks = [good_client(client, random.Random(seed + i), args, tally, stop_at) for i in range(num_good)]
        tasks += [
            bad_client(client, random.Random(seed + 1000 + i), args, tally, stop_at) for i in range(num_bad)
        ]
        await asyncio.gather(*tasks)
    return tally


def touch_kv_pool(url: str, block_size: int) -> int:
    """Prefill distinct prompts until every KV block has been written once. The C++ path allocates the cache
    uninitialized, so its pages join the RSS only when first used: without this, RSS growth would measure
    the pool filling up rather than a leak. Returns the prompt tokens sent."""
    blocks = int(metrics(url)["tokenmill_kv_blocks_total"])
    target = int(blocks * block_size * 1.1)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    sent, i = 0, 0
    with httpx.Client(base_url=url, timeout=600, headers=headers) as client:
        while sent < target:
            words = " ".join(f"w{i}x{j}" for j in range(300))  # distinct: no prefix-cache hit
            r = client.post("/v1/completions", json={"prompt": words, "max_tokens": 1})
            r.raise_for_status()
            sent += r.json()["usage"]["prompt_tokens"]
            i += 1
    return sent


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]


async def sample_rss(server: Server, stop: asyncio.Event, samples: list[tuple[float, int]]) -> None:
    t0 = time.monotonic()
    while not stop.is_set():
        samples.append((time.monotonic() - t0, server.rss()))
        try:
            await asyncio.wait_for(stop.wait(), 2.0)
        except TimeoutError:
            pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="model to serve (default: the embedded default model)")
    p.add_argument("--duration", type=float, default=600, help="seconds of soak (default: 600)")
    p.add_argument(
        "--clean-duration", type=float, default=120, help="seconds of the clean run first (default: 120)"
    )
    p.add_argument(
        "--clients", type=int, default=24, help="concurrent clients in the soak, 16-32 (default: 24)"
    )
    p.add_argument("--bad-fraction", type=float, default=0.1, help="share that misbehaves (default: 0.1)")
    p.add_argument(
        "--warmup-fraction", type=float, default=0.2, help="RSS baseline after this share of the soak"
    )
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per well-behaved request (default: 32)")
    p.add_argument("--prompt-words", type=int, default=24, help="words per prompt (default: 24)")
    p.add_argument("--stall-tokens", type=int, default=400, help="max_tokens of a stop-reading request")
    p.add_argument(
        "--stall-timeout", type=float, default=5, help="server's --stream-stall-timeout (default: 5)"
    )
    p.add_argument(
        "--stall-hold", type=float, default=15, help="seconds a stop-reading client holds (default: 15)"
    )
    p.add_argument("--server-args", default="--kv-cache-memory 256MiB", help="more `tokenmill serve` options")
    p.add_argument("--block-size", type=int, default=16, help="the server's KV block size (default: 16)")
    p.add_argument("--output-json", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 64:
        p.error("--clients must be in [1, 64]")
    if args.duration <= 0 or args.duration > 4 * 3600 or args.clean_duration < 0:
        p.error("--duration must be in (0, 14400] seconds")
    num_bad = max(1, round(args.clients * args.bad_fraction)) if args.bad_fraction > 0 else 0
    num_good = args.clients - num_bad

    server = Server(
        args.model, ["--stream-stall-timeout", str(args.stall_timeout), *args.server_args.split()]
    )
    print(f"starting the server (log: {server.log.name})", file=sys.stderr)
    server.start()
    try:
        print(f"warming up, then {args.clean_duration:.0f} s clean ({num_good} clients)", file=sys.stderr)
        touched = touch_kv_pool(server.url, args.block_size)
        print(f"KV pool touched ({touched} prompt tokens)", file=sys.stderr)
        asyncio.run(run_phase(server.url, args, min(4, num_good), 0, 10, args.seed + 7))
        clean = (
            asyncio.run(run_phase(server.url, args, num_good, 0, args.clean_duration, args.seed))
            if args.clean_duration
            else None
        )
        print(
            f"soak: {args.duration:.0f} s, {num_good} well-behaved + {num_bad} misbehaving clients",
            file=sys.stderr,
        )

        async def soak() -> tuple[Tally, list[tuple[float, int]]]:
            samples: list[tuple[float, int]] = []
            stop = asyncio.Event()
            sampler = asyncio.ensure_future(sample_rss(server, stop, samples))
            tally = await run_phase(server.url, args, num_good, num_bad, args.duration, args.seed + 1)
            await asyncio.sleep(
                args.stall_hold + args.stall_timeout + 2
            )  # let the last bad clients be dropped
            stop.set()
            await sampler
            return tally, samples

        tally, samples = asyncio.run(soak())
        end_metrics = metrics(server.url)
        for _ in range(60):  # idle: every block back
            if (
                end_metrics["tokenmill_kv_blocks_used"] == 0
                and end_metrics["tokenmill_num_requests_running"] == 0
            ):
                break
            time.sleep(1)
            end_metrics = metrics(server.url)
    finally:
        server.stop()

    warm = [rss for t, rss in samples if t >= args.warmup_fraction * args.duration]
    rss_warm, rss_end = (warm[0], samples[-1][1]) if warm else (samples[0][1], samples[-1][1])
    growth = (rss_end - rss_warm) / rss_warm
    clean_p99 = p99(clean.ttft) if clean else float("nan")
    soak_p99 = p99(tally.ttft)
    ratio = soak_p99 / clean_p99 if clean else float("nan")
    leaked = int(end_metrics["tokenmill_kv_blocks_used"])
    rows = [
        ("well-behaved requests completed (soak)", f"{tally.ok}", ""),
        (
            "well-behaved requests lost",
            f"{tally.lost}" + (f" {tally.lost_reasons}" if tally.lost else ""),
            "0",
        ),
        (
            "KV blocks used at the end (idle)",
            f"{leaked} of {int(end_metrics['tokenmill_kv_blocks_total'])}",
            "0",
        ),
        (
            "server RSS after warm-up -> end",
            f"{rss_warm / 2**20:.0f} -> {rss_end / 2**20:.0f} MiB ({growth:+.1%})",
            "< +5%",
        ),
        ("p99 TTFT clean / soak", f"{clean_p99:.3f} s / {soak_p99:.3f} s (x{ratio:.2f})", "<= x1.5"),
    ]
    for kind, outcomes in sorted(tally.misbehaved.items()):
        rows.append((f"misbehaving: {kind}", ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items())), ""))
    print(
        f"\nSoak: {args.duration:.0f} s, {num_good} well-behaved + {num_bad} misbehaving clients "
        f"(clean run {args.clean_duration:.0f} s), {args.max_tokens} tokens per request, model "
        f"{args.model or 'default'}\n"
    )
    print("| measure | result | target |\n|---|---|---|")
    for name, result, target in rows:
        print(f"| {name} | {result} | {target} |")
    passed = tally.lost == 0 and leaked == 0 and growth < 0.05 and (not clean or ratio <= 1.5)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(
                {"rows": rows, "passed": passed, "rss_samples": samples, "args": vars(args)}, f, indent=1
            )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
