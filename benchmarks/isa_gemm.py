"""fp32 vs bf16 `F.linear` for SmolLM2-135M's shapes (issue 12: per-shape bf16 dispatch).

For each weight shape and activation row count M, times y = F.linear(x, W) in fp32 against the bf16 route
the fp32 model would take: W converted to bf16 once, up front; x cast to bf16 and y cast back to fp32 on
every call (both casts are timed). The rounds of the two routes are interleaved and the median is printed;
bf16's relative error against fp32 is shown too. On a CPU with avx512_bf16 (or AMX), oneDNN runs the bf16
GEMM with native bf16 dot products; without them torch emulates bf16 and is expected to lose.

    python benchmarks/isa_gemm.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from tokenmill.layers.cpu_kernels import cpu_flags, cpu_model

SHAPES = [  # name, N (out features), K (in features)
    ("qkv", 960, 576),
    ("o", 576, 576),
    ("gate_up", 3072, 576),
    ("down", 576, 1536),
    ("lm_head", 49152, 576),
]


def fp32_route(x, w):
    return F.linear(x, w)


def bf16_route(x, w_bf16):
    return F.linear(x.to(torch.bfloat16), w_bf16).float()


def bench(fns: dict, repeats: int, min_seconds: float) -> dict[str, float]:
    for fn in fns.values():  # warm up, and size the inner loop to about min_seconds
        fn()
    t0 = time.perf_counter()
    fns["fp32"]()
    inner = max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-7)))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,16,64,256,512", help="activation rows M (default: 1,16,64,256,512)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds per case (default: 15)")
    ap.add_argument("--min-ms", type=float, default=20.0, help="length of one round, ms (default: 20)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    flags = cpu_flags() or frozenset()
    print(
        f"CPU: {cpu_model()}; bf16 flags: {' '.join(sorted(f for f in flags if 'bf16' in f or 'amx' in f)) or 'none'}; "
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}); threads {torch.get_num_threads()}"
    )
    print(f"{'shape':<20} {'M':>4} {'fp32 us':>10} {'bf16 us':>10} {'bf16 speedup':>13} {'bf16 rel err':>13}")
    g = torch.Generator().manual_seed(0)
    for name, n, k in SHAPES:
        w = torch.randn(n, k, generator=g) / k**0.5
        w_bf16 = w.to(torch.bfloat16)
        for m in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(m, k, generator=g)
            ref = fp32_route(x, w)
            err = ((bf16_route(x, w_bf16) - ref).norm() / ref.norm()).item()
            t = bench(
                {"fp32": lambda x=x, w=w: fp32_route(x, w), "bf16": lambda x=x, w=w_bf16: bf16_route(x, w)},
                args.repeats,
                args.min_ms / 1000,
            )
            print(
                f"{name + f' {n}x{k}':<20} {m:>4} {t['fp32'] * 1e6:10.1f} {t['bf16'] * 1e6:10.1f} "
                f"{t['fp32'] / t['bf16']:12.2f}x {err:13.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
