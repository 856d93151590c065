"""Speculative decoding at batch 1, tokenmill vs llama.cpp (llama-cpp-python) on the same GGUFs and prompts:
prompt lookup on input-grounded prompts (the default model), a draft model on code completion (the
Qwen2.5-Coder pair: 0.5B drafting for 1.5B), and layer skipping on open chat (the 1.5B drafting for itself;
tokenmill only speculates there, llama.cpp runs plain for reference). The chat workload needs the layers to
skip, searched once: `tokenmill eval layerskip -m /tmp/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
--output /tmp/models/qwen2.5-coder-1.5b-skip.json --num-tokens 128 --max-evals 40`.

    python benchmarks/spec_vs_llamacpp.py [--workloads grounded,code] [--repeats 3] [--json out.json]
    python benchmarks/spec_vs_llamacpp.py --workloads grounded --batch 16   # tokenmill alone, 16 at once
    python benchmarks/spec_vs_llamacpp.py --workloads code --modes "draft k=4,plain int8-act"

Each engine runs in its own process and venv, one after the other (benchmarks/peers/tokenmill_spec.py,
benchmarks/peers/llamacpp_spec.py), greedy, every prompt alone, until the end-of-sequence token or
--max-tokens. Per run: decode tok/s = (n - 1) / (time from the first token to the last), and end-to-end
tok/s = n / (time of the whole call, prefill included). A cell is the median over repeats per prompt, averaged
over the prompts. Speculative runs are checked against their engine's plain run (same tokens).

llama.cpp's venv: `python3 -m venv /tmp/llamacpp-peer && /tmp/llamacpp-peer/bin/pip install
'llama-cpp-python[server]'` (compiles llama.cpp). The Qwen pair: `python benchmarks/fetch_qwen_pair.py`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from vs_peers import LLAMACPP_PYTHON, ModelInfo, run_worker, worker_args  # noqa: E402

from tokenmill.entrypoints.env_info import env_report  # noqa: E402
from tokenmill.models.source import resolve_model  # noqa: E402

QWEN_TARGET = Path("/tmp/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
QWEN_DRAFT = Path("/tmp/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
QWEN_SKIP = Path("/tmp/models/qwen2.5-coder-1.5b-skip.json")  # `tokenmill eval layerskip` on the 1.5B
CHAT_ASKS = [
    "What are the main differences between a process and a thread? Answer in a short paragraph.",
    "Give me three tips for writing readable Python code, with one sentence of explanation each.",
    "Explain what a hash table is to a new programmer.",
]


def grounded_prompts(tokenizer) -> list[list[int]]:
    """Input-grounded chat prompts (300-1,000 tokens) whose answers copy much of the input: repeat code,
    rename in code, correct a text, summarise a text."""
    import inspect
    from pydoc_data.topics import topics

    from tokenmill.engine import block_manager, scheduler

    code = inspect.getsource(block_manager.BlockManager.append_slots) + inspect.getsource(
        block_manager.BlockManager.free
    )
    code2 = inspect.getsource(scheduler.Scheduler.schedule)[:2400]
    text = topics["if"] + "\n" + topics["while"]
    typos = topics["for"][:1800].replace("the ", "teh ", 6).replace("is ", "si ", 3)
    asks = [
        "Repeat the following code exactly, then stop.\n\n" + code,
        "Rewrite this function, renaming the variable `seq` to `sequence` everywhere. Output the whole "
        "function.\n\n" + code2,
        "Correct the spelling mistakes in the following text and output the corrected text in full.\n\n"
        + typos,
        "Summarise the following documentation in a few sentences, quoting its key rules.\n\n" + text,
    ]
    return [tokenizer.apply_chat_template([{"role": "user", "content": a}], tokenize=True) for a in asks]


def chat_prompts(tokenizer) -> list[list[int]]:
    """Open chat: short questions whose answers the prompt does not contain (no n-gram to copy)."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": a}], tokenize=True) for a in CHAT_ASKS]


def code_prompts(tokenizer, count: int) -> list[list[int]]:
    from spec_draft import PROMPTS

    return [tokenizer.encode(p) for p in PROMPTS[:count]]


def draft_mode(name: str, k: int | str, **draft_options: str) -> dict[str, Any]:
    """A tokenmill mode drafting with the Qwen 0.5B for the 1.5B."""
    spec = {"method": "draft_model", "model": str(QWEN_DRAFT), "num_speculative_tokens": k, **draft_options}
    return {"name": name, "speculative_config": spec}


