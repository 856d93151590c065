"""The quality price of a quantized KV cache, tokenmill vs llama.cpp, on the same GGUF, text and windows.

    python benchmarks/kv_llamacpp_ppl.py [--tokens 4096] [--chunk 1] [--json out.json]

Perplexity of CPython's pydoc topics (disjoint 1,024-token windows, the harness's `tokenmill eval ppl`
windows) with tokenmill's KV formats (full = fp32, int8, int4, kivi4, kivi2; `tokenmill eval ppl --compare`) and
llama.cpp's K/V cache types (f16, q8_0, q4_0; llama-cpp-python in /tmp/llamacpp-peer, its own process).
Each engine's quantized formats are compared with its own full-precision cache: the two engines' baselines
differ slightly (llama.cpp quantizes activations to 8 bits in its matmuls, tokenmill computes in fp32).

Every prediction must read the quantized cache, as in generation. llama.cpp writes each ubatch's K/V into
its cache and attends over the cache, so its own prompt tokens are read quantized too; tokenmill attends a
prompt chunk's own tokens from their fresh (unquantized) values, so it runs one token per step here
(`--chunk 1`, its decode path). With `--chunk 512` tokenmill's figures flatter its formats.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from vs_peers import LLAMACPP_PYTHON, ModelInfo, run_worker, worker_args  # noqa: E402

from tokenmill.bench.ppl import evaluate_ppl, make_windows  # noqa: E402
from tokenmill.bench.quality import reference_text  # noqa: E402
from tokenmill.entrypoints.env_info import env_report  # noqa: E402
from tokenmill.models.source import resolve_model  # noqa: E402

WINDOW = 1024
TOKENMILL_MODES = ["full", "int8", "int4", "kivi4", "kivi2"]  # full: the fp32 cache
LLAMACPP_TYPES = ["f16", "q8_0", "q4_0"]
LLAMACPP_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}  # per element: ggml's block sizes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument(
        "--chunk", type=int, default=1, help="tokenmill's query tokens per step (default 1: the decode path)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not LLAMACPP_PYTHON.exists():
        raise SystemExit(
            f"llama-cpp-python is not installed at {LLAMACPP_PYTHON} (see benchmarks/vs_peers.py)"
        )
    gguf = resolve_model(None).path
    text = reference_text()
    tokens = ModelInfo(gguf).tokenizer.encode(text)[: args.tokens]
    windows = make_windows(len(tokens), WINDOW)
    ours = evaluate_ppl(
        text,
        TOKENMILL_MODES,
        window=WINDOW,
        num_tokens=args.tokens,
        chunk=args.chunk,
        engine_options={"threads": args.threads},
    )
    spec = {
        "tokens": tokens, "windows": [[w.begin, w.end, w.first_target] for w in windows], "kv_types": LLAMACPP_TYPES,
        "threads": args.threads,
    }  # fmt: skip
    log_dir = Path(tempfile.mkdtemp(prefix="kv-llamacpp-ppl-"))
    theirs = run_worker("llamacpp", spec, worker_args(args.threads, Path(gguf), 3600), log_dir, worker="ppl")
    env = env_report(load=False)
    print(
        f"\n{env['cpu_model']}, ISA {env['isa']}; {len(tokens)} tokens of pydoc topics, {len(windows)} windows of {WINDOW}"
    )
    print("| engine | KV format | bytes per token | perplexity | vs its own full-precision cache |")
    print("|---|---|---:|---:|---:|")
    base = ours[0].perplexity
    for r in ours:
        print(
            f"| tokenmill | {r.mode} | {r.kv_cache_bytes_per_token} | {r.perplexity:.4f} | {100 * (r.perplexity / base - 1):+.2f}% |"
        )
    lbase = theirs["kv_types"]["f16"]["perplexity"]
    elements = ours[0].kv_cache_bytes_per_token // 4  # fp32: 4 bytes per K/V element
    for name, r in theirs["kv_types"].items():
        print(
            f"| llama.cpp | {name} | {elements * LLAMACPP_BYTES[name]:.0f} | {r['perplexity']:.4f} | "
            f"{100 * (r['perplexity'] / lbase - 1):+.2f}% |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"cpu": env["cpu_model"], "tokenmill": [r.__dict__ for r in ours], "llama_cpp": theirs},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
