"""Structured output on the default model: decode speed with and without a JSON schema (batch 1 and 16), the
share of outputs that parse and validate, and the grammar compile time of a 30-field schema.

    python benchmarks/structured.py [--max-tokens 96] [--repeats 3] [--json out.json]

Speed: each constrained request runs until its grammar completes; the same prompts then run free with
ignore_eos and max_tokens set to the constrained run's token counts, so both runs decode the same number of
tokens per request. tok/s is decode throughput, (output tokens - 1) per request / time from the first to the
last token of the batch; the two runs alternate and each column is the best of the repeats (on a shared
machine the best run is the one least disturbed; the median is in the JSON). Validity: constrained outputs through `jsonschema`, and,
for comparison, what the model writes when only asked for JSON in the prompt (no constraint).
The machine may be shared: compare the two columns of one run, not runs of different days.

Side by side with vLLM's CPU backend (`--engines tokenmill,vllm`; vLLM's venv and converted model as for
benchmarks/vs_peers.py, `--setup-peers` creates them): the same token-id prompts, schema, temperature and
batches run in vLLM (benchmarks/peers/vllm_structured.py, its default structured backend xgrammar, bf16) after
tokenmill is done, one engine at a time, both with `--threads` threads. For this table both engines are timed
the same way, by wall clock around one `generate` call (tok/s = output tokens / time, prefill included: the
prompts are ~60 tokens); the compile column is each engine's grammar library on the 30-field schema as the
engine calls it (llguidance in tokenmill, xgrammar in vLLM).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jsonschema

sys.path.insert(0, str(Path(__file__).resolve().parent))  # grammar_backends' wide schema

from grammar_backends import wide_schema  # noqa: E402
from servers import default_gguf  # noqa: E402
from vs_peers import ensure_vllm, run_worker, worker_args  # noqa: E402

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.structured import StructuredOutputs  # noqa: E402
from tokenmill.structured.grammar import StructuredBackend  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
        "hobbies": {
            "type": "array",
            "items": {"type": "string", "maxLength": 16},
            "minItems": 1,
            "maxItems": 3,
        },
        "employed": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "hobbies", "employed"],
    "additionalProperties": False,
}
PEOPLE = [
    "a retired teacher from Lyon",
    "a young software engineer in Nairobi",
    "a fisherman from Bergen",
    "a student who loves chess",
    "a baker in Naples",
    "a nurse working night shifts in Toronto",
    "a painter living in Kyoto",
    "a farmer from Iowa",
    "a pilot based in Dubai",
    "a librarian in Krakow",
    "a marine biologist in Perth",
    "a jazz musician from New Orleans",
    "a chef in Lima",
    "an architect in Barcelona",
    "a taxi driver in Cairo",
    "a mountain guide in Chamonix",
]


def prompt(llm: LLM, who: str) -> dict:
    text = (
        f"Describe {who} as a JSON object with the keys name, age, city, hobbies (a list of strings) and "
        "employed (true or false). Answer with the JSON object only."
    )
    ids = llm.get_tokenizer().apply_chat_template([{"role": "user", "content": text}], tokenize=True)
    return {"prompt_token_ids": ids}


def decode_rate(outputs) -> float:
    first = min(o.metrics.first_token_time for o in outputs)
    last = max(o.metrics.finish_time for o in outputs)
    tokens = sum(len(o.outputs[0].token_ids) - 1 for o in outputs)
    return tokens / (last - first)


def validates(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def measure(llm: LLM, batch: int, max_tokens: int, repeats: int) -> dict:
    prompts = [prompt(llm, PEOPLE[i % len(PEOPLE)]) for i in range(batch)]
    constrained = SamplingParams(
        max_tokens=max_tokens, temperature=0.7, seed=0, structured=StructuredOutputs(json=SCHEMA)
    )
    with_rates, free_rates, valid, total = [], [], 0, 0
    wall: dict[str, list[dict]] = {"with_schema": [], "without_schema": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, constrained, use_tqdm=False)
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        wall["with_schema"].append({"elapsed_s": time.perf_counter() - t0, "tokens": sum(lengths)})
        with_rates.append(decode_rate(outs))
        valid += sum(validates(o.outputs[0].text) for o in outs)
        total += len(outs)
        free = [SamplingParams(max_tokens=n, temperature=0.7, seed=0, ignore_eos=True) for n in lengths]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, free, use_tqdm=False)
        wall["without_schema"].append({"elapsed_s": time.perf_counter() - t0, "tokens": sum(lengths)})
        free_rates.append(decode_rate(outs))
    with_schema, without = max(with_rates), max(free_rates)
    return {
        "batch": batch,
        **wall,
        "median_tok_s_without_schema": statistics.median(free_rates),
        "median_tok_s_with_schema": statistics.median(with_rates),
        "tok_s_without_schema": without,
        "tok_s_with_schema": with_schema,
        "slowdown_pct": 100.0 * (1.0 - with_schema / without),
        "valid": valid,
        "outputs": total,
    }


def unconstrained_validity(llm: LLM, max_tokens: int) -> tuple[int, int]:
    prompts = [prompt(llm, who) for who in PEOPLE]
    outs = llm.generate(
        prompts, SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=0), use_tqdm=False
    )
    return sum(validates(o.outputs[0].text.strip().strip("`").removeprefix("json")) for o in outs), len(outs)


def compile_times(llm: LLM) -> dict:
    engine = llm.engine
    t0 = time.perf_counter()
    backend = StructuredBackend(engine.tokenizer, engine.model_config.vocab_size)
    setup = time.perf_counter() - t0
    spec = StructuredOutputs(json=wide_schema(30))
    t0 = time.perf_counter()
    backend.compile(spec)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    matcher = backend.matcher(spec)
    matcher.next_bitmask()
    first_mask = time.perf_counter() - t0
    t0 = time.perf_counter()
    backend.compile(spec)
    cached = time.perf_counter() - t0
    return {
        "tokenizer_setup_ms": setup * 1e3,
        "compile_30_fields_ms": cold * 1e3,
        "first_mask_ms": first_mask * 1e3,
        "cached_compile_ms": cached * 1e3,
    }


def wall_tok_s(runs: list[dict]) -> float:
    """Median output tok/s of wall-clock runs (the side-by-side table's measure)."""
    return statistics.median(r["tokens"] / r["elapsed_s"] for r in runs)


def vllm_side(llm: LLM, args: argparse.Namespace, log_dir: Path) -> dict:
    """The same workload in vLLM's CPU backend (benchmarks/peers/vllm_structured.py), in its own process."""
    gguf = default_gguf()
    ensure_vllm(gguf, args.setup_peers)
    spec = {
        "prompts": [prompt(llm, PEOPLE[i % len(PEOPLE)])["prompt_token_ids"] for i in range(max(BATCHES))],
        "schema": SCHEMA,
        "wide_schema": wide_schema(30),
        "batches": list(BATCHES),
        "max_tokens": args.max_tokens,
        "temperature": 0.7,
        "repeats": args.repeats,
        "vocab_size": llm.engine.model_config.vocab_size,
        "warmup_prompts": [],
    }
    return run_worker("vllm", spec, worker_args(args.threads, gguf, 3600), log_dir, worker="structured")


def print_side_by_side(tm: dict, peer: dict) -> None:
    print(
        "\n| batch | engine | tok/s without schema | tok/s with schema | slower by | valid | 30-field compile ms |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    for name, res in (("tokenmill (llguidance)", tm), ("vLLM (xgrammar)", peer)):
        for r in res["speed"]:
            free, constrained = wall_tok_s(r["without_schema"]), wall_tok_s(r["with_schema"])
            print(
                f"| {r['batch']} | {name} | {free:.1f} | {constrained:.1f} | {100 * (1 - constrained / free):.1f}% "
                f"| {r['valid']}/{r['outputs']} | {res['compile']['compile_30_fields_ms']:.1f} |"
            )


BATCHES = (1, 16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="threads of each engine (default: 2)")
    ap.add_argument(
        "--engines", default="tokenmill", help="tokenmill, or tokenmill,vllm for the side-by-side table"
    )
    ap.add_argument("--setup-peers", action="store_true", help="create vLLM's venv if it is missing")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(engines) - {"tokenmill", "vllm"})
    if unknown or "tokenmill" not in engines:
        ap.error(f"--engines: tokenmill or tokenmill,vllm (got {args.engines!r})")
    llm = LLM(threads=args.threads)
    llm.generate(["warm up"], SamplingParams(max_tokens=4), use_tqdm=False)
    results = {"compile": compile_times(llm), "speed": []}
    for batch in BATCHES:
        results["speed"].append(measure(llm, batch, args.max_tokens, args.repeats))
    ok, n = unconstrained_validity(llm, args.max_tokens * 2)
    results["unconstrained_valid"] = [ok, n]
    print("| batch | tok/s without schema | tok/s with schema | slower by | outputs valid |")
    print("|---:|---:|---:|---:|---:|")
    for r in results["speed"]:
        print(
            f"| {r['batch']} | {r['tok_s_without_schema']:.1f} | {r['tok_s_with_schema']:.1f} | "
            f"{r['slowdown_pct']:.1f}% | {r['valid']}/{r['outputs']} |"
        )
    c = results["compile"]
    print(
        f"\n30-field schema: compile {c['compile_30_fields_ms']:.1f} ms, first mask {c['first_mask_ms']:.1f} ms, "
        f"cached {c['cached_compile_ms']:.3f} ms (tokenizer setup, once per engine: {c['tokenizer_setup_ms']:.0f} ms)"
    )
    print(f"without a constraint (JSON asked for in the prompt only): {ok}/{n} outputs validate")
    if "vllm" in engines:
        with tempfile.TemporaryDirectory(prefix="structured-vllm-") as log_dir:
            results["vllm"] = vllm_side(llm, args, Path(log_dir))
        print_side_by_side(results, results["vllm"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
