"""`tokenmill eval layerskip`: search which layers a self-speculative draft should skip, and save the choice.

Loads the model as `generate`/`serve` would (the same engine options), scores layer subsets on a calibration
text (spec/layerskip.py: teacher-forced greedy agreement with the full model, weights read per draft pass,
the adaptive-length speedup model at batch 1) and writes a JSON file that
`--speculative-config '{"method": "layerskip", "skip_layers_file": "FILE"}'` reads.
"""

from __future__ import annotations

import argparse
import sys


def search_on_text(llm, text: str, num_tokens: int, **search_options):
    """search_skip_layers over the first `num_tokens` tokens of `text`, with `llm`'s model and KV layout."""
    from tokenmill.spec.layerskip import search_skip_layers

    engine = llm.engine
    tokens = engine.tokenizer.encode(text)[:num_tokens]
    return search_skip_layers(
        engine.runner.model, engine.kv_spec, tokens, engine.config.torch_device, **search_options
    )


def cmd_layerskip(args: argparse.Namespace) -> int:
    from tokenmill.engine_args import EngineArgs
    from tokenmill.entrypoints.llm import LLM

    if args.file is not None:
        with open(args.file, encoding="utf-8", errors="replace") as f:
            text = f.read()
    else:
        from tokenmill.bench.quality import reference_text

        text = reference_text()
    print("Loading model...", file=sys.stderr, flush=True)
    llm = LLM(**EngineArgs.from_cli_args(args).config_kwargs())
    result = search_on_text(
        llm,
        text,
        args.num_tokens,
        max_k=args.max_k,
        max_evals=args.max_evals,
        random_swaps=args.random_swaps,
        seed=args.search_seed,
    )
    result.save(args.output)
    print(
        f"skip layers {result.skip_layers} of {result.num_layers}: acceptance {result.acceptance:.3f} "
        f"(teacher-forced, {args.num_tokens} tokens at most), draft cost {result.draft_cost:.2f} of a full step, "
        f"k={result.best_k}, predicted speedup at batch 1 {result.predicted_speedup:.2f}x "
        f"({result.evaluations} subsets in {result.seconds:.1f} s) -> {args.output}"
    )
    return 0


def add_layerskip_parser(ev: argparse._SubParsersAction) -> None:
    from tokenmill.engine_args import EngineArgs

    p = ev.add_parser(
        "layerskip",
        help="search the layers a self-speculative draft skips; save them for --speculative-config",
        description="Greedy then random-swap search over layer subsets: each subset is scored by its "
        "teacher-forced greedy agreement with the full model on a calibration text (the acceptance rate of "
        "its drafts) and the share of weights it reads, through the adaptive-length speedup model at batch 1.",
    )
    p.add_argument("--file", default=None, help="calibration text (default: CPython's pydoc topics)")
    p.add_argument("--output", "-o", required=True, help="JSON file to write (skip_layers and the scores)")
    p.add_argument("--num-tokens", type=int, default=256, help="calibration tokens (default: 256)")
    p.add_argument("--max-k", type=int, default=8, help="largest k the speedup model considers (default: 8)")
    p.add_argument("--max-evals", type=int, default=200, help="subsets scored at most (default: 200)")
    p.add_argument("--random-swaps", type=int, default=20, help="random swap trials after the greedy pass")
    p.add_argument("--search-seed", type=int, default=0, help="seed of the random swaps (default: 0)")
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=cmd_layerskip)
