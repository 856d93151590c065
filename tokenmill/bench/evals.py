"""Shared parts of the quality evals (`tokenmill eval ppl | passkey | needle`): KV modes, engines per mode,
result files, and the command-line glue.

A *mode* is a string naming one engine configuration to evaluate; `--compare mode1,mode2,...` runs several
side by side. `kv_mode_overrides(mode)` turns it into EngineConfig keyword arguments laid over the engine
options of the command line (the same options as `generate`/`serve`):

    full, auto                         the engine as configured (no override)
    int8 int4 kivi2 kivi4 fp32 bf16    {"kv_cache_dtype": mode}
    streaming:sinks=4,window=N         {"kv_policy": mode}   (also h2o:..., snapkv:..., full:...)
    key=value                          {key: value}, any EngineConfig option: weights=q8, block_size=32
    a+b                                both: int8+streaming:sinks=4,window=256

An option the engine does not have yet fails with a clear message, never with made-up numbers.
"""

from __future__ import annotations

import argparse
from typing import Any

from tokenmill.bench.modes import (  # noqa: F401  (re-exported: the harness's public names)
    AS_CONFIGURED,
    KV_DTYPES,
    KV_POLICIES,
    UnsupportedModeError,
    default_modes,
    engine_summary,
    kv_mode_overrides,
    load_llm,
    mode_options,
    parse_floats,
    parse_ints,
    split_modes,
    write_json,
)


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    from tokenmill.engine_args import EngineArgs

    return EngineArgs.from_cli_args(args).config_kwargs()


def _common_options(p: argparse.ArgumentParser) -> None:
    from tokenmill.engine_args import EngineArgs

    EngineArgs.add_cli_args(p)
    g = p.add_argument_group("eval")
    g.add_argument(
        "--compare",
        action="append",
        default=None,
        help="modes to run side by side, comma-separated (repeatable): full (the engine as configured), "
        f"{'|'.join(KV_DTYPES)} (KV cache format), streaming:sinks=4,window=N | h2o:budget=B,recent=R | "
        "snapkv:... (KV policy), key=value for any engine option (weights=q8), a+b to combine "
        "(default: the engine as configured)",
    )
    g.add_argument("--output-json", default=None, help="also write the results as JSON to this file")
    g.add_argument("--plot", default=None, help="also draw the results into this PNG")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _retrieval_options(p: argparse.ArgumentParser, max_new_tokens: str) -> None:
    g = p.add_argument_group("grid")
    g.add_argument(
        "--lengths",
        default="512,1024,2048,4096",
        help="prompt lengths in tokens, capped at the model's context (default: 512,1024,2048,4096)",
    )
    g.add_argument(
        "--depths",
        default="0,0.25,0.5,0.75,1.0",
        help="where the fact goes, as a fraction of the filler before it (default: 0,0.25,0.5,0.75,1.0)",
    )
    g.add_argument("--samples", type=int, default=1, help="prompts per length x depth cell (default: 1)")
    g.add_argument("--seed", type=int, default=0, help="seed of the keys and filler offsets (default: 0)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template (default: raw)")
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"greedy tokens generated per prompt (default: {max_new_tokens})",
    )


def cmd_ppl(args: argparse.Namespace) -> int:
    from tokenmill.bench import ppl

    with open(args.file, encoding="utf-8", errors="replace") as f:
        text = f.read()
    options = _engine_options(args)
    results = ppl.evaluate_ppl(
        text,
        split_modes(args.compare) if args.compare else default_modes(options),
        window=args.window,
        stride=args.stride,
        num_tokens=args.num_tokens,
        chunk=args.chunk,
        engine_options=options,
        progress=not args.no_progress,
    )
    print(ppl.format_table(results, args.file, engine_summary(options)))
    settings = {"file": args.file, "engine": options, "chunk": args.chunk}
    if args.output_json:
        write_json(args.output_json, "ppl", settings, results)
    if args.plot:
        from tokenmill.bench.plots import plot_ppl

        plot_ppl(results, args.plot, title=f"perplexity of {args.file}")
    return 0


def _cmd_retrieval(args: argparse.Namespace, task: str) -> int:
    from tokenmill.bench import retrieval

    options = _engine_options(args)
    results = retrieval.evaluate_retrieval(
        task,
        split_modes(args.compare) if args.compare else default_modes(options),
        lengths=parse_ints(args.lengths),
        depths=parse_floats(args.depths),
        samples=args.samples,
        seed=args.seed,
        chat=args.chat,
        max_new_tokens=args.max_new_tokens,
        engine_options=options,
        progress=not args.no_progress,
    )
    print(retrieval.format_table(results, engine_summary(options)))
    settings = {"engine": options, "chat": args.chat, "seed": args.seed, "samples": args.samples}
    if args.output_json:
        write_json(args.output_json, task, settings, results)
    if args.plot:
        from tokenmill.bench.plots import plot_retrieval

        plot_retrieval(results, args.plot)
    return 0


def cmd_passkey(args: argparse.Namespace) -> int:
    return _cmd_retrieval(args, "passkey")


def cmd_needle(args: argparse.Namespace) -> int:
    return _cmd_retrieval(args, "needle")


def add_eval_parsers(ev: argparse._SubParsersAction) -> None:
    """`eval ppl | passkey | needle` under the `eval` subcommand."""
    p = ev.add_parser(
        "ppl",
        help="perplexity of a text file through the engine, per KV mode",
        description="Teacher-forced perplexity over FILE, window by window, each window one sequence through "
        "the engine (its KV cache format and policy apply). Disjoint windows by default; --stride S slides "
        "them (each window scores only the tokens the previous one did not, as in HF's perplexity guide). "
        "--chunk N runs a window as a prompt, N tokens per forward (fast); --chunk 1 feeds it token by token "
        "as decodes, the path where KV policies evict and quantized caches are read back: policies act at "
        "prefill end and during decode, so only --chunk 1 measures them.",
    )
    p.add_argument("file", help="a UTF-8 text file")
    g = p.add_argument_group("windows")
    g.add_argument("--window", type=int, default=1024, help="tokens per window (default: 1024)")
    g.add_argument("--stride", type=int, default=None, help="sliding windows: start one every S tokens")
    g.add_argument("--num-tokens", type=int, default=None, help="score only the first N tokens of the text")
    g.add_argument(
        "--chunk",
        type=int,
        default=512,
        help="tokens per forward (the step's token budget); 1: decode path, one token per step (default: 512)",
    )
    _common_options(p)
    p.set_defaults(func=cmd_ppl)

    p = ev.add_parser(
        "passkey",
        help="passkey retrieval accuracy by prompt length and depth, per KV mode",
        description="A random 5-digit pass key hidden at each depth of repeated filler text of each length; "
        "greedy answer; correct if the key's digits appear in it. Prints accuracy by length x depth.",
    )
    _retrieval_options(p, max_new_tokens="8, or 16 with --chat: the model then answers in its own words")
    _common_options(p)
    p.set_defaults(func=cmd_passkey)

    p = ev.add_parser(
        "needle",
        help="needle-in-a-haystack accuracy by prompt length and depth, per KV mode",
        description="A needle sentence (the best thing to do in San Francisco) at each depth of real prose "
        "(CPython's pydoc topics) of each length; greedy answer scored by keywords (Dolores Park, "
        "sandwich). Prints accuracy by length x depth.",
    )
    _retrieval_options(p, max_new_tokens="24")
    _common_options(p)
    p.set_defaults(func=cmd_needle)
