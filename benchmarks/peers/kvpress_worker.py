"""NVIDIA kvpress's presses on the harness's passkey prompts (run with /tmp/kvpress-peer/bin/python).

    PYTHON benchmarks/peers/kvpress_worker.py SPEC.json RESULT.json

The model is the same GGUF, loaded by transformers (`gguf_file=`, dequantized to fp32). Each prompt (token ids
built by tokenmill's harness, question included) is prefilled inside `with press(model)`, so the press
compresses the whole prompt, question and all (SnapKV's own setting, and tokenmill's: it compresses at the end
of the prompt), then `max_new_tokens` greedy tokens are decoded over the compressed cache with explicit
positions, as kvpress's pipeline decodes. One prompt at a time (kvpress's pipeline has no batching); wall time
per prompt covers prefill, compression and decode. Standard library, torch, transformers and kvpress only.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from _common import load_spec, log, write_result


def make_press(name: str, budget: float, window: int, kernel: int) -> Any:
    """kvpress's press for a policy name at a budget (kvpress takes the share to remove)."""
    from kvpress import ObservedAttentionPress, SnapKVPress, StreamingLLMPress

    ratio = 1.0 - budget
    if name == "snapkv":
        return SnapKVPress(compression_ratio=ratio, window_size=window, kernel_size=kernel)
    if name == "h2o":
        return ObservedAttentionPress(compression_ratio=ratio)
    if name == "streaming":
        return StreamingLLMPress(compression_ratio=ratio, n_sink=4)
    raise ValueError(f"no kvpress press for {name!r}")


def main() -> None:
    spec, out_path = load_spec()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    torch.set_num_threads(spec["threads"])
    folder, name = spec["gguf"].rsplit("/", 1)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    models: dict[str, Any] = {}

    def model_for(policy: str) -> Any:
        # ObservedAttentionPress (H2O) reads the attention weights: eager attention; the rest run on sdpa
        impl = "eager" if policy == "h2o" else "sdpa"
        if impl not in models:
            start = time.perf_counter()
            models[impl] = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch.float32, attn_implementation=impl
            ).eval()
            log(f"transformers ({impl}) loaded in {time.perf_counter() - start:.1f} s")
        return models[impl]

    @torch.inference_mode()
    def answer(model: Any, ids: list[int], press: Any) -> str:
        cache = DynamicCache()
        input_ids = torch.tensor([ids])
        if press is None:
            out = model(input_ids=input_ids, past_key_values=cache, logits_to_keep=1)
        else:
            with press(model):
                out = model(input_ids=input_ids, past_key_values=cache, logits_to_keep=1)
        generated = [int(out.logits[0, -1].argmax())]
        for i in range(spec["max_new_tokens"] - 1):
            out = model(
                input_ids=torch.tensor([[generated[-1]]]),
                past_key_values=cache,
                position_ids=torch.tensor([[len(ids) + i]]),
            )
            generated.append(int(out.logits[0, -1].argmax()))
            if generated[-1] == tokenizer.eos_token_id:
                break
        return tokenizer.decode(generated, skip_special_tokens=True)

    runs = []
    for policy in spec["policies"]:
        budgets = [None] if policy == "full" else spec["budgets"]
        for budget in budgets:
            model = model_for(policy)
            press = None if budget is None else make_press(policy, budget, spec["window"], spec["kernel"])
            answer(model, spec["prompts"][0]["ids"][:64], press)  # untimed warm-up
            outputs, seconds = [], []
            for p in spec["prompts"]:
                start = time.perf_counter()
                outputs.append(answer(model, p["ids"], press))
                seconds.append(time.perf_counter() - start)
            runs.append({"policy": policy, "budget": budget, "outputs": outputs, "seconds": seconds})
            log(f"{policy} {budget}: {sum(seconds) / len(seconds):.2f} s/prompt")
    write_result(out_path, {"engine": "kvpress", "torch_threads": spec["threads"], "runs": runs})


if __name__ == "__main__":
    sys.exit(main())
