"""tokenmill's KV eviction vs NVIDIA kvpress (the reference implementations of the presses, on transformers):
passkey accuracy and wall time per prompt, the same prompts, model and budget.

    .venv/bin/python benchmarks/kvpress_compare.py [--budgets 0.25] [--lengths 512,1024,2048,4096]
        [--depths 0,0.5,1] [--setup-peers] [--output-json out.json]

Prompts: tokenmill's passkey harness (`tokenmill eval passkey`, raw prompts, the question at the end), the same
token ids for both. Each policy keeps `budget` of the prompt, compressing the whole prompt question included (SnapKV's
own setting; kvpress's pipeline default compresses the context only and appends the question afterwards, which
the issue measured at 1 of 12 keys for SnapKV). Pairs: full cache / no press; `snapkv:budget=B` (tokenmill's
default, max-pooled over 9) and `snapkv:budget=B,kernel=5,pool=avg` (kvpress's rule) / SnapKVPress(window 32,
kernel 5); `h2o:budget=B` / ObservedAttentionPress; `streaming:budget=B` / StreamingLLMPress(n_sink=4).
kvpress runs in its own venv (/tmp/kvpress-peer, never in CI; `--setup-peers` creates it) through
benchmarks/peers/kvpress_worker.py, one prompt at a time (its pipeline has no batching); tokenmill runs all
prompts of a mode in one `generate` call, and its seconds per prompt are that call's time over the prompts.
Both engines one at a time, `--threads` threads each, greedy, `--max-new-tokens` tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers import default_gguf  # noqa: E402
from vs_peers import can_import, run_worker, worker_args  # noqa: E402

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.bench.modes import parse_floats, parse_ints  # noqa: E402
from tokenmill.bench.retrieval import build_prompts, passkey_correct  # noqa: E402

KVPRESS_VENV = Path("/tmp/kvpress-peer")
KVPRESS_PYTHON = KVPRESS_VENV / "bin" / "python"
KVPRESS_SETUP = (
    f"python3 -m venv {KVPRESS_VENV} && {KVPRESS_VENV}/bin/pip install torch==2.13.0+cpu kvpress gguf accelerate "
    f"&& {KVPRESS_VENV}/bin/pip uninstall -y torchvision torchaudio torchcodec"
)
POLICIES = ("full", "snapkv", "h2o", "streaming")


def tokenmill_modes(policy: str, budget: float | None) -> list[str]:
    if policy == "full":
        return ["full"]
    if policy == "snapkv":
        return [f"snapkv:budget={budget}", f"snapkv:budget={budget},kernel=5,pool=avg"]
    return [f"{policy}:budget={budget}"]


def run_tokenmill(mode: str, prompts: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    llm = LLM(kv_policy=mode, threads=args.threads)
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0)
    llm.generate([{"prompt_token_ids": prompts[0]["ids"][:64]}], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p["ids"]} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return {"outputs": [o.outputs[0].text for o in outs], "seconds_per_prompt": elapsed / len(prompts)}


def ensure_kvpress(setup: bool) -> None:
    if can_import(KVPRESS_PYTHON, "kvpress"):
        return
    print(f"kvpress is not installed in {KVPRESS_VENV}; setup command:\n  {KVPRESS_SETUP}", file=sys.stderr)
    if not setup:
        raise SystemExit("rerun with --setup-peers to run it")
    subprocess.run(KVPRESS_SETUP, shell=True, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--budgets", type=parse_floats, default=[0.25], help="kept share of the prompt (default 0.25)"
    )
    ap.add_argument("--lengths", type=parse_ints, default=[512, 1024, 2048, 4096])
    ap.add_argument("--depths", type=parse_floats, default=[0.0, 0.5, 1.0])
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--setup-peers", action="store_true", help="create kvpress's venv if it is missing")
    ap.add_argument("--output-json")
    args = ap.parse_args()
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    bad = sorted(set(policies) - set(POLICIES))
    if bad or any(not 0 < b < 1 for b in args.budgets):
        ap.error(f"--policies from {', '.join(POLICIES)} (got {bad}); --budgets fractions in (0, 1)")
    ensure_kvpress(args.setup_peers)
    gguf = default_gguf()
    tokenizer = LLM(threads=args.threads).get_tokenizer()
    built = build_prompts("passkey", tokenizer, args.lengths, args.depths)
    prompts = [{"ids": p.ids, "key": p.expected, "length": n, "depth": d} for (n, d, _), p in built]

    spec = {
        "gguf": str(gguf), "prompts": prompts, "policies": policies, "budgets": args.budgets,
        "max_new_tokens": args.max_new_tokens, "threads": args.threads, "window": 32, "kernel": 5,
        "warmup_prompts": [],
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="kvpress-") as log_dir:
        peer = run_worker(
            "kvpress", spec, worker_args(args.threads, gguf, 7200), Path(log_dir), python=KVPRESS_PYTHON
        )

    rows = []
    for run in peer["runs"]:
        peer_found = sum(passkey_correct(o, p["key"]) for o, p in zip(run["outputs"], prompts, strict=True))
        peer_s = statistics.mean(run["seconds"])
        for mode in tokenmill_modes(run["policy"], run["budget"]):
            tm = run_tokenmill(mode, prompts, args)
            found = sum(passkey_correct(o, p["key"]) for o, p in zip(tm["outputs"], prompts, strict=True))
            rows.append({
                "policy": run["policy"], "budget": run["budget"], "tokenmill_mode": mode,
                "kvpress_found": peer_found, "tokenmill_found": found, "prompts": len(prompts),
                "kvpress_s_per_prompt": peer_s, "tokenmill_s_per_prompt": tm["seconds_per_prompt"],
                "kvpress_outputs": run["outputs"], "tokenmill_outputs": tm["outputs"],
            })  # fmt: skip
            print(f"done: {mode}", file=sys.stderr, flush=True)

    print("| policy | budget | kvpress found | tokenmill mode | tokenmill found | kvpress s/prompt | "
          "tokenmill s/prompt | time ratio |")  # fmt: skip
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        n = r["prompts"]
        print(
            f"| {r['policy']} | {r['budget'] or 1.0:g} | {r['kvpress_found']}/{n} | `{r['tokenmill_mode']}` | "
            f"{r['tokenmill_found']}/{n} | {r['kvpress_s_per_prompt']:.2f} | {r['tokenmill_s_per_prompt']:.2f} | "
            f"{r['kvpress_s_per_prompt'] / r['tokenmill_s_per_prompt']:.1f}x |"
        )
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"prompts": prompts, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
