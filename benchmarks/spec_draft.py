"""Draft-model speculation on the Qwen2.5-Coder pair: 0.5B drafting for 1.5B (Q4_K_M GGUFs, greedy), code
completion prompts, batch 1 and batch 16, without speculation, with a fixed k and with adaptive k.

    python benchmarks/fetch_qwen_pair.py            # once: the two GGUFs into /tmp/models
    python benchmarks/spec_draft.py [--max-tokens 48] [--batch16-tokens 24] [--repeats 1] [--json out.json]

One engine (target + draft loaded once); the modes switch its speculative settings between runs, so every
mode runs the same weights on the same machine state. Prints decode tokens/s (batch 1: per request, first
token to last; batch 16: all output tokens over the wall time), acceptance rate and mean acceptance length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

from tokenmill import LLM, SamplingParams
from tokenmill.spec.adaptive import AdaptiveLength
from tokenmill.spec.config import SpeculativeConfig
from tokenmill.spec.stats import SpecStats

TARGET = "/tmp/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
DRAFT = "/tmp/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"

PROMPTS = [
    'def fibonacci(n: int) -> int:\n    """Return the n-th Fibonacci number, iteratively."""\n',
    'def is_prime(n: int) -> bool:\n    """True when n is a prime number."""\n',
    'def quicksort(items: list[int]) -> list[int]:\n    """Sort a list of integers with quicksort."""\n',
    'def binary_search(items: list[int], target: int) -> int:\n    """Index of target in sorted items, or -1."""\n',
    'class Stack:\n    """A last-in first-out stack backed by a list."""\n\n    def __init__(self):\n',
    'def word_count(text: str) -> dict[str, int]:\n    """Count how often each word occurs in text."""\n',
    'def flatten(nested: list) -> list:\n    """Flatten an arbitrarily nested list."""\n',
    'def gcd(a: int, b: int) -> int:\n    """Greatest common divisor by Euclid\'s algorithm."""\n',
    'def read_csv(path: str) -> list[dict[str, str]]:\n    """Read a CSV file with a header row."""\n',
    'def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n    """Merge two sorted lists."""\n',
    'def factorial(n: int) -> int:\n    """n! computed recursively."""\n',
    'def reverse_words(s: str) -> str:\n    """Reverse the order of the words in s."""\n',
    'def matrix_multiply(a, b):\n    """Multiply two matrices given as lists of rows."""\n',
    'def is_palindrome(s: str) -> bool:\n    """True when s reads the same backwards, ignoring case."""\n',
    'def celsius_to_fahrenheit(c: float) -> float:\n    """Convert a temperature."""\n',
    'def unique(items: list) -> list:\n    """Items without duplicates, in first-seen order."""\n',
]


def set_mode(llm: LLM, base: SpeculativeConfig, mode: str, k: int) -> None:
    """plain: no drafts; fixed: k drafts per step; adaptive: spec/adaptive.py picks k <= 8 per step."""
    engine = llm.engine
    engine.spec_stats = SpecStats()
    if mode == "plain":
        engine.speculative_config = None
        engine.adaptive = None
        return
    engine.speculative_config = replace(base, num_speculative_tokens=k if mode == "fixed" else 8)
    engine.adaptive = AdaptiveLength(8, engine.proposer.prior_cost) if mode == "adaptive" else None


def run_batch1(llm: LLM, prompts: list[str], params: SamplingParams) -> tuple[float, list[list[int]]]:
    """Median decode tokens/s over the prompts, one at a time, and their output tokens."""
    rates, tokens = [], []
    for p in prompts:
        out = llm.generate([p], params, use_tqdm=False)[0]
        m = out.metrics
        rates.append((len(out.outputs[0].token_ids) - 1) / (m.finish_time - m.first_token_time))
        tokens.append(out.outputs[0].token_ids)
    return statistics.median(rates), tokens


def run_batch(llm: LLM, prompts: list[str], params: SamplingParams) -> tuple[float, list[list[int]]]:
    started = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outs]
    return sum(len(t) for t in tokens) / (time.perf_counter() - started), tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default=TARGET)
    parser.add_argument("--draft", default=DRAFT)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48, help="batch 1: tokens per request")
    parser.add_argument("--batch1-prompts", type=int, default=2)
    parser.add_argument("--batch16-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--modes", default="plain,fixed,adaptive")
    parser.add_argument("--batches", default="1,16", help="batch sizes to run: 1 and/or 16")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    llm = LLM(
        args.target,
        kv_cache_memory="512MiB",
        max_model_len=1024,
        enable_prefix_caching=False,
        speculative_config={"method": "draft_model", "model": args.draft, "num_speculative_tokens": args.k},
    )
    base = llm.engine.speculative_config
    llm.generate(["def warm_up():\n"], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    rows = []
    reference: dict[int, list[list[int]]] = {}  # plain greedy outputs per batch size: speculation must match
    for batch in [int(b) for b in args.batches.split(",")]:
        for mode in args.modes.split(","):
            set_mode(llm, base, mode, args.k)
            proposer = llm.engine.proposer
            draft_s, draft_passes, wall = proposer.seconds, proposer.num_passes, time.perf_counter()
            if batch == 1:
                params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
                runs = [run_batch1(llm, PROMPTS[: args.batch1_prompts], params) for _ in range(args.repeats)]
            else:
                params = SamplingParams(max_tokens=args.batch16_tokens, temperature=0, ignore_eos=True)
                runs = [run_batch(llm, PROMPTS[:16], params) for _ in range(args.repeats)]
            rates = [r for r, _ in runs]
            tokens = runs[-1][1]
            reference.setdefault(batch, tokens)
            s = llm.engine.spec_stats
            wall = time.perf_counter() - wall
            draft_s, draft_passes = proposer.seconds - draft_s, proposer.num_passes - draft_passes
            row = {
                "batch": batch,
                "mode": mode if mode != "fixed" else f"draft k={args.k}",
                "tokens_per_s": statistics.median(rates),
                "runs": rates,
                "acceptance_rate": s.acceptance_rate,
                "mean_acceptance_length": s.mean_acceptance_length,
                "draft_tokens": s.num_draft_tokens,
                "same_tokens_as_plain": tokens == reference[batch],
                "draft_seconds": draft_s,  # time in the draft's forward passes (catch-up included)
                "draft_ms_per_pass": 1000 * draft_s / draft_passes if draft_passes else None,
                "wall_seconds": wall,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["mode"] == "plain"}
    print("\n| batch | mode | tokens/s | vs plain | acceptance rate | mean acceptance length | lossless |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["tokens_per_s"] / base[r["batch"]] if r["batch"] in base else float("nan")
        print(
            f"| {r['batch']} | {r['mode']} | {r['tokens_per_s']:.2f} | {ratio:.2f}x | "
            f"{r['acceptance_rate']:.2f} | {r['mean_acceptance_length']:.2f} | {r['same_tokens_as_plain']} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
