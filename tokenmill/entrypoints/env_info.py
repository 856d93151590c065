"""`tokenmill env`: versions, the CPU, and which C++ kernel build this machine runs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from typing import Any


def env_report(isa: str = "auto", load: bool = True) -> dict[str, Any]:
    import torch

    import tokenmill
    from tokenmill.config import physical_cores
    from tokenmill.layers.cpu_kernels import cpu_vendor, kernel_info
    from tokenmill.layers.linear import plan_for

    info = kernel_info(isa, load=load)
    plan = plan_for(info["isa"], cpu_vendor()) if info["isa"] else None
    return {
        "tokenmill": tokenmill.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        **info,
        "cpu_vendor": cpu_vendor(),
        "linear_plan": None if plan is None else dataclasses.asdict(plan),
        "threads_default": physical_cores(),
        "torch_threads": torch.get_num_threads(),
    }


def _plan_line(plan: dict[str, Any] | None) -> str:
    if plan is None:
        return "-"
    rows, f32 = plan["gemm_min_rows"], plan["fp32_min_rows"]
    if not f32:
        few = f"2-{rows - 1} rows: int16 dot products"
    elif f32 <= 2:
        few = f"2-{rows - 1} rows: fp32 rows"
    else:
        few = f"2-{f32 - 1} rows: int16 dot products; {f32}-{rows - 1} rows: fp32 rows (inputs <= 1,024 wide on AVX2)"
    return (
        f"1 row: int16 GEMV; {few}; {rows}+ rows: tile decode + GEMM (w8a8: int8 GEMM); "
        "--activations int8: int8 dot products"
    )


def _attention_line(isa: str | None) -> str:
    """Which decode attention kernel the level runs (layers/csrc/split_kv_attention.cpp vs the generic one)."""
    if isa is None:
        return "-"
    if isa == "portable":
        return "generic paged kernel (one task per sequence and KV head)"
    return "split-KV paged kernel for fp32/int8/int4 caches (chunks of a sequence's keys across threads); KIVI: its own"


def format_report(r: dict[str, Any]) -> str:
    flags = r["cpu_flags"]
    if r["kernels_loaded"] is None:
        kernels = f"{r['build_name']} (not loaded: --no-build)"
    elif r["kernels_loaded"]:
        kernels = f"{r['build_name']} (loaded)"
    else:
        kernels = f"not available: {r['error']} (the torch path runs)"
    rows = [
        ("tokenmill", r["tokenmill"]),
        ("torch", r["torch"]),
        ("python", r["python"]),
        ("cpu", f"{r['cpu_model']} ({r['machine']})"),
        (
            "cpu flags",
            "unknown (no /proc/cpuinfo)" if flags is None else " ".join(flags) or "none of interest",
        ),
        ("torch capability", r["torch_capability"]),
        (
            "kernel isa",
            f"{r['isa'] or '-'} (asked: {r['requested_isa']}; detected: {r['detected_isa']}; "
            f"this CPU runs: {', '.join(r['supported_isas'])})",
        ),
        ("kernels", kernels),
        ("packed linears", _plan_line(r["linear_plan"])),
        ("decode attention", _attention_line(r["isa"])),
        (
            "threads",
            f"{r['threads_default']} by default (physical cores); torch now uses {r['torch_threads']}",
        ),
    ]
    return "\n".join(f"{k:>16}: {v}" for k, v in rows)


def add_env_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "env",
        help="versions, CPU features and the C++ kernel build this machine runs",
        description="Print tokenmill's and torch's versions, the CPU and its relevant instruction-set flags, "
        "torch's CPU capability, the kernel ISA level picked, and whether the C++ kernels build and load "
        "(building them if they are not cached yet).",
    )
    p.add_argument(
        "--cpu-isa",
        default="auto",
        help="kernel level to check: auto, portable, avx2, avx512 (default: auto, the detected level)",
    )
    p.add_argument("--no-build", action="store_true", help="do not build or load the kernels")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_env)


def cmd_env(args: argparse.Namespace) -> int:
    report = env_report(args.cpu_isa, load=not args.no_build)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if report["error"] is not None and not report["kernels_loaded"]:
        print(f"tokenmill: warning: {report['error']}", file=sys.stderr)
        return 1
    return 0
