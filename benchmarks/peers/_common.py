"""The offline workloads, engine-agnostic; imported by the worker scripts next to it, which run inside each
engine's own venv (so: standard library only).

A worker is started as `PYTHON benchmarks/peers/<engine>_worker.py SPEC.json RESULT.json`. The spec (written
by benchmarks/vs_peers.py) holds the token-id prompts of every run; the worker loads its engine once, warms
it up, runs the requested workloads and writes raw figures to RESULT.json.

Every engine is measured the same way, through a blocking `generate(prompts, max_tokens)` that returns the
number of new tokens of each prompt (greedy, EOS ignored), timed with time.perf_counter around the call:

* decode: T1 = time of generate([p1], 1) and TN = time of generate([p2], N) for two fresh 128-token
  prompts (fresh so no prefix cache helps); decode tok/s = (N - 1) / (TN - T1), i.e. the tokens after
  the first over the time between the first and the last token. Where the engine reports per-token
  times itself, (N - 1) / (last - first) is recorded too ("decode_tok_s_internal").
* prefill: K fresh 512-token prompts, one at a time, max_tokens 1; tok/s = sum(prompt tokens) / sum(time).
* offline: all prompts in one generate call; total tok/s = (prompt + new tokens) / time.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

# generate(prompts, max_tokens) -> (new-token counts per prompt, engine-internal extras or {})
Generate = Callable[[list[list[int]], int], tuple[list[int], dict[str, Any]]]


def load_spec() -> tuple[dict[str, Any], str]:
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: {sys.argv[0]} SPEC.json RESULT.json")
    with open(sys.argv[1]) as f:
        return json.load(f), sys.argv[2]


def log(msg: str) -> None:
    print(f"[worker] {msg}", file=sys.stderr, flush=True)


def timed(generate: Generate, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[int], dict]:
    start = time.perf_counter()
    counts, extra = generate(prompts, max_tokens)
    elapsed = time.perf_counter() - start
    if counts != [max_tokens] * len(prompts):
        raise RuntimeError(f"expected {max_tokens} new tokens per prompt, got {sorted(set(counts))}")
    return elapsed, counts, extra


def warm_up(generate: Generate, prompts: list[list[int]], batched: bool = False) -> None:
    """Untimed short generates, so lazy initialisation (kernel compilation, first-touch allocation,
    thread pools) is not in the numbers: one prompt at a time, or all in one call (`batched`)."""
    if batched:
        generate(prompts, 8)
    else:
        for p in prompts:
            generate([p], 8)


def run_decode(generate: Generate, w: dict[str, Any]) -> list[dict[str, Any]]:
    n = w["output_len"]
    out = []
    for run in w["runs"]:
        t1, _, _ = timed(generate, [run["prompt_first"]], 1)
        tn, _, extra = timed(generate, [run["prompt"]], n)
        rec = {
            "prompt_tokens": len(run["prompt"]),
            "output_tokens": n,
            "t1_s": t1,
            "tn_s": tn,
            "decode_tok_s": (n - 1) / (tn - t1),
            **extra,
        }
        log(f"decode: {rec['decode_tok_s']:.1f} tok/s (T1 {t1 * 1000:.1f} ms, T{n} {tn:.3f} s)")
        out.append(rec)
    return out


def run_prefill(generate: Generate, w: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for prompts in w["runs"]:
        times = [timed(generate, [p], 1)[0] for p in prompts]
        n_tok = sum(len(p) for p in prompts)
        rec = {
            "num_prompts": len(prompts),
            "prompt_tokens": n_tok,
            "elapsed_s": sum(times),
            "per_prompt_s": times,
            "prompt_tok_s": n_tok / sum(times),
        }
        log(f"prefill: {rec['prompt_tok_s']:.1f} tok/s")
        out.append(rec)
    return out


def run_offline(generate: Generate, w: dict[str, Any], mode: str | None = None) -> list[dict[str, Any]]:
    n = w["output_len"]
    out = []
    for prompts in w["runs"]:
        elapsed, counts, extra = timed(generate, prompts, n)
        n_prompt = sum(len(p) for p in prompts)
        n_out = sum(counts)
        rec = {
            "num_prompts": len(prompts),
            "prompt_tokens": n_prompt,
            "output_tokens": n_out,
            "elapsed_s": elapsed,
            "total_tok_s": (n_prompt + n_out) / elapsed,
            "output_tok_s": n_out / elapsed,
            **({"mode": mode} if mode else {}),
            **extra,
        }
        log(f"offline{f' ({mode})' if mode else ''}: {rec['total_tok_s']:.1f} total tok/s in {elapsed:.2f} s")
        out.append(rec)
    return out


def run_all(
    spec: dict[str, Any],
    generate: Generate,
    offline_modes: dict[str, Generate] | None = None,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The workloads the spec asks for, in a fixed order. `offline_modes` replaces `generate` for the
    offline workload by one or more named batch modes (llama.cpp has two)."""
    result: dict[str, Any] = {"engine": spec["engine"], **(info or {})}
    warm_up(generate, spec["warmup_prompts"])
    if "decode" in spec:
        result["decode"] = run_decode(generate, spec["decode"])
    if "prefill" in spec:
        result["prefill"] = run_prefill(generate, spec["prefill"])
    if "offline" in spec:
        modes = offline_modes or {"": generate}
        runs = []
        for mode, gen in modes.items():
            warm_up(gen, spec["offline"]["warmup"], batched=True)  # the same batch shape as the runs
            runs += run_offline(gen, spec["offline"], mode or None)
        result["offline"] = runs
    return result


def write_result(path: str, result: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def single_run(
    mode: str, prompt: int, repeat: int, seconds: float, decode_s: float, output: list[int]
) -> dict[str, Any]:
    """One prompt's greedy run for the speculative-decoding workers (*_spec.py), logged as it is recorded:
    whole-call seconds, first-to-last-token seconds, the tokens."""
    n = len(output)
    log(f"{mode} prompt {prompt}: {n} tokens, decode {(n - 1) / max(decode_s, 1e-9):.1f} tok/s")
    return {
        "prompt": prompt,
        "repeat": repeat,
        "tn_s": seconds,
        "decode_s": decode_s,
        "tokens": n,
        "output": output,
    }
