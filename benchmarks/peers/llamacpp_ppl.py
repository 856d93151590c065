"""llama.cpp's side of benchmarks/kv_llamacpp_ppl.py (run with /tmp/llamacpp-peer/bin/python): perplexity of
the given token windows with each K/V cache type (f16, q8_0, q4_0), through llama-cpp-python.

Per window: a fresh state, `Llama.eval` of its tokens (n_ubatch 512, as tokenmill's 512-token chunks: later
chunks attend over the cache, quantized), and -log p of each target token from the logits before it.
Flash attention is on (llama.cpp needs it for a quantized V cache).
"""

from __future__ import annotations

import math
import time
from typing import Any

from _common import load_spec, log, write_result


def main() -> None:
    spec, out_path = load_spec()
    import llama_cpp as lc
    import numpy as np
    from llama_cpp import Llama

    types = {"f16": lc.GGML_TYPE_F16, "q8_0": lc.GGML_TYPE_Q8_0, "q4_0": lc.GGML_TYPE_Q4_0}
    tokens: list[int] = spec["tokens"]
    windows: list[list[int]] = spec["windows"]  # [begin, end, first_target]
    n_ctx = max(e - b for b, e, _ in windows)
    results: dict[str, Any] = {}
    for name in spec["kv_types"]:
        llm = Llama(
            model_path=spec["gguf"], n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=512, n_threads=spec["threads"],
            n_threads_batch=spec["threads"], flash_attn=True, logits_all=True, type_k=types[name],
            type_v=types[name], seed=0, verbose=False,
        )  # fmt: skip
        nll_sum, count = 0.0, 0
        start = time.perf_counter()
        for begin, end, first in windows:
            llm.reset()
            llm.eval(tokens[begin:end])
            logits = np.asarray(llm.scores[: end - begin], dtype=np.float64)
            rows = logits[first - 1 - begin : end - 1 - begin]
            top = rows.max(axis=1, keepdims=True)
            logz = top[:, 0] + np.log(np.exp(rows - top).sum(axis=1))
            targets = np.asarray(tokens[first:end])
            nll_sum += float((logz - rows[np.arange(len(targets)), targets]).sum())
            count += len(targets)
        seconds = time.perf_counter() - start
        results[name] = {"perplexity": math.exp(nll_sum / count), "scored": count, "seconds": seconds}
        log(f"{name}: perplexity {results[name]['perplexity']:.4f} over {count} tokens ({seconds:.1f} s)")
        del llm
    write_result(
        out_path, {"kv_types": results, "info": {"version": lc.__version__, "threads": spec["threads"]}}
    )


if __name__ == "__main__":
    main()
