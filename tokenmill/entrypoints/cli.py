"""`tokenmill generate | chat | serve | bench` — the command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any

from tokenmill.engine_args import EngineArgs
from tokenmill.sampling_params import SamplingParams

DEFAULT_SERVE_SLO_TPOT = 0.2  # seconds: the serving benchmark's TPOT SLO, kept by the step budget
DEFAULT_SERVE_SLO_TTFT = 2.0  # seconds: its TTFT SLO, which may raise a step's budget above the TPOT one


# ---- shared options -------------------------------------------------------------------------------------
def add_sampling_options(p: argparse.ArgumentParser, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument(
        "--max-tokens", type=int, default=max_tokens, help=f"most new tokens (default: {max_tokens})"
    )
    g.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default: 0.7)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0, off)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default: 0, off)")
    g.add_argument(
        "--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability (default: 0)"
    )
    g.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="HF-style repetition penalty (default: 1.0)"
    )
    g.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI presence penalty (default: 0)")
    g.add_argument(
        "--frequency-penalty", type=float, default=0.0, help="OpenAI frequency penalty (default: 0)"
    )
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def load_llm(args: argparse.Namespace):
    from tokenmill.entrypoints.llm import LLM

    print("Loading model...", file=sys.stderr, flush=True)
    return LLM(**EngineArgs.from_cli_args(args).config_kwargs())


def stream(llm, prompt: Any, params: SamplingParams) -> Iterator[str]:
    """Yield text deltas of one request as the engine produces them."""
    engine = llm.engine
    request = engine.add_request(prompt, params)
    shown = 0
    try:
        while not request.finished:
            for out in engine.step():
                if out.request_id == request.request_id:
                    text = out.outputs[0].text
                    yield text[shown:]
                    shown = len(text)
    finally:
        if not request.finished:
            engine.abort_request(request.request_id)


# ---- commands -------------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    llm = load_llm(args)
    for delta in stream(llm, args.prompt, params):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    llm = load_llm(args)
    tok = llm.get_tokenizer()
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("Chatting with the model. /exit to leave, /reset to start over.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = {
            "prompt_token_ids": tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        }
        reply = []
        try:
            for delta in stream(llm, prompt, params):
                reply.append(delta)
                sys.stdout.write(delta)
                sys.stdout.flush()
        except ValueError as exc:  # e.g. the conversation outgrew the context
            print(f"error: {exc}", file=sys.stderr)
            messages.pop()
            continue
        except KeyboardInterrupt:
            pass
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    from tokenmill.bench.throughput import Workload, format_result, run_batch1, run_throughput, to_json

    llm = load_llm(args)
    if args.batch_1:
        result = run_batch1(llm, args.input_len or 128, args.output_len)
    else:
        workload = Workload(
            args.num_prompts, args.min_input_len, args.max_input_len, args.output_len, args.seed
        )
        result = run_throughput(llm, workload)
    print(format_result(result))
    if args.output_json:
        with open(args.output_json, "w") as f:
            f.write(to_json(result))
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from tokenmill.bench.serve import run_cli

    return run_cli(args)


def cmd_eval_quality(args: argparse.Namespace) -> int:
    from tokenmill.bench.quality import evaluate_formats, format_table, to_json

    formats = [f.strip() for f in args.weights.split(",") if f.strip()]
    results = evaluate_formats(args.model, formats, args.num_tokens, args.chunk)
    print(format_table(results, args.num_tokens, args.chunk))
    if args.output_json:
        with open(args.output_json, "w") as f:
            f.write(to_json(results))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tokenmill.entrypoints.openai.api_server import run_server

    return run_server(args)


# ---- parser ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="LLM inference and serving engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="complete one prompt, streaming the text")
    p.add_argument("prompt", help="the prompt text")
    EngineArgs.add_cli_args(p)
    add_sampling_options(p, max_tokens=128)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with the model's chat template")
    EngineArgs.add_cli_args(p)
    add_sampling_options(p, max_tokens=512)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /metrics)",
        description="Serve the model over an OpenAI-compatible HTTP API with continuous batching. "
        "SIGTERM stops admission, lets in-flight requests finish, and exits 0.",
    )
    EngineArgs.add_cli_args(
        p, positional_model=True, slo_tpot=DEFAULT_SERVE_SLO_TPOT, slo_ttft=DEFAULT_SERVE_SLO_TTFT
    )
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one (default: 8000)")
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish after SIGTERM (default: 30)",
    )
    g.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="(default: info)"
    )
    g.add_argument("--no-access-log", action="store_true", help="do not log every HTTP request")
    from tokenmill.entrypoints.openai.server_options import ServerOptions

    ServerOptions.add_cli_args(p)
    p.set_defaults(func=cmd_serve)

    ev = sub.add_parser("eval", help="quality evaluations").add_subparsers(dest="eval", required=True)
    p = ev.add_parser(
        "quality",
        help="perplexity and top-1 agreement of weight formats vs the fp32 path",
        description="Teacher-forced pass over a fixed text (CPython's pydoc topics) with the dense fp32 "
        "weights and with each format; prints perplexity and the share of positions whose top-1 token "
        "matches the fp32 path.",
    )
    p.add_argument("--model", "-m", default=None, help="alias, .gguf file or HF folder (default: embedded)")
    p.add_argument(
        "--weights", default="auto,q8,q4", help="formats to score, comma-separated (default: auto,q8,q4)"
    )
    p.add_argument("--num-tokens", type=int, default=2048, help="tokens of text to score (default: 2048)")
    p.add_argument(
        "--chunk",
        type=int,
        default=1,
        help="tokens per forward for the formats: 1 scores the decode kernels, 256 the prompt path (default: 1)",
    )
    p.add_argument("--output-json", default=None, help="also write the results as JSON to this file")
    p.set_defaults(func=cmd_eval_quality)
    from tokenmill.bench.evals import add_eval_parsers  # light: the engine loads when a command runs

    add_eval_parsers(ev)  # eval ppl | passkey | needle
    from tokenmill.bench.layerskip_search import add_layerskip_parser

    add_layerskip_parser(ev)  # eval layerskip

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("throughput", help="offline throughput on a fixed synthetic workload")
    EngineArgs.add_cli_args(p)
    p.add_argument("--num-prompts", type=int, default=64, help="requests in the workload (default: 64)")
    p.add_argument("--min-input-len", type=int, default=64, help="shortest prompt (default: 64)")
    p.add_argument("--max-input-len", type=int, default=512, help="longest prompt (default: 512)")
    p.add_argument("--input-len", type=int, default=None, help="prompt length for --batch-1 (default: 128)")
    p.add_argument("--output-len", type=int, default=128, help="new tokens per request (default: 128)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    p.add_argument("--batch-1", action="store_true", help="measure single-stream decode tok/s instead")
    p.add_argument("--output-json", default=None, help="also write the result as JSON to this file")
    p.set_defaults(func=cmd_bench_throughput)

    p = bench.add_parser(
        "serve",
        help="online serving benchmark against any OpenAI-compatible server",
        description="Stream requests to an OpenAI-compatible server and report TTFT, TPOT, ITL, E2E "
        "latency, throughput and goodput under SLOs, measured on the client. The random dataset uses "
        "/v1/completions, chat uses /v1/chat/completions.",
    )
    p.add_argument("--base-url", required=True, help="server address, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name to request (default: the first of /v1/models)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, default=None, help="Poisson arrivals/s; inf: all at once")
    load.add_argument("--concurrency", type=int, default=None, help="closed loop: requests in flight")
    load.add_argument("--sweep", default=None, help="request rates to run in turn, e.g. 1,2,4,inf")
    p.add_argument("--num-prompts", type=int, default=64, help="requests per run (default: 64)")
    p.add_argument("--dataset", choices=["random", "chat"], default="random", help="(default: random)")
    p.add_argument("--input-len", type=int, default=256, help="approximate prompt tokens (default: 256)")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens per request (default: 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="(default: 0, greedy)")
    p.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos: true")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="goodput's TTFT SLO, s (default: 2)")
    p.add_argument("--slo-tpot", type=float, default=0.2, help="goodput's TPOT SLO, s (default: 0.2)")
    p.add_argument("--seed", type=int, default=0, help="workload and arrival seed (default: 0)")
    p.add_argument("--warmups", type=int, default=1, help="untimed short requests first (default: 1)")
    p.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    p.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY if set)")
    p.add_argument("--output-json", default=None, help="write all results as JSON to this file")
    p.add_argument("--plot", default="bench_serve.png", help="PNG of a --sweep (default: bench_serve.png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench_serve)

    from tokenmill.entrypoints.env_info import add_env_parser

    add_env_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"tokenmill: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
