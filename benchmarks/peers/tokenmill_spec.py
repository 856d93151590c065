"""tokenmill's side of benchmarks/spec_vs_llamacpp.py: greedy generation of each prompt alone, per speculative
mode (one engine per mode, prefix caching off so no run reuses another's prompt; a mode's "engine" dict adds
engine options).

    .venv/bin/python benchmarks/peers/tokenmill_spec.py SPEC.json RESULT.json

Batch 1 (default), per prompt and repeat: the time of generate(prompt, max_tokens) (stops at the end-of-sequence token), and the
engine's own first-token-to-last time (decode). With "batch": B in the spec, every repeat is one generate
of B prompts (the prompts repeated in turn) and records output tokens over its wall time.
"""

from __future__ import annotations

import time
from typing import Any

from _common import load_spec, log, single_run, write_result


def single(llm: Any, mode: str, index: int, repeat: int, prompt: list[int], params: Any) -> dict[str, Any]:
    """One prompt alone: its tokens, the call's seconds and the engine's first-to-last-token seconds."""
    t = time.perf_counter()
    request = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    seconds = time.perf_counter() - t
    out, m = request.outputs[0], request.metrics
    return single_run(mode, index, repeat, seconds, m.finish_time - m.first_token_time, list(out.token_ids))


def main() -> None:
    spec, out_path = load_spec()
    import torch

    from tokenmill import LLM, SamplingParams

    torch.set_num_threads(spec["threads"])
    prompts: list[list[int]] = spec["prompts"]
    results: dict[str, Any] = {}
    for mode in spec["modes"]:
        name, config = mode["name"], mode.get("speculative_config")
        start = time.perf_counter()
        llm = LLM(
            spec["gguf"],
            threads=spec["threads"],
            enable_prefix_caching=False,
            kv_cache_memory="1GiB",
            speculative_config=config,
            max_model_len=spec["max_model_len"],
            **mode.get("engine", {}),  # further engine options of the mode, e.g. activations
        )
        load_s = time.perf_counter() - start
        full = SamplingParams(max_tokens=spec["max_tokens"], temperature=0)
        llm.generate(
            [{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False
        )
        runs = []
        batch = spec.get("batch", 1)
        for repeat in range(spec["repeats"]):
            if batch == 1:
                runs += [single(llm, name, i, repeat, p, full) for i, p in enumerate(prompts)]
                continue
            many = [{"prompt_token_ids": prompts[i % len(prompts)]} for i in range(batch)]
            t = time.perf_counter()
            outs = llm.generate(many, full, use_tqdm=False)
            tn = time.perf_counter() - t
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            runs.append({"repeat": repeat, "tn_s": tn, "tokens": n, "sequences": len(many)})
            log(f"{name} batch {len(many)}: {n} tokens, {n / tn:.1f} tok/s")
        stats = llm.engine.spec_stats
        results[name] = {
            "load_s": load_s,
            "runs": runs,
            "draft_tokens": stats.num_draft_tokens,
            "accepted_tokens": stats.num_accepted_tokens,
            "acceptance_rate": stats.acceptance_rate if stats.num_draft_tokens else None,
            "mean_acceptance_length": stats.mean_acceptance_length if stats.num_draft_tokens else None,
        }
        del llm
    write_result(out_path, {"modes": results, "info": {"threads": spec["threads"]}})


if __name__ == "__main__":
    main()
