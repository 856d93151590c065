"""vLLM's structured output on benchmarks/structured.py's workload (run with /tmp/vllm-peer/bin/python).

    PYTHON benchmarks/peers/vllm_structured.py SPEC.json RESULT.json

The spec holds the token-id prompts (the default model's chat template, rendered by tokenmill so both engines
see the same ids), the schema, the batch sizes, max_tokens, temperature and repeats. Per batch and repeat: the
constrained batch (vLLM's `structured_outputs` with the schema; its default backend, xgrammar) runs until each
grammar completes, then the same prompts run free with `ignore_eos` and each request's constrained token
count, so both runs decode the same tokens; both timed by wall clock around `generate`. The compile time is
xgrammar's `compile_json_schema` on the 30-field schema, as vLLM's xgrammar backend calls it, cold (a new
compiler) and from its cache. Standard library, vLLM and what vLLM installs only.
"""

from __future__ import annotations

import json
import time
from typing import Any

from _common import load_spec, log, write_result


def validates(text: str, schema: dict) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def main() -> None:
    spec, out_path = load_spec()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    options = {"dtype": "bfloat16", "gpu_memory_utilization": 0.5, "seed": 0, **spec.get("vllm_options", {})}
    start = time.perf_counter()
    llm = LLM(model=spec["model_dir"], **options)
    log(f"vLLM loaded in {time.perf_counter() - start:.1f} s with {options}")
    schema, temperature = spec["schema"], spec["temperature"]

    def run(prompts: list[list[int]], params: list[Any]) -> tuple[float, list[Any]]:
        t0 = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - t0, [o.outputs[0] for o in outs]

    constrained = SamplingParams(
        max_tokens=spec["max_tokens"],
        temperature=temperature,
        seed=0,
        structured_outputs=StructuredOutputsParams(json=schema),
    )
    warm = spec["prompts"][:2]
    run(warm, [constrained] * len(warm))  # untimed: the schema's first compile and the engine's warm-up
    speed = []
    for batch in spec["batches"]:
        prompts = spec["prompts"][:batch]
        rec: dict[str, Any] = {
            "batch": batch,
            "with_schema": [],
            "without_schema": [],
            "valid": 0,
            "outputs": 0,
        }
        for _ in range(spec["repeats"]):
            elapsed, outs = run(prompts, [constrained] * batch)
            lengths = [len(o.token_ids) for o in outs]
            rec["with_schema"].append({"elapsed_s": elapsed, "tokens": sum(lengths)})
            rec["valid"] += sum(validates(o.text, schema) for o in outs)
            rec["outputs"] += len(outs)
            free = [
                SamplingParams(max_tokens=n, temperature=temperature, seed=0, ignore_eos=True)
                for n in lengths
            ]
            elapsed_free, outs_free = run(prompts, free)
            got = [len(o.token_ids) for o in outs_free]
            if got != lengths:
                raise RuntimeError(f"free run decoded {got}, expected {lengths}")
            rec["without_schema"].append({"elapsed_s": elapsed_free, "tokens": sum(lengths)})
            log(
                f"batch {batch}: {sum(lengths) / elapsed:.1f} tok/s with, {sum(lengths) / elapsed_free:.1f} without"
            )
        speed.append(rec)
    write_result(
        out_path, {"engine": "vllm", "options": options, "speed": speed, "compile": compile_ms(spec)}
    )


def compile_ms(spec: dict[str, Any]) -> dict[str, float]:
    """xgrammar's compile of the wide schema, the call vLLM's xgrammar backend makes per new schema."""
    import xgrammar as xgr
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=spec["vocab_size"])
    setup = time.perf_counter() - t0
    text = json.dumps(spec["wide_schema"])
    t0 = time.perf_counter()
    compiler = xgr.GrammarCompiler(info, max_threads=8, cache_enabled=True)  # as vLLM builds it
    compiler.compile_json_schema(text, any_whitespace=True)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiler.compile_json_schema(text, any_whitespace=True)
    cached = time.perf_counter() - t0
    return {
        "tokenizer_setup_ms": setup * 1e3,
        "compile_30_fields_ms": cold * 1e3,
        "cached_compile_ms": cached * 1e3,
    }


if __name__ == "__main__":  # vllm.LLM spawns its engine process: keep this guard
    main()
