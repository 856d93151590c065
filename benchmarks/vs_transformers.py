"""tokenmill vs transformers' `generate`, same model, same workload, one process run, ratio table.

    .venv/bin/python benchmarks/vs_transformers.py            # full workload (several minutes)
    .venv/bin/python benchmarks/vs_transformers.py --quick    # 16 prompts, 32 new tokens

Workload (as `tokenmill bench throughput`): 64 requests, prompt lengths uniform in [64, 512], 128 new
tokens each, greedy, EOS ignored. transformers runs left-padded batches of 16 (its best batched setting
here); batch-1 decode is a 128-token prompt plus 128 new tokens. Both in fp32 on the same GGUF weights.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def transformers_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


@torch.inference_mode()
def hf_throughput(model, prompts: list[list[int]], output_len: int, batch_size: int, pad_id: int) -> dict:
    start = time.perf_counter()
    n_out = 0
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
            pad_token_id=pad_id,
        )
        n_out += (out.shape[1] - width) * len(batch)
    elapsed = time.perf_counter() - start
    n_prompt = sum(len(p) for p in prompts)
    return {
        "elapsed_s": elapsed,
        "output_tok_s": n_out / elapsed,
        "total_tok_s": (n_prompt + n_out) / elapsed,
        "prompt_tok_s": n_prompt / elapsed,
    }


@torch.inference_mode()
def hf_batch1(model, prompt: list[int], output_len: int) -> dict:
    ids = torch.tensor([prompt])
    model.generate(input_ids=ids[:, :16], max_new_tokens=4, do_sample=False)  # warm up
    t0 = time.perf_counter()
    model.generate(input_ids=ids, max_new_tokens=1, do_sample=False)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.generate(input_ids=ids, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False)
    total = time.perf_counter() - t0
    return {"ttft_s": ttft, "decode_tok_s": (output_len - 1) / (total - ttft)}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a small workload for a smoke run")
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from tokenmill import LLM
    from tokenmill.bench.throughput import Workload, run_batch1, run_throughput
    from tokenmill.models.source import default_model_path

    workload = Workload(num_prompts=16, output_len=32) if args.quick else Workload()
    out_len_b1 = 32 if args.quick else 128
    results: dict[str, dict] = {}

    llm = LLM(dtype="float32")
    prompts = workload.prompts(llm.engine.model_config.vocab_size)
    results["tokenmill_throughput"] = vars(run_throughput(llm, workload))
    results["tokenmill_batch1"] = vars(run_batch1(llm, 128, out_len_b1))
    del llm
    gc.collect()

    model = transformers_model(default_model_path())
    results["transformers_throughput"] = hf_throughput(
        model, prompts, workload.output_len, args.hf_batch_size, 2
    )
    b1_prompt = prompts[0][:128] if len(prompts[0]) >= 128 else (prompts[0] * 3)[:128]
    results["transformers_batch1"] = hf_batch1(model, b1_prompt, out_len_b1)

    tm, hf = results["tokenmill_throughput"], results["transformers_throughput"]
    tb, hb = results["tokenmill_batch1"], results["transformers_batch1"]
    rows = [
        ("offline output tok/s", tm["output_tok_s"], hf["output_tok_s"]),
        ("offline total tok/s", tm["total_tok_s"], hf["total_tok_s"]),
        ("offline wall s (lower is better)", tm["elapsed_s"], hf["elapsed_s"]),
        ("batch-1 decode tok/s", tb["decode_tok_s"], hb["decode_tok_s"]),
        ("batch-1 TTFT s (lower is better)", tb["ttft_s"], hb["ttft_s"]),
    ]
    print(
        f"\nworkload: {workload}; transformers batch size {args.hf_batch_size}; fp32; {torch.get_num_threads()} threads"
    )
    print("| metric | tokenmill | transformers | ratio |\n|---|---:|---:|---:|")
    for name, a, b in rows:
        print(f"| {name} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
