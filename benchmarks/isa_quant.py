"""Decode GEMV microbenchmark of the quantized-linear kernels at each ISA level (issue 12).

Times `q4_linear` / `q8_linear` for SmolLM2-135M's shapes (hidden 576, intermediate 1536, 9 heads x 64,
3 KV heads: qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536, lm_head 49152x576 in q8) at a few
activation rows below the GEMM threshold, per level, and prints the median time per call. "cold" cycles
through copies of the weight totalling more than the L3 cache (as a decode step streams 30 layers), "hot"
reuses one copy (kernel compute alone).

    python benchmarks/isa_quant.py --levels avx2,avx512 --threads 1
    python benchmarks/isa_quant.py --levels avx512,avx512+f32 --rows 2,4,8,16,23 --threads 2
    python benchmarks/isa_quant.py --levels avx2,avx2+f32 --rows 2,3,4,5,8,16 --threads 2
    python benchmarks/isa_quant.py --levels avx2,avx2+i8 --rows 1,2,4,8 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from types import ModuleType

import torch

from tokenmill.layers.cpu_kernels import cpu_model, load_cpu_kernels
from tokenmill.layers.linear import GEMM_MIN_ROWS, GEMM_TILE_BYTES
from tokenmill.layers.quantization import dequantize, quantize

SHAPES = [  # name, N (out), K (in), format
    ("qkv", 960, 576, "q8"),
    ("o", 576, 576, "q8"),
    ("gate_up", 3072, 576, "q8"),
    ("down", 576, 1536, "q8"),
    ("lm_head", 49152, 576, "q8"),
    ("qkv", 960, 576, "q4"),
    ("o", 576, 576, "q4"),
    ("gate_up", 3072, 576, "q4"),
    ("down", 576, 1536, "q4"),
]
# Qwen2.5-Coder 1.5B (hidden 1536, intermediate 8960, 12 heads x 128, 2 KV heads) as tokenmill packs its
# Q4_K_M GGUF: Q4_K -> q4, Q6_K (ffn_down, the LM head) -> q8.
QWEN_SHAPES = [
    ("qkv", 2048, 1536, "q4"),
    ("o", 1536, 1536, "q4"),
    ("gate_up", 17920, 1536, "q4"),
    ("down", 1536, 8960, "q8"),
]
SHAPE_SETS = {"smollm": SHAPES, "qwen1.5b": QWEN_SHAPES}


@dataclass
class Variant:
    """A kernel level and its paths ("avx512+f32", "avx2+f32": the fp32 rows, at every row count; "avx2+i8":
    int8 activations (EngineConfig.activations="int8"); else int16 activations)."""

    kernels: ModuleType
    fp32_min_rows: int
    int8_activations: bool = False


def variant(label: str) -> Variant:
    level, _, path = label.partition("+")
    return Variant(load_cpu_kernels(level), 2 if path == "f32" else 0, path == "i8")


def call(v: Variant, w, x):
    """Always below the GEMM threshold: the GEMV paths."""
    k, rows = v.kernels, GEMM_MIN_ROWS
    if w.format == "q4":
        return k.q4_linear(
            x, w.codes, w.scales, w.mins, rows, GEMM_TILE_BYTES, v.fp32_min_rows, v.int8_activations
        )
    return k.q8_linear(x, w.codes, w.scales, rows, GEMM_TILE_BYTES, v.fp32_min_rows, v.int8_activations)


def time_rounds(
    modules: dict, weights: list, x: torch.Tensor, repeats: int, stat=statistics.median
) -> dict[str, float]:
    """Per module, `stat` (median; min is steadier on a busy machine) of the seconds of one call over `repeats` rounds (one call per weight copy each);
    the modules' rounds are interleaved so that load from other processes hits them alike."""
    times: dict[str, list[float]] = {label: [] for label in modules}
    for kernels in modules.values():
        for w in weights[:2]:
            call(kernels, w, x)
    for _ in range(repeats):
        for label, kernels in modules.items():
            t0 = time.perf_counter()
            for w in weights:
                call(kernels, w, x)
            times[label].append((time.perf_counter() - t0) / len(weights))
    return {label: stat(t) for label, t in times.items()}


