"""llama.cpp's side of benchmarks/spec_vs_llamacpp.py, through llama-cpp-python (run with
/tmp/llamacpp-peer/bin/python): greedy `Llama.generate` of each prompt alone, per mode:

* plain: no draft model.
* prompt_lookup: llama-cpp-python's `LlamaPromptLookupDecoding(max_ngram_size, num_pred_tokens)`.
* draft: a second GGUF drafting `num_pred_tokens` greedy tokens per step (`DraftLlama` below: llama-cpp-python
  ships the draft-model hook, `LlamaDraftModel`, but prompt lookup as its only implementation; this one keeps
  the draft's KV cache across calls and re-evaluates only what changed, as llama.cpp's `llama-speculative`
  does).

The target verifies with llama-cpp-python's own loop (logits of every drafted position, greedy sampler, the
first mismatch truncates its KV cache). Timing as tokenmill_spec.py: the time of a
generate until the end-of-generation token or max_tokens, and the time from its first token to its last
(decode); the state is reset before each run (no reuse).
Threads: n_threads = n_threads_batch = spec threads; flash attention on.
"""

from __future__ import annotations

import time
from typing import Any

from _common import load_spec, single_run, write_result


def generate(llm: Any, prompt: list[int], max_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens of `prompt` from a reset state, up to the end-of-generation token or max_tokens, and
    the seconds from the first token to the last."""
    import llama_cpp as lc

    llm.reset()
    out: list[int] = []
    first = last = 0.0
    for tok in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        last = time.perf_counter()
        first = first or last
        out.append(int(tok))
        if lc.llama_vocab_is_eog(llm._model.vocab, tok) or len(out) >= max_tokens:
            break
    return out, last - first


def main() -> None:
    spec, out_path = load_spec()
    import llama_cpp as lc
    import numpy as np
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaDraftModel, LlamaPromptLookupDecoding

    threads = spec["threads"]
    prompts: list[list[int]] = spec["prompts"]
    n_ctx = spec["max_model_len"]

    def load(path: str, logits_all: bool = False, draft: Any = None) -> Any:
        return Llama(
            model_path=path, n_ctx=n_ctx, n_batch=2048, n_ubatch=512, n_threads=threads, n_threads_batch=threads,
            flash_attn=True, seed=0, verbose=False, logits_all=logits_all, draft_model=draft,
        )  # fmt: skip

    class DraftLlama(LlamaDraftModel):
        """k greedy tokens of a smaller model over its own context, keeping the prefix it already holds."""

        def __init__(self, llm: Any, k: int):
            self.llm, self.k = llm, k
            self.n_vocab = llm.n_vocab()
            self.passes = 0

        def argmax(self) -> int:
            return int(
                np.ctypeslib.as_array(
                    lc.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,)
                ).argmax()
            )

        def __call__(self, input_ids: Any, /, **kwargs: Any) -> Any:
            ids = input_ids.tolist()
            llm = self.llm
            held = llm.input_ids[: llm.n_tokens].tolist()
            n, limit = 0, min(len(held), len(ids) - 1)  # re-evaluate at least one token: fresh logits
            while n < limit and held[n] == ids[n]:
                n += 1
            llm.n_tokens = n  # eval drops the draft's K/V past n
            llm.eval(ids[n:])
            out = [self.argmax()]
            while len(out) < self.k:
                llm.eval([out[-1]])
                out.append(self.argmax())
            self.passes += 1
            return np.array(out, dtype=np.intc)

    results: dict[str, Any] = {}
    for mode in spec["modes"]:
        name, kind = mode["name"], mode["kind"]
        start = time.perf_counter()
        drafter = None
        if kind == "prompt_lookup":
            drafter = LlamaPromptLookupDecoding(mode["max_ngram_size"], mode["num_pred_tokens"])
        elif kind == "draft":
            drafter = DraftLlama(load(spec["draft_gguf"]), mode["num_pred_tokens"])
        llm = load(spec["gguf"], logits_all=drafter is not None, draft=drafter)
        load_s = time.perf_counter() - start

        generate(llm, prompts[0], 8)  # warm up
        runs = []
        for repeat in range(spec["repeats"]):
            for i, p in enumerate(prompts):
                t = time.perf_counter()
                out, decode_s = generate(llm, p, spec["max_tokens"])
                tn = time.perf_counter() - t
                runs.append(single_run(name, i, repeat, tn, decode_s, out))
        results[name] = {"load_s": load_s, "runs": runs}
        del llm, drafter
    info = {"version": lc.__version__, "threads": threads, "flash_attn": True}
    write_result(out_path, {"modes": results, "info": info})


if __name__ == "__main__":
    main()