WORKLOADS: dict[str, dict[str, Any]] = {
    "grounded": {
        "tokenmill": [
            {"name": "plain"},
            {"name": "ngram k=4", "speculative_config": {"method": "ngram", "num_speculative_tokens": 4}},
            {"name": "ngram k=8", "speculative_config": {"method": "ngram", "num_speculative_tokens": 8}},
            {
                "name": "ngram auto",
                "speculative_config": {"method": "ngram", "num_speculative_tokens": "auto"},
            },
            # int8 activations (as llama.cpp's Q8 blocks): lossy, so "same" compares with the exact plain run
            {"name": "plain int8-act", "engine": {"activations": "int8"}},
            {
                "name": "ngram auto int8-act",
                "speculative_config": {"method": "ngram", "num_speculative_tokens": "auto"},
                "engine": {"activations": "int8"},
            },
        ],
        "llamacpp": [
            {"name": "plain", "kind": "plain"},
            # llama-cpp-python's defaults (max_ngram_size=2, num_pred_tokens=10), and k = 4 as tokenmill's
            {
                "name": "prompt lookup k=10",
                "kind": "prompt_lookup",
                "max_ngram_size": 2,
                "num_pred_tokens": 10,
            },
            {"name": "prompt lookup k=4", "kind": "prompt_lookup", "max_ngram_size": 2, "num_pred_tokens": 4},
        ],
    },
    "code": {
        "tokenmill": [
            {"name": "plain"},
            draft_mode("draft k=4", 4),
            # the draft alone made cheaper (q4 weights, int8 activations): the output stays the exact target's
            draft_mode("draft k=4 cheap-draft", 4, draft_weights="q4", draft_activations="int8"),
            draft_mode("draft auto cheap-draft", "auto", draft_weights="q4", draft_activations="int8"),
            {"name": "plain int8-act", "engine": {"activations": "int8"}},
            {**draft_mode("draft k=4 int8-act", 4), "engine": {"activations": "int8"}},
        ],
        "llamacpp": [
            {"name": "plain", "kind": "plain"},
            {"name": "draft k=4", "kind": "draft", "num_pred_tokens": 4},
        ],
    },
    "chat": {
        "tokenmill": [
            {"name": "plain"},
            {
                "name": "layerskip k=3",
                "speculative_config": {
                    "method": "layerskip",
                    "skip_layers_file": str(QWEN_SKIP),
                    "num_speculative_tokens": 3,
                },
            },
            {
                "name": "layerskip auto",
                "speculative_config": {
                    "method": "layerskip",
                    "skip_layers_file": str(QWEN_SKIP),
                    "num_speculative_tokens": "auto",
                },
            },
        ],
        "llamacpp": [{"name": "plain", "kind": "plain"}],
    },
}


