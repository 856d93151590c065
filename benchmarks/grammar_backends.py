"""Grammar engines side by side on the default model's tokenizer: llguidance vs xgrammar, CPU bitmasks.

For each schema / grammar, a valid answer is tokenized with the model's tokenizer and replayed through a
matcher of each backend: before every token the matcher fills the next-token bitmask (what the engine does
once per constrained row and step), then accepts the token. Reported: tokenizer setup, compile time (cold,
no cache), and the per-token mask-fill cost (median and p90 over the answer's tokens, several passes).

    python benchmarks/grammar_backends.py [--passes 5] [--json out.json]

xgrammar needs `transformers` to read the tokenizer (TokenizerInfo.from_huggingface) and is installed
without its `triton` dependency here (`pip install --no-deps xgrammar apache-tvm-ffi`): only the CPU path
is measured. The machine this runs on may be shared; the ratio between the backends is the useful figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from tokenmill.models.gguf import GGUFModel
from tokenmill.models.source import default_model_path
from tokenmill.models.tokenizer import Tokenizer

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
            "required": ["street", "city"],
            "additionalProperties": False,
        },
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "email", "tags", "address", "role"],
    "additionalProperties": False,
}
PERSON = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@example.org",
    "tags": ["math", "engines", "poetry"],
    "address": {"street": "12 St James's Square", "city": "London"},
    "role": "admin",
}


def wide_schema(num_fields: int = 30) -> dict:
    """A flat object of `num_fields` required fields cycling through string, integer, number, boolean,
    enum and array-of-strings types: the '30-field schema' of the issue's compile-time figure."""
    kinds = [
        {"type": "string"},
        {"type": "integer"},
        {"type": "number"},
        {"type": "boolean"},
        {"enum": ["red", "green", "blue"]},
        {"type": "array", "items": {"type": "string"}},
    ]
    props = {f"field_{i:02d}": kinds[i % len(kinds)] for i in range(num_fields)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def wide_instance(num_fields: int = 30) -> dict:
    values = ["text value", 42, 3.25, True, "green", ["a", "b"]]
    return {f"field_{i:02d}": values[i % len(values)] for i in range(num_fields)}


CASES = {
    "json_schema (person)": ("json_schema", PERSON_SCHEMA, json.dumps(PERSON)),
    "json_schema (30 fields)": ("json_schema", wide_schema(), json.dumps(wide_instance())),
    "json_object (any JSON)": ("json_object", None, json.dumps(PERSON)),
    "regex (date)": ("regex", r"\d{4}-\d{2}-\d{2}", "2024-05-17"),
}


@dataclass
class Row:
    backend: str
    case: str
    tokens: int
    compile_ms: float
    mask_us_median: float
    mask_us_p90: float
    mask_us_mean: float
    first_pass_ms: float  # all masks of the first replay: includes work a backend defers past compile


def time_matcher(
    fill: Callable[[], None], accept: Callable[[int], None], reset: Callable[[], None], ids, passes
):
    times = []
    for _ in range(passes):
        reset()
        for t in ids:
            t0 = time.perf_counter()
            fill()
            times.append(time.perf_counter() - t0)
            accept(t)
    first = sum(times[: len(ids)]) * 1e3
    mean = statistics.fmean(times) * 1e6
    times.sort()
    return statistics.median(times) * 1e6, times[int(0.9 * (len(times) - 1))] * 1e6, mean, first


def bench_llguidance(tok: Tokenizer, passes: int) -> tuple[float, list[Row]]:
    import llguidance
    import llguidance.torch as llt

    t0 = time.perf_counter()
    lltok = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size, eos_token=tok.eos_token_id)
    setup = time.perf_counter() - t0
    opts = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    rows = []
    for case, (kind, schema, text) in CASES.items():
        ids = tok.encode(text, add_special_tokens=False)
        t0 = time.perf_counter()
        if kind == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=opts)
        elif kind == "json_object":
            grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=opts)
        else:
            grammar = llguidance.LLMatcher.grammar_from_regex(schema)
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        compile_ms = (time.perf_counter() - t0) * 1e3
        assert not matcher.is_error(), matcher.get_error()
        mask = llt.allocate_token_bitmask(1, tok.vocab_size)

        def accept(t: int, m=matcher, case=case) -> None:
            assert m.consume_token(t), (case, m.get_error())

        med, p90, mean, first = time_matcher(
            lambda m=matcher, b=mask: llt.fill_next_token_bitmask(m, b, 0), accept, matcher.reset, ids, passes
        )
        rows.append(Row("llguidance", case, len(ids), compile_ms, med, p90, mean, first))
    return setup, rows


def bench_xgrammar(tok: Tokenizer, passes: int) -> tuple[float, list[Row]]:
    import transformers
    import xgrammar as xgr

    t0 = time.perf_counter()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, eos_token=tok.eos_token)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=tok.vocab_size)
    setup = time.perf_counter() - t0
    rows = []
    for case, (kind, schema, text) in CASES.items():
        ids = tok.encode(text, add_special_tokens=False)
        compiler = xgr.GrammarCompiler(info, cache_enabled=False, max_threads=1)
        t0 = time.perf_counter()
        if kind == "json_schema":
            compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        elif kind == "json_object":
            compiled = compiler.compile_builtin_json_grammar()
        else:
            compiled = compiler.compile_regex(schema)
        matcher = xgr.GrammarMatcher(compiled)
        compile_ms = (time.perf_counter() - t0) * 1e3
        mask = xgr.allocate_token_bitmask(1, tok.vocab_size)

        def accept(t: int, m=matcher, case=case) -> None:
            assert m.accept_token(t), case

        med, p90, mean, first = time_matcher(
            lambda m=matcher, b=mask: m.fill_next_token_bitmask(b, 0), accept, matcher.reset, ids, passes
        )
        rows.append(Row("xgrammar", case, len(ids), compile_ms, med, p90, mean, first))
    return setup, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = Tokenizer.from_gguf_metadata(GGUFModel(default_model_path()).metadata)
    results = {}
    for name, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
        setup, rows = fn(tok, args.passes)
        results[name] = {"tokenizer_setup_s": setup, "rows": [asdict(r) for r in rows]}
        print(f"{name}: tokenizer setup {setup:.2f} s")
    print("\n| case | tokens | backend | compile ms | first replay ms | mask us/token median | p90 | mean |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for case in CASES:
        for name in results:
            r = next(r for r in results[name]["rows"] if r["case"] == case)
            print(
                f"| {case} | {r['tokens']} | {name} | {r['compile_ms']:.1f} | {r['first_pass_ms']:.2f} | "
                f"{r['mask_us_median']:.1f} | {r['mask_us_p90']:.1f} | {r['mask_us_mean']:.1f} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
