"""Offline throughput: a fixed synthetic workload through the engine, and single-stream decode speed."""

from __future__ import annotations

import json
import random
import resource
import time
from dataclasses import asdict, dataclass

from tokenmill.entrypoints.llm import LLM
from tokenmill.sampling_params import SamplingParams


@dataclass
class Workload:
    num_prompts: int = 64
    min_input_len: int = 64
    max_input_len: int = 512
    output_len: int = 128
    seed: int = 0

    def prompts(self, vocab_size: int) -> list[list[int]]:
        """Random token ids (avoiding the low ids where special tokens live), lengths uniform in range."""
        rng = random.Random(self.seed)
        return [
            [
                rng.randrange(100, vocab_size)
                for _ in range(rng.randint(self.min_input_len, self.max_input_len))
            ]
            for _ in range(self.num_prompts)
        ]


@dataclass
class ThroughputResult:
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    elapsed_s: float
    prompt_tok_s: float
    output_tok_s: float
    total_tok_s: float
    requests_s: float
    peak_rss_mib: float
    kv_format: str  # KV cache element format (fp32, int8, ...)
    kv_capacity_tokens: int  # tokens --kv-cache-memory holds in that format
    kv_peak_tokens: int  # most KV slots allocated at once during the run (whole blocks)
    kv_policy: str  # the engine's default eviction policy
    kv_evicted_tokens: int  # slots freed by eviction during the run
    spec_acceptance_rate: float  # speculative decoding: accepted / proposed drafts (0 when off)
    spec_mean_acceptance_length: float  # tokens per verification (0 when off)


@dataclass
class DecodeResult:
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    decode_tok_s: float  # tokens after the first, per second of decoding
    peak_rss_mib: float
    spec_acceptance_rate: float
    spec_mean_acceptance_length: float


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_throughput(llm: LLM, workload: Workload) -> ThroughputResult:
    prompts = workload.prompts(llm.engine.model_config.vocab_size)
    params = SamplingParams(max_tokens=workload.output_len, temperature=0, ignore_eos=True)
    llm.generate(prompts[0][:32], SamplingParams(max_tokens=4), use_tqdm=False)  # warm up
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    n_prompt = sum(len(p) for p in prompts)
    n_out = sum(len(o.token_ids) for o in outs)
    return ThroughputResult(
        num_requests=len(prompts),
        prompt_tokens=n_prompt,
        output_tokens=n_out,
        elapsed_s=elapsed,
        prompt_tok_s=n_prompt / elapsed,
        output_tok_s=n_out / elapsed,
        total_tok_s=(n_prompt + n_out) / elapsed,
        requests_s=len(prompts) / elapsed,
        peak_rss_mib=peak_rss_mib(),
        kv_format=llm.engine.kv_spec.format,
        kv_capacity_tokens=llm.engine.kv_capacity_tokens,
        kv_peak_tokens=llm.engine.block_manager.peak_used_blocks * llm.engine.config.block_size,
        kv_policy=str(llm.engine.config.kv_policy),
        kv_evicted_tokens=llm.engine.kv_compressor.stats.evicted_tokens,
        spec_acceptance_rate=llm.engine.spec_stats.acceptance_rate,
        spec_mean_acceptance_length=llm.engine.spec_stats.mean_acceptance_length,
    )


def run_batch1(llm: LLM, input_len: int = 128, output_len: int = 128, seed: int = 0) -> DecodeResult:
    rng = random.Random(seed)
    prompt = [rng.randrange(100, llm.engine.model_config.vocab_size) for _ in range(input_len)]
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    llm.generate({"prompt_token_ids": prompt[:16]}, SamplingParams(max_tokens=4), use_tqdm=False)  # warm up
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    m = out.metrics
    decode_time = m.finish_time - m.first_token_time
    return DecodeResult(
        prompt_tokens=input_len,
        output_tokens=len(out.token_ids),
        ttft_s=m.first_token_time - m.arrival_time,
        decode_tok_s=(len(out.token_ids) - 1) / decode_time,
        peak_rss_mib=peak_rss_mib(),
        spec_acceptance_rate=llm.engine.spec_stats.acceptance_rate,
        spec_mean_acceptance_length=llm.engine.spec_stats.mean_acceptance_length,
    )


def format_result(result: ThroughputResult | DecodeResult) -> str:
    rows = [
        f"{k:>16}: {v:.2f}" if isinstance(v, float) else f"{k:>16}: {v}" for k, v in asdict(result).items()
    ]
    return "\n".join(rows)


def to_json(result: ThroughputResult | DecodeResult) -> str:
    return json.dumps(asdict(result), indent=2)
