"""vLLM's offline workloads through `vllm.LLM` (run with /tmp/vllm-peer/bin/python; see _common.py for
the protocol and how each figure is measured). Thread binding comes from the environment the caller sets
(VLLM_CPU_OMP_THREADS_BIND, VLLM_CPU_KVCACHE_SPACE, OMP_NUM_THREADS)."""

from __future__ import annotations

import os
import time
from typing import Any

from _common import load_spec, log, run_all, write_result


def main() -> None:
    spec, out_path = load_spec()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    options = {"dtype": "bfloat16", "gpu_memory_utilization": 0.5, "seed": 0, **spec.get("vllm_options", {})}
    start = time.perf_counter()
    llm = LLM(model=spec["model_dir"], **options)
    load_s = time.perf_counter() - start
    log(f"vLLM loaded in {load_s:.1f} s with {options}")

    def generate(prompts: list[list[int]], max_tokens: int) -> tuple[list[int], dict[str, Any]]:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        extra: dict[str, Any] = {}
        m = getattr(outs[0], "metrics", None)
        if len(outs) == 1 and max_tokens > 1 and m is not None:  # engine-core token timestamps, if kept
            first, last = getattr(m, "first_token_ts", 0.0), getattr(m, "last_token_ts", 0.0)
            if first and last > first:
                extra["decode_tok_s_internal"] = (max_tokens - 1) / (last - first)
        return [len(o.outputs[0].token_ids) for o in outs], extra

    env = {
        k: os.environ.get(k)
        for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS")
    }
    info = {"load_s": load_s, "options": options, "env": env}
    write_result(out_path, run_all(spec, generate, info=info))


if __name__ == "__main__":  # vllm.LLM spawns its engine process: keep this guard
    main()
