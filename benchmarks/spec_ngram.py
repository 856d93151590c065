"""Run: python benchmarks/spec_ngram.py.  Batch-1 prompt lookup vs plain decoding on input-grounded prompts (default model, greedy)."""

import statistics

from tokenmill import LLM, SamplingParams

code = open(__import__("tokenmill.engine.block_manager", fromlist=["x"]).__file__).read()[2000:4200]
prompts = [
    "Repeat the following code exactly, then stop.\n\n" + code + "\n\nRepeated code:\n",
    "Rewrite this code with better names:\ndef f(a, b):\n    c = a + b\n    d = c * 2\n    return d\n\ndef g(x):\n    y = f(x, x)\n    return y + 1\n",
]
params = SamplingParams(max_tokens=128, temperature=0)
for name, spec in [("plain", None), ("ngram k=4", {"method": "ngram", "num_speculative_tokens": 4})]:
    llm = LLM(kv_cache_memory="512MiB", speculative_config=spec, enable_prefix_caching=False)
    llm.generate(["warm up"], SamplingParams(max_tokens=4), use_tqdm=False)
    rates = []
    for p in prompts:
        for _ in range(3):
            out = llm.generate([p], params, use_tqdm=False)[0]
            m = out.metrics
            rates.append((len(out.outputs[0].token_ids) - 1) / (m.finish_time - m.first_token_time))
    s = llm.engine.spec_stats
    print(
        f"{name}: decode tok/s per run {[round(r, 1) for r in rates]}; medians per prompt "
        f"{[round(statistics.median(rates[i * 3 : (i + 1) * 3]), 1) for i in range(len(prompts))]}; "
        f"acceptance {s.acceptance_rate:.2f}, mean acceptance length {s.mean_acceptance_length:.2f}"
    )
