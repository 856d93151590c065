"""Decode attention microbenchmark: the C++ paged_attention kernel on SmolLM2-135M's head shapes (9 query heads,
3 KV heads, head_dim 64, blocks of 16) for fp32, int8 and int4 caches, one query per row, at a few batch sizes and
context lengths. Median microseconds per call over 30 calls (one layer's attention).

    python benchmarks/attention_decode.py [--threads 2] [--batch 1,16] [--lengths 650,2000]

To compare two builds (e.g. before and after a kernel change), run it on each checkout back to back.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokenmill.kv.cache import int4_groups, quantize_int4, quantize_int8
from tokenmill.layers.cpu_kernels import cpu_model, load_cpu_kernels


def time_call(fn, repeats: int = 30) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--lengths", default="650,2000")
    ap.add_argument("--isa", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernels = load_cpu_kernels(args.isa)
    if kernels is None:
        raise SystemExit("the C++ kernels could not be built here")
    heads, kv_heads, dim, block = 9, 3, 64, 16
    print(f"CPU: {cpu_model()}; kernels {kernels.cpu_isa()}; threads {args.threads}")
    print(f"{'rows':>5} {'context':>8} {'fp32 us':>10} {'int8 us':>10} {'int4 us':>10}")
    g = torch.Generator().manual_seed(0)
    for rows in (int(b) for b in args.batch.split(",")):
        for length in (int(n) for n in args.lengths.split(",")):
            blocks = -(-length // block)
            k = torch.randn(rows * blocks, kv_heads, block, dim, generator=g)
            v = torch.randn(rows * blocks, kv_heads, block, dim, generator=g)
            (k8, ks), (v8, vs) = quantize_int8(k), quantize_int8(v)
            (k4, ks4), (v4, vs4) = quantize_int4(k, int4_groups(dim)), quantize_int4(v, int4_groups(dim))
            tables = torch.randperm(rows * blocks, generator=g).view(rows, blocks)  # scattered blocks
            lens, qsl = torch.full((rows,), length), torch.arange(rows + 1)
            q = torch.randn(rows, heads, dim, generator=g)
            cells = []
            for cache in ((k, v, None, None), (k8, v8, ks, vs), (k4, v4, ks4, vs4)):
                args_ = (q, *cache, tables, lens, qsl, dim**-0.5, False, None, None)
                cells.append(time_call(lambda a=args_: kernels.paged_attention(*a)))
            print(f"{rows:5d} {length:8d} " + " ".join(f"{c * 1e6:10.1f}" for c in cells))


if __name__ == "__main__":
    main()
