"""KV compression: how many long sequences a fixed KV budget holds, and decode speed at long context, per KV
format (fp32 / int8 / int4 / kivi2 / kivi4) and eviction policy (issue 13, "Measure" 3).

1. Capacity: `--capacity-seqs` prompts of `--context` tokens under a fixed `--capacity-memory`; reports the
   most sequences decoding at once (measured, by stepping the engine) next to what the format's capacity
   predicts.
2. Speed: `--speed-seqs` prompts of `--context` tokens with room for all of them (`--speed-memory`), then
   `--output-len` greedy tokens each; reports decode tokens/s once every prompt is in, vs the fp32 full
   cache of the same run.

One engine at a time, in this process, modes in the order given; run it on an otherwise idle machine.

    .venv/bin/python benchmarks/kv_compression.py --modes auto,int8,int4,kivi4,kivi2,h2o:budget=0.25,snapkv:budget=0.25
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time

from tokenmill import LLM, SamplingParams
from tokenmill.bench.modes import kv_mode_overrides, split_modes


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(length)]} for _ in range(n)]


def capacity(mode: str, n: int, context: int, memory: str, output_len: int) -> dict:
    llm = LLM(kv_cache_memory=memory, max_model_len=context + output_len + 64, **kv_mode_overrides(mode))
    engine = llm.engine
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts(n, context, engine.model_config.vocab_size)):
        engine.add_request(p, params, request_id=f"c{i}")
    most = 0
    while engine.has_unfinished_requests():
        engine.step()
        decoding = sum(1 for s in engine.scheduler.running if s.num_computed_tokens >= s.num_prompt_tokens)
        most = max(most, decoding)
    per_seq = context + output_len
    policy = engine.config.kv_policy
    if policy.evicts:
        per_seq = policy.budget_tokens(context) + output_len + engine.config.block_size
    per_seq = -(-per_seq // engine.config.block_size) * engine.config.block_size  # whole blocks
    return {
        "mode": mode,
        "kv_format": engine.kv_spec.format,
        "capacity_tokens": engine.kv_capacity_tokens,
        # KIVI: also at most one sequence per full-precision residual block (LLMEngine.max_num_seqs)
        "predicted_seqs": min(engine.kv_capacity_tokens // per_seq, engine.max_num_seqs),
        "measured_concurrent_seqs": most,
        "preemptions": engine.scheduler.num_preemptions,
    }


def speed(mode: str, n: int, context: int, memory: str, output_len: int) -> dict:
    llm = LLM(kv_cache_memory=memory, max_model_len=context + output_len + 64, **kv_mode_overrides(mode))
    engine = llm.engine
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    llm.generate({"prompt_token_ids": [100] * 32}, SamplingParams(max_tokens=2), use_tqdm=False)  # warm up
    for i, p in enumerate(prompts(n, context, engine.model_config.vocab_size, seed=1)):
        engine.add_request(p, params, request_id=f"s{i}")
    decode_start, before = None, 0
    while engine.has_unfinished_requests():
        engine.step()
        if decode_start is None and not engine.scheduler.waiting:
            running = engine.scheduler.running
            if all(s.num_computed_tokens >= s.num_prompt_tokens for s in running):
                decode_start = time.perf_counter()
                before = sum(s.num_output_tokens for s in running)
    elapsed = time.perf_counter() - decode_start
    produced = n * output_len - before
    return {
        "mode": mode,
        "decode_tok_s": produced / elapsed,
        "decode_steps_s": elapsed,
        "evictions": engine.kv_compressor.stats.evictions,
        "kv_peak_tokens": engine.block_manager.peak_used_blocks * engine.config.block_size,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--modes",
        default="auto,int8,int4,kivi4,kivi2,h2o:budget=0.25,snapkv:budget=0.25,streaming:budget=0.25",
    )
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--capacity-seqs", type=int, default=24)
    ap.add_argument("--capacity-memory", default="256MiB")
    ap.add_argument("--speed-seqs", type=int, default=32)
    ap.add_argument("--speed-memory", default="4GiB")
    ap.add_argument("--skip", choices=["capacity", "speed"], action="append", default=[])
    ap.add_argument("--json")
    args = ap.parse_args()
    modes = split_modes(args.modes)
    report: dict = {
        "cpu": platform.processor() or platform.machine(),
        "args": vars(args),
        "capacity": [],
        "speed": [],
    }
    if "capacity" not in args.skip:
        for mode in modes:
            r = capacity(mode, args.capacity_seqs, args.context, args.capacity_memory, args.output_len)
            report["capacity"].append(r)
            print(json.dumps(r), flush=True)
    if "speed" not in args.skip:
        for mode in modes:
            r = speed(mode, args.speed_seqs, args.context, args.speed_memory, args.output_len)
            report["speed"].append(r)
            print(json.dumps(r), flush=True)
    base_cap = next((r for r in report["capacity"] if r["mode"] in ("auto", "full")), None)
    base_speed = next((r for r in report["speed"] if r["mode"] in ("auto", "full")), None)
    print(
        f"\n| mode | format | seqs of {args.context} in {args.capacity_memory} (predicted) | vs fp32 | "
        f"decode tok/s, {args.speed_seqs} seqs | vs fp32 |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for mode in modes:
        cap = next((r for r in report["capacity"] if r["mode"] == mode), None)
        spd = next((r for r in report["speed"] if r["mode"] == mode), None)
        cells = [mode, cap["kv_format"] if cap else ""]
        if cap:
            ratio = (
                cap["measured_concurrent_seqs"] / max(1, base_cap["measured_concurrent_seqs"])
                if base_cap
                else 0
            )
            cells += [f"{cap['measured_concurrent_seqs']} ({cap['predicted_seqs']})", f"{ratio:.1f}x"]
        else:
            cells += ["", ""]
        if spd:
            ratio = spd["decode_tok_s"] / base_speed["decode_tok_s"] if base_speed else 0
            cells += [f"{spd['decode_tok_s']:.1f}", f"{ratio:.2f}x"]
        else:
            cells += ["", ""]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