def summarise(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per mode: mean over prompts of the per-prompt median decode and end-to-end tok/s."""
    out = {}
    plain_outputs = {r["prompt"]: r["output"] for r in result["modes"]["plain"]["runs"]}
    for name, mode in result["modes"].items():
        per_prompt: dict[int, list[dict]] = {}
        for r in mode["runs"]:
            per_prompt.setdefault(r["prompt"], []).append(r)
        decode = [
            statistics.median((r["tokens"] - 1) / r["decode_s"] for r in rs) for rs in per_prompt.values()
        ]
        e2e = [statistics.median(r["tokens"] / r["tn_s"] for r in rs) for rs in per_prompt.values()]
        out[name] = {
            "decode_tok_s": statistics.mean(decode),
            "e2e_tok_s": statistics.mean(e2e),
            "decode_per_prompt": decode,
            "tokens": [rs[0]["tokens"] for rs in per_prompt.values()],
            "same_as_plain": all(r["output"] == plain_outputs[r["prompt"]] for r in mode["runs"]),
            "acceptance_rate": mode.get("acceptance_rate"),
            "mean_acceptance_length": mode.get("mean_acceptance_length"),
        }
    return out


def summarise_batch(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per mode: the median over repeats of output tokens / wall time of the whole batch."""
    return {
        name: {
            "tok_s": statistics.median(r["tokens"] / r["tn_s"] for r in mode["runs"]),
            "acceptance_rate": mode.get("acceptance_rate"),
            "draft_tokens": mode.get("draft_tokens"),
        }
        for name, mode in result["modes"].items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="grounded,code")
    p.add_argument("--engines", default="tokenmill,llamacpp")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=256, help="grounded prompts (default 256)")
    p.add_argument("--code-max-tokens", type=int, default=64, help="code and chat prompts (default 64)")
    p.add_argument("--code-prompts", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--batch", type=int, default=1, help="B > 1: tokenmill only, B prompts in one generate (default: 1)"
    )
    p.add_argument(
        "--modes",
        default=None,
        help="run only these modes (names as in the tables, comma-separated; plain always runs) (default: all)",
    )
    p.add_argument("--json", default=None)
    p.add_argument("--log-dir", default=None)
    args = p.parse_args()
    wanted = None if args.modes is None else {m.strip() for m in args.modes.split(",")} | {"plain"}

    def modes_of(workload: str, engine: str) -> list[dict[str, Any]]:
        return [m for m in WORKLOADS[workload][engine] if wanted is None or m["name"] in wanted]

    engines = args.engines.split(",")
    if "llamacpp" in engines and not LLAMACPP_PYTHON.exists():
        raise SystemExit(
            f"llama-cpp-python is not installed at {LLAMACPP_PYTHON}; see this script's docstring"
        )
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="spec-vs-llamacpp-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    env = env_report(load=False)
    cpu = f"{env['cpu_model']}, ISA {env['isa']}"
    report: dict[str, Any] = {"cpu": cpu, "threads": args.threads, "workloads": {}}
    for workload in args.workloads.split(","):
        if workload == "code":
            if not (QWEN_TARGET.exists() and QWEN_DRAFT.exists()):
                raise SystemExit("the Qwen pair is missing: python benchmarks/fetch_qwen_pair.py")
            gguf, draft = QWEN_TARGET, QWEN_DRAFT
            prompts = code_prompts(ModelInfo(gguf).tokenizer, args.code_prompts)
            max_tokens = args.code_max_tokens
        elif workload == "chat":
            if not (QWEN_TARGET.exists() and QWEN_SKIP.exists()):
                raise SystemExit(
                    f"the chat workload needs {QWEN_TARGET} (benchmarks/fetch_qwen_pair.py) and {QWEN_SKIP} "
                    "(`tokenmill eval layerskip`, see this script's docstring)"
                )
            gguf, draft = QWEN_TARGET, None
            prompts = chat_prompts(ModelInfo(gguf).tokenizer)
            max_tokens = args.code_max_tokens
        else:
            gguf, draft = resolve_model(None).path, None
            prompts = grounded_prompts(ModelInfo(gguf).tokenizer)
            max_tokens = args.max_tokens
        spec = {
            "prompts": prompts, "max_tokens": max_tokens, "repeats": args.repeats, "threads": args.threads,
            "max_model_len": 2048, "draft_gguf": str(draft) if draft else None,
        }  # fmt: skip
        print(f"{workload}: {len(prompts)} prompts of {[len(q) for q in prompts]} tokens", file=sys.stderr)
        if args.batch > 1:
            engine_spec = dict(spec, modes=modes_of(workload, "tokenmill"), batch=args.batch)
            wa = worker_args(args.threads, Path(gguf), 3600)
            cells = {
                "tokenmill": summarise_batch(run_worker("tokenmill", engine_spec, wa, log_dir, worker="spec"))
            }
            report["workloads"][workload] = cells
            base = cells["tokenmill"]["plain"]["tok_s"]
            print(f"\n{workload} ({report['cpu']}, {args.threads} threads, batch {args.batch}, greedy):")
            for name, c in cells["tokenmill"].items():
                acc = "" if c["acceptance_rate"] is None else f"acceptance {c['acceptance_rate']:.2f}"
                print(f"tokenmill  {name:20} {c['tok_s']:8.1f} tok/s {c['tok_s'] / base:6.2f}x  {acc}")
            continue
        cells = {}
        for engine in engines:
            engine_spec = dict(spec, modes=modes_of(workload, engine))
            wa = worker_args(args.threads, Path(gguf), 3600)
            result = run_worker(engine, engine_spec, wa, log_dir, worker="spec")
            cells[engine] = summarise(result)
        report["workloads"][workload] = cells
        print(f"\n{workload} ({report['cpu']}, {args.threads} threads, batch 1, greedy):")
        print(
            f"{'engine':10} {'mode':20} {'decode tok/s':>12} {'vs plain':>9} {'e2e tok/s':>10} {'accept':>7} {'same':>5}"
        )
        for engine, modes in cells.items():
            base = modes["plain"]["decode_tok_s"]
            for name, c in modes.items():
                acc = "" if c["acceptance_rate"] is None else f"{c['acceptance_rate']:.2f}"
                print(
                    f"{engine:10} {name:20} {c['decode_tok_s']:12.1f} {c['decode_tok_s'] / base:8.2f}x "
                    f"{c['e2e_tok_s']:10.1f} {acc:>7} {str(c['same_as_plain']):>5}"
                )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"logs: {log_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