def run(
    modules: dict, rows: list[int], repeats: int, cold_bytes: int, stat=statistics.median, shapes=SHAPES
) -> list[dict]:
    results = []
    g = torch.Generator().manual_seed(0)
    for name, n, k, fmt in shapes:
        w = quantize(torch.randn(n, k, generator=g) * 0.05, fmt)
        copies = max(1, -(-cold_bytes // w.nbytes()))
        cold = [w] + [quantize(torch.randn(n, k, generator=g) * 0.05, fmt) for _ in range(copies - 1)]
        for m in rows:
            x = torch.randn(m, k, generator=g)
            ref = x @ dequantize(w).T
            row = {"shape": f"{name} {n}x{k}", "fmt": fmt, "M": m}
            for label, kernels in modules.items():
                out = call(kernels, w, x)
                err = ((out - ref).abs().max() / ref.abs().max()).item()
                # int16 activations: a relative step of 3e-5; int8: 1/127 per block, errors average out
                assert err < (2e-2 if kernels.int8_activations else 1e-4), (label, name, fmt, m, err)
            hot = time_rounds(modules, [w] * max(1, min(16, len(cold))), x, repeats, stat)
            cold_t = time_rounds(modules, cold, x, max(5, repeats // 3), stat)
            for label in modules:
                row[f"{label} hot"], row[f"{label} cold"] = hot[label], cold_t[label]
            results.append(row)
            print(format_row(row, list(modules)), flush=True)
    return results


def format_header(labels: list[str]) -> str:
    cols = "".join(f" {label + ' hot':>12} {label + ' cold':>12}" for label in labels)
    ratio = f" {'hot x':>7} {'cold x':>7}" if len(labels) == 2 else ""
    return f"{'shape':<22} {'fmt':>3} {'M':>3}{cols}{ratio}   (us per call; x = first / second)"


def format_row(row: dict, labels: list[str]) -> str:
    cols = "".join(
        f" {row[label + ' hot'] * 1e6:12.1f} {row[label + ' cold'] * 1e6:12.1f}" for label in labels
    )
    ratio = ""
    if len(labels) == 2:
        a, b = labels
        ratio = f" {row[a + ' hot'] / row[b + ' hot']:7.2f} {row[a + ' cold'] / row[b + ' cold']:7.2f}"
    return f"{row['shape']:<22} {row['fmt']:>3} {row['M']:>3}{cols}{ratio}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--levels",
        default="avx2,avx512",
        help="ISA levels to compare; LEVEL+f32 takes the fp32 multi-row path (AVX-512; AVX2 for inputs up to 1,024 wide) (default: avx2,avx512)",
    )
    ap.add_argument("--rows", default="1,4,8", help="activation rows (default: 1,4,8)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    ap.add_argument("--repeats", type=int, default=41, help="timed rounds per case (default: 41)")
    ap.add_argument("--min", action="store_true", help="report the fastest round, not the median")
    ap.add_argument(
        "--shapes", choices=sorted(SHAPE_SETS), default="smollm", help="weight shapes (default: smollm)"
    )
    ap.add_argument("--cold-mib", type=int, default=96, help="bytes of weight copies for cold (default: 96)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    modules = {label: variant(label) for label in args.levels.split(",")}
    labels = list(modules)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; threads {args.threads}")
    print(format_header(labels))
    run(
        modules,
        [int(r) for r in args.rows.split(",")],
        args.repeats,
        args.cold_mib << 20,
        min if args.min else statistics.median,
        SHAPE_SETS[args.shapes],
    )


if __name__ == "__main__":
    main()
