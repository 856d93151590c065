"""llama.cpp's offline workloads through llama-cpp-python (run with /tmp/llamacpp-peer/bin/python; see
_common.py for the protocol and how each figure is measured).

Single stream (decode, prefill, and the offline "serial" mode): `Llama.eval` of the prompt, then one
`Llama.eval` per new token, greedy = argmax of the last logits.

Offline "batched" mode: the low-level API the way llama-server's continuous batching drives it: one
context with a unified KV cache and one sequence id per prompt; every step is one `llama_decode` of a
batch holding the next token of every decoding sequence first, then prompt tokens of waiting sequences up
to n_batch; greedy by argmax of each sequence's logits. Both use n_threads = n_threads_batch = threads and
flash attention on; n_batch 2048 and n_ubatch 512 (llama-server's defaults).
"""

from __future__ import annotations

import time
from typing import Any

from _common import load_spec, log, run_all, write_result

N_BATCH = 2048
N_UBATCH = 512


def round_up(x: int, m: int = 256) -> int:
    return (x + m - 1) // m * m


def main() -> None:
    spec, out_path = load_spec()
    import llama_cpp as lc
    import numpy as np
    from llama_cpp import Llama

    threads = spec["threads"]
    prompts = list(spec["warmup_prompts"]) + list(spec.get("offline", {}).get("warmup", []))
    for w in ("decode", "prefill", "offline"):
        for run in spec.get(w, {}).get("runs", []):
            prompts += run.values() if isinstance(run, dict) else run
    longest = max(len(p) for p in prompts)
    max_new = max([8] + [spec[w]["output_len"] for w in ("decode", "offline") if w in spec])
    start = time.perf_counter()
    llm = Llama(
        model_path=spec["gguf"],
        n_ctx=round_up(longest + max_new + 8),
        n_batch=N_BATCH,
        n_ubatch=N_UBATCH,
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=True,
        seed=0,
        verbose=False,
    )
    load_s = time.perf_counter() - start
    n_vocab = llm.n_vocab()
    log(f"llama.cpp {lc.__version__} loaded in {load_s:.1f} s, n_ctx {llm.n_ctx()}, {threads} threads")

    def argmax_ith(ctx: Any, i: int) -> int:
        return int(np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())

    def serial(prompts: list[list[int]], max_tokens: int) -> tuple[list[int], dict[str, Any]]:
        counts = []
        first = last = 0.0
        for p in prompts:
            llm.reset()
            llm.eval(p)
            tok = argmax_ith(llm.ctx, -1)
            out = [tok]
            first = time.perf_counter()
            while len(out) < max_tokens:
                llm.eval([tok])
                tok = argmax_ith(llm.ctx, -1)
                out.append(tok)
            last = time.perf_counter()
            counts.append(len(out))
        extra = {}
        if len(prompts) == 1 and max_tokens > 1:
            extra["decode_tok_s_internal"] = (max_tokens - 1) / (last - first)
        return counts, extra

    state: dict[str, Any] = {}

    def context_for(n_seqs: int, n_ctx: int) -> Any:
        if state.get("shape") != (n_seqs, n_ctx):
            if "ctx" in state:
                lc.llama_free(state.pop("ctx"))
            params = lc.llama_context_default_params()
            params.n_ctx = n_ctx
            params.n_batch = N_BATCH
            params.n_ubatch = N_UBATCH
            params.n_seq_max = n_seqs
            params.kv_unified = True
            params.n_threads = threads
            params.n_threads_batch = threads
            params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
            params.no_perf = True
            ctx = lc.llama_init_from_model(llm.model, params)
            if not ctx:
                raise RuntimeError(f"llama_init_from_model failed for {n_seqs} sequences, n_ctx {n_ctx}")
            state.update(ctx=ctx, shape=(n_seqs, n_ctx))
            if "batch" not in state:
                state["batch"] = lc.llama_batch_init(N_BATCH, 0, 1)
        return state["ctx"]

    def batched(prompts: list[list[int]], max_tokens: int) -> tuple[list[int], dict[str, Any]]:
        n_seqs = len(prompts)
        if n_seqs > lc.llama_max_parallel_sequences():
            raise RuntimeError(f"llama.cpp supports at most {lc.llama_max_parallel_sequences()} sequences")
        ctx = context_for(n_seqs, round_up(sum(len(p) + max_tokens for p in prompts)))
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        batch = state["batch"]
        gen: list[list[int]] = [[] for _ in prompts]
        fed = [0] * n_seqs  # prompt tokens already decoded
        steps = 0

        def add(k: int, token: int, pos: int, seq: int, logits: bool) -> None:
            batch.token[k] = token
            batch.pos[k] = pos
            batch.n_seq_id[k] = 1
            batch.seq_id[k][0] = seq
            batch.logits[k] = 1 if logits else 0

        while any(len(g) < max_tokens for g in gen):
            k = 0
            sample: list[tuple[int, int]] = []  # (sequence, batch index) whose logits give a token
            for s, p in enumerate(prompts):  # decoding sequences first, as llama-server does
                if fed[s] == len(p) and 0 < len(gen[s]) < max_tokens:
                    add(k, gen[s][-1], len(p) + len(gen[s]) - 1, s, True)
                    sample.append((s, k))
                    k += 1
            for s, p in enumerate(prompts):  # then prompt chunks of waiting sequences, up to n_batch
                if k >= N_BATCH:
                    break
                take = min(len(p) - fed[s], N_BATCH - k)
                for j in range(fed[s], fed[s] + take):
                    last = j == len(p) - 1
                    add(k, p[j], j, s, last)
                    if last:
                        sample.append((s, k))
                    k += 1
                fed[s] += take
            batch.n_tokens = k
            rc = lc.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} (batch of {k} tokens)")
            for s, i in sample:
                gen[s].append(argmax_ith(ctx, i))
            steps += 1
        return [len(g) for g in gen], {"decode_calls": steps}

    modes_available = {"batched": batched, "serial": serial}
    modes = {
        m: modes_available[m] for m in spec.get("offline", {}).get("llamacpp_modes", ["batched", "serial"])
    }
    info = {"load_s": load_s, "version": lc.__version__, "threads": threads, "flash_attn": True}
    write_result(out_path, run_all(spec, serial, offline_modes=modes, info=info))


if __name__ == "__main__":
    main()
