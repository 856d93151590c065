"""Lossy layer skipping (`--skip-layers`): the quality it costs and the speed it buys, per number of skipped
layers, on the default model (or --model).

    python benchmarks/layerskip_quality.py [--search skip.json] [--depths 1,2,4,6,8] [--json out.json]

Which layers: the greedy path of `tokenmill eval layerskip` (its `path`: at depth n, the n layers whose
skipping keeps the teacher-forced greedy agreement with the full model highest, each round adding one to
the last), read from --search or searched here first (calibration: the first 256 tokens of CPython's pydoc
topics). Then, for the full model and each depth, through the quality harness (`tokenmill eval`):
perplexity on the pydoc topics after the calibration part (disjoint 1,024-token windows), passkey retrieval
(raw prompts of 512-2,048 tokens at 5 depths), and batch-1 decode tokens/s (greedy, 128 new tokens, every
set in turn for 5 rounds after a warm-up, median).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from tokenmill import LLM, SamplingParams
from tokenmill.bench.layerskip_search import search_on_text
from tokenmill.bench.ppl import evaluate_ppl
from tokenmill.bench.quality import reference_text
from tokenmill.bench.retrieval import evaluate_passkey
from tokenmill.entrypoints.env_info import env_report

CALIBRATION_TOKENS = 256
PPL_OFFSET_CHARS = 20_000  # perplexity text starts well past the calibration tokens


def search(model: str | None, out: Path, max_evals: int) -> dict:
    llm = LLM(model, enable_prefix_caching=False)
    search_on_text(llm, reference_text(), CALIBRATION_TOKENS, max_evals=max_evals).save(out)
    return json.loads(out.read_text())


def decode_rates(model: str | None, skips: dict[int, list[int]], rounds: int = 5) -> dict[int, float]:
    """Batch-1 decode tok/s per skip set: all engines loaded at once and run in turn, round after round (so
    a slow stretch of a shared machine hits every set alike); the median over rounds, the first dropped."""
    llms = {d: LLM(model, skip_layers=skip or None, enable_prefix_caching=False) for d, skip in skips.items()}
    params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    rates: dict[int, list[float]] = {d: [] for d in skips}
    for i in range(rounds + 1):
        for d, llm in llms.items():
            prompt = f"Write a short story about a lighthouse keeper, part {i}."
            out = llm.generate([prompt], params, use_tqdm=False)[0]
            m = out.metrics
            if i:
                rates[d].append((len(out.outputs[0].token_ids) - 1) / (m.finish_time - m.first_token_time))
    return {d: statistics.median(r) for d, r in rates.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", default=None)
    p.add_argument("--search", default="/tmp/layerskip-path.json", help="the search's JSON (run if missing)")
    p.add_argument("--max-evals", type=int, default=260)
    p.add_argument("--depths", default="1,2,4,6,8")
    p.add_argument("--ppl-tokens", type=int, default=8192)
    p.add_argument("--lengths", default="512,1024,2048")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    path = Path(args.search)
    saved = json.loads(path.read_text()) if path.exists() else search(args.model, path, args.max_evals)
    rounds = saved.get("path") or []
    depths = [int(d) for d in args.depths.split(",")]
    sets = {0: []} | {d: rounds[d - 1] for d in depths if d <= len(rounds)}
    missing = [d for d in depths if d > len(rounds)]
    if missing:
        print(f"the search's path stops at {len(rounds)} layers; no row for {missing}", file=sys.stderr)
    modes = {d: "full" if not s else "skip_layers=" + "/".join(map(str, s)) for d, s in sets.items()}
    options = {"model": args.model} if args.model else {}
    text = reference_text()[PPL_OFFSET_CHARS:]
    ppl = {
        r.mode: r
        for r in evaluate_ppl(text, list(modes.values()), num_tokens=args.ppl_tokens, engine_options=options)
    }
    lengths = [int(x) for x in args.lengths.split(",")]
    keys = {
        r.mode: r for r in evaluate_passkey(list(modes.values()), lengths=lengths, engine_options=options)
    }
    speed = decode_rates(args.model, sets)
    rows = []
    for d, skip in sets.items():
        mode = modes[d]
        agree = next(
            (t["acceptance"] for t in saved["trials"] if sorted(t["skip_layers"]) == sorted(skip)), 1.0
        )
        rows.append(
            {
                "skipped": d, "layers": skip, "agreement": agree, "perplexity": ppl[mode].perplexity,
                "kv_bytes_per_token": ppl[mode].kv_cache_bytes_per_token,
                "passkey": keys[mode].accuracy, "passkey_total": len(keys[mode].samples),
                "decode_tok_s": speed[d],
            }
        )  # fmt: skip
    env = env_report(load=False)
    print(
        f"\n{env['cpu_model']}, ISA {env['isa']}, {env['threads_default']} threads; {saved['num_layers']} layers"
    )
    print(
        "| skipped | layers | teacher-forced agreement | perplexity | KV bytes/token | passkey | decode tok/s |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    base = rows[0]
    for r in rows:
        print(
            f"| {r['skipped']} | {r['layers'] or '-'} | {r['agreement']:.2f} | {r['perplexity']:.2f} "
            f"({r['perplexity'] / base['perplexity']:.2f}x) | {r['kv_bytes_per_token']} | "
            f"{round(r['passkey'] * r['passkey_total'])}/{r['passkey_total']} | {r['decode_tok_s']:.1f} "
            f"({r['decode_tok_s'] / base['decode_tok_s']:.2f}x) |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"cpu": env["cpu_model"], "rows": rows, "search": str(path)}, indent=2)
        )


if __name__ == "__main__":
    main()
