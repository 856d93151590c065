"""tokenmill's server vs llama-cpp-python's OpenAI server: same GGUF, same thread count, same workload,
driven by the same client (`tokenmill.bench.serve`), one server at a time; prints a ratio table.

    .venv/bin/python benchmarks/vs_llamacpp_serve.py                    # chat, concurrency 16, 64 x 128 tokens
    .venv/bin/python benchmarks/vs_llamacpp_serve.py --num-prompts 8 --output-len 32   # a quick look

Needs llama-cpp-python in its own venv at /tmp/llamacpp-peer (it compiles llama.cpp, about 30 minutes
here); the script prints the command to create it if it is missing. Never run in CI.

Fairness: both load the default GGUF (SmolLM2-135M-Instruct Q4_1) with 2 threads and are bound to
127.0.0.1. The prompts are identical (sized once with tokenmill's /tokenize, then reused). tokenmill gets
`ignore_eos`; llama-cpp-python does not know it, so it gets a logit bias of -100 on the end-of-sequence
and other control tokens instead, and both generate the full --output-len. llama-cpp-python serves one
request at a time (requests queue behind a lock); that is what is being compared against.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from servers import GGUF_NAME, HOST, default_gguf, free_port, running_server

from tokenmill.bench.serve import BenchmarkConfig, BenchmarkResult, format_result, run_benchmark

ROOT = Path(__file__).resolve().parent.parent
PEER_VENV = Path("/tmp/llamacpp-peer")
PEER_PYTHON = PEER_VENV / "bin" / "python"
PEER_SETUP = f"python3 -m venv {PEER_VENV} && {PEER_VENV}/bin/pip install 'llama-cpp-python[server]'"


# ---- setup ----------------------------------------------------------------------------------------------
def peer_available() -> bool:
    if not PEER_PYTHON.exists():
        return False
    return (
        subprocess.run([str(PEER_PYTHON), "-c", "import llama_cpp.server"], capture_output=True).returncode
        == 0
    )


def tokenmill_command(gguf: Path, port: int, threads: int) -> list[str]:
    exe = ROOT / ".venv" / "bin" / "tokenmill"
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "tokenmill.entrypoints.cli"]
    return [*base, "serve", str(gguf), "--host", HOST, "--port", str(port), "--threads", str(threads)]


def llamacpp_command(gguf: Path, port: int, threads: int, n_ctx: int) -> list[str]:
    help_text = subprocess.run(
        [str(PEER_PYTHON), "-m", "llama_cpp.server", "--help"], capture_output=True, text=True
    ).stdout
    cmd = [
        str(PEER_PYTHON),
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--host",
        HOST,
        "--port",
        str(port),
    ]
    cmd += ["--n_threads", str(threads), "--n_ctx", str(n_ctx), "--interrupt_requests", "False"]
    optional = {"--n_threads_batch": str(threads), "--flash_attn": "True", "--verbose": "False"}
    for flag, value in optional.items():  # older releases lack some of these
        if flag in help_text:
            cmd += [flag, value]
    return cmd


def control_token_bias(gguf: Path) -> dict[str, float]:
    """logit_bias that keeps llama.cpp from ending early: the EOS id and every control token (type 3),
    e.g. <|im_end|>, which the chat template stops on."""
    from tokenmill.models.gguf import GGUFModel

    meta = GGUFModel(gguf).metadata
    ids = {meta.get("tokenizer.ggml.eos_token_id")}
    ids |= {i for i, t in enumerate(meta.get("tokenizer.ggml.token_type") or []) if t == 3}
    return {str(i): -100.0 for i in sorted(i for i in ids if i is not None)[:256]}


# ---- the comparison -------------------------------------------------------------------------------------
def bench_config(args: argparse.Namespace, port: int, **kw) -> BenchmarkConfig:
    return BenchmarkConfig(
        base_url=f"http://{HOST}:{port}",
        dataset=args.dataset,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        concurrency=None if args.rate is not None else args.concurrency,
        request_rate=args.rate if args.rate is not None else math.inf,
        slo_ttft_s=args.slo_ttft,
        slo_tpot_s=args.slo_tpot,
        seed=args.seed,
        **kw,
    )


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def ratio_table(tm: BenchmarkResult, lc: BenchmarkResult) -> tuple[str, dict[str, float | None]]:
    rows = [
        ("output tok/s", tm.output_throughput, lc.output_throughput, "higher is better"),
        ("goodput (req/s)", tm.goodput, lc.goodput, "higher is better"),
        ("mean TTFT (ms)", tm.ttft.mean_ms, lc.ttft.mean_ms, "lower is better"),
        ("p99 TTFT (ms)", tm.ttft.p99_ms, lc.ttft.p99_ms, "lower is better"),
        ("mean TPOT (ms)", tm.tpot.mean_ms, lc.tpot.mean_ms, "lower is better"),
    ]

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    lines = [f"{'metric':<18}{'tokenmill':>12}{'llama.cpp':>12}{'ratio':>10}  (tokenmill / llama.cpp)"]
    lines += [f"{name:<18}{num(a):>12}{num(b):>12}{ratio(a, b):>10}  {note}" for name, a, b, note in rows]
    lines.append(f"{'SLO attainment':<18}{tm.slo_attainment:>12.1%}{lc.slo_attainment:>12.1%}")
    lines.append(
        f"{'completed/failed':<18}{f'{tm.completed}/{tm.failed}':>12}{f'{lc.completed}/{lc.failed}':>12}"
    )
    mean_out = [r.total_output_tokens / r.completed if r.completed else 0 for r in (tm, lc)]
    lines.append(f"{'mean output tok':<18}{mean_out[0]:>12.1f}{mean_out[1]:>12.1f}")
    ratios = {name: (a / b if a is not None and b else None) for name, a, b, _ in rows}
    return "\n".join(lines), ratios


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--gguf", type=Path, default=None, help=f"model file (default: the embedded {GGUF_NAME})"
    )
    parser.add_argument("--dataset", choices=["random", "chat"], default="chat")
    load = parser.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency", type=int, default=16, help="closed-loop requests in flight (default: 16)"
    )
    load.add_argument(
        "--rate", type=float, default=None, help="Poisson request rate instead of --concurrency"
    )
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--slo-ttft", type=float, default=2.0)
    parser.add_argument("--slo-tpot", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for each server (default: 2)")
    parser.add_argument("--n-ctx", type=int, default=4096, help="llama.cpp context size (default: 4096)")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--output-json", default="bench_vs_llamacpp_serve.json")
    args = parser.parse_args()

    if not peer_available():
        print(
            f"llama-cpp-python is not set up in {PEER_VENV}. Create it with (compiles llama.cpp, ~30 min):",
            file=sys.stderr,
        )
        print(f"  {PEER_SETUP}", file=sys.stderr)
        return 2
    gguf = args.gguf or default_gguf()
    if not gguf.exists():
        raise SystemExit(f"no model file at {gguf}")
    log_dir = Path(tempfile.mkdtemp(prefix="vs_llamacpp_serve_"))

    port = free_port()
    with running_server(
        "tokenmill",
        tokenmill_command(gguf, port, args.threads),
        f"http://{HOST}:{port}/health",
        log_dir,
        args.startup_timeout,
    ):
        tm = asyncio.run(run_benchmark(bench_config(args, port)))
    print(format_result(tm))

    port = free_port()
    lc_cmd = llamacpp_command(gguf, port, args.threads, args.n_ctx)
    extra = {"logit_bias": control_token_bias(gguf)}
    with running_server(
        "llama.cpp", lc_cmd, f"http://{HOST}:{port}/v1/models", log_dir, args.startup_timeout
    ):
        # the same prompts: reuse tokenmill's calibration instead of llama.cpp's own tokenize endpoint
        lc = asyncio.run(
            run_benchmark(bench_config(args, port, words_per_token=tm.words_per_token, extra_body=extra))
        )
    print(format_result(lc))

    table, ratios = ratio_table(tm, lc)
    print(table)
    with open(args.output_json, "w") as f:
        json.dump(
            {
                "gguf": str(gguf),
                "threads": args.threads,
                "llama_cpp_command": lc_cmd,
                "tokenmill": tm.to_dict(),
                "llama_cpp": lc.to_dict(),
                "ratios_tokenmill_over_llama_cpp": ratios,
            },
            f,
            indent=2,
        )
    print(f"results written to {args.output_json}; server logs in {log_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
