"""EngineArgs: the engine's command-line options, declared once for every command that loads a model
(`tokenmill generate | chat | serve | bench throughput`) and turned into an EngineConfig.

    parser = argparse.ArgumentParser(); EngineArgs.add_cli_args(parser)
    config = EngineArgs.from_cli_args(parser.parse_args()).to_engine_config()
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tokenmill.config import ACTIVATIONS, CPU_ISAS, KERNELS, KV_CACHE_DTYPES, EngineConfig, default_cpu_isa
from tokenmill.formats import WeightFormat

_MODEL_HELP = "a .gguf file, a Hugging Face folder, or an alias (default: the embedded SmolLM2-135M-Instruct)"


@dataclass
class EngineArgs:
    """EngineConfig's options as the command line gives them (defaults: EngineConfig's)."""

    model: str | None = EngineConfig.model
    dtype: str = EngineConfig.dtype
    weights: str = EngineConfig.weights.value
    device: str = EngineConfig.device
    kv_cache_memory: int | str = EngineConfig.kv_cache_memory
    block_size: int = EngineConfig.block_size
    max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens
    max_num_seqs: int = EngineConfig.max_num_seqs
    max_model_len: int | None = EngineConfig.max_model_len
    enable_prefix_caching: bool = EngineConfig.enable_prefix_caching
    threads: int | None = EngineConfig.threads
    kernels: str = EngineConfig.kernels
    cpu_isa: str = field(default_factory=default_cpu_isa)
    activations: str = EngineConfig.activations
    slo_tpot: float | None = EngineConfig.slo_tpot
    slo_ttft: float | None = EngineConfig.slo_ttft
    kv_cache_dtype: str = EngineConfig.kv_cache_dtype
    kivi_window: int = EngineConfig.kivi_window
    kivi_sinks: int = EngineConfig.kivi_sinks
    kv_policy: str = "full"
    speculative_config: str | None = None
    skip_layers: str | None = None

    @classmethod
    def add_cli_args(
        cls,
        parser: argparse.ArgumentParser,
        positional_model: bool = False,
        slo_tpot: float | None = None,
        slo_ttft: float | None = None,
    ) -> argparse.ArgumentParser:
        """Add the engine options (an "engine" group) to `parser`; `positional_model`: MODEL is a positional
        argument (`tokenmill serve MODEL`) instead of --model/-m. `slo_tpot`: the default TPOT target (the
        server keeps one, so its steps stay inside it; offline runs default to none: throughput first); `slo_ttft`
        likewise for the TTFT target."""
        d = cls()
        g = parser.add_argument_group("engine")
        if positional_model:
            g.add_argument("model", nargs="?", default=d.model, help=_MODEL_HELP)
        else:
            g.add_argument("--model", "-m", default=d.model, help=_MODEL_HELP)
        g.add_argument(
            "--dtype",
            default=d.dtype,
            help=f"weights/activations dtype: float32, bfloat16, float16 (default: {d.dtype})",
        )
        g.add_argument(
            "--weights",
            default=d.weights,
            choices=[f.value for f in WeightFormat],
            help="weight format: auto runs a GGUF's quantized weights natively on the CPU; dense dequantizes to "
            f"--dtype; q4/q8 convert every linear weight to 4/8-bit blocks (default: {d.weights})",
        )
        g.add_argument(
            "--device", default=d.device, help=f"torch device, e.g. cpu or cuda (default: {d.device})"
        )
        g.add_argument(
            "--kv-cache-memory",
            default=d.kv_cache_memory,
            help="bytes for the KV cache, e.g. 512MiB or 2GiB (default: 2GiB)",
        )
        g.add_argument(
            "--block-size",
            type=int,
            default=d.block_size,
            help=f"tokens per KV block (default: {d.block_size})",
        )
        g.add_argument(
            "--max-num-batched-tokens",
            type=int,
            default=d.max_num_batched_tokens,
            help=f"token budget of one step: prompt chunks + decodes (default: {d.max_num_batched_tokens})",
        )
        g.add_argument(
            "--max-num-seqs",
            type=int,
            default=d.max_num_seqs,
            help=f"sequences running at once (default: {d.max_num_seqs})",
        )
        g.add_argument(
            "--max-model-len", type=int, default=d.max_model_len, help="context length (default: the model's)"
        )
        g.add_argument(
            "--no-prefix-caching",
            dest="enable_prefix_caching",
            action="store_false",
            help="turn off automatic prefix caching",
        )
        g.add_argument("--threads", type=int, default=d.threads, help="CPU threads (default: physical cores)")
        g.add_argument(
            "--kernels",
            default=d.kernels,
            choices=KERNELS,
            help="implementation of the model's ops: torch, cpp (the C++ CPU kernels), or auto: cpp where it "
            f"builds, for float32 on the CPU (default: {d.kernels})",
        )
        g.add_argument(
            "--cpu-isa",
            default=d.cpu_isa,
            choices=CPU_ISAS,
            help="instruction set the C++ kernels are built for; auto: the best this CPU has "
            "(default: $TOKENMILL_CPU_ISA, else auto)",
        )
        g.add_argument(
            "--activations",
            default=d.activations,
            choices=ACTIVATIONS,
            help="how packed (q4/q8) linears round activations at decode: exact (int16 per block of 32; "
            "token-exact fp32 quality) or int8 (per block of 32, as llama.cpp: faster on AVX2, a small quality "
            "cost: compare with `tokenmill eval ppl --compare full,activations=int8`) "
            f"(default: {d.activations})",
        )
        g.add_argument(
            "--kv-cache-dtype",
            default=d.kv_cache_dtype,
            choices=KV_CACHE_DTYPES,
            help="how K/V are stored: auto (the activations' dtype), int8 (one scale per token and head), int4 "
            "(an fp16 scale and min per group of 32), kivi4/kivi2 (KIVI: keys per channel over each full block, "
            "values per token; each sequence's newest and first tokens in fp16, see --kivi-window/--kivi-sinks); quantized on write and attended from "
            "the packed blocks, so --kv-cache-memory holds ~3.8x (int8), ~6.4x (int4), ~5.6x (kivi4) or ~8.7x "
            f"(kivi2) the tokens of fp32 (default: {d.kv_cache_dtype})",
        )
        g.add_argument(
            "--kivi-window",
            type=int,
            default=d.kivi_window,
            help="kivi2/kivi4: each sequence's newest full tokens kept unquantized (fp16) besides the block being "
            f"filled (KIVI's residual window), rounded up to whole blocks; 0 seals every block as it fills "
            f"(default: {d.kivi_window})",
        )
        g.add_argument(
            "--kivi-sinks",
            type=int,
            default=d.kivi_sinks,
            help="kivi2/kivi4: each sequence's first tokens kept unquantized (fp16; attention sinks), rounded up "
            f"to whole blocks (default: {d.kivi_sinks})",
        )
        g.add_argument(
            "--kv-policy",
            default=d.kv_policy,
            help="default KV eviction policy of requests that name none (a request's kv_policy field overrides "
            "it): full, streaming:sinks=4,window=N, h2o:budget=B,recent=32, snapkv:budget=B,window=32,kernel=9,pool=max; "
            "B in tokens or as a fraction of the prompt (default: full)",
        )
        g.add_argument(
            "--speculative-config",
            default=d.speculative_config,
            help='speculative decoding as JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
            '"prompt_lookup_min": 2, "prompt_lookup_max": 5}\' (default: off)',
        )
        g.add_argument(
            "--skip-layers",
            default=d.skip_layers,
            help="lossy layer skipping: layers every token leaves out, e.g. 16,25, or the JSON file "
            "`tokenmill eval layerskip --output` writes; their K/V is not stored either (measure the quality "
            "cost with `tokenmill eval ppl --compare full,skip_layers=16/25`) (default: none)",
        )
        g.add_argument(
            "--slo-tpot",
            type=float,
            default=slo_tpot,
            help="target seconds per output token: each step carries at most as many tokens as its measured "
            "cost per token keeps inside it (Sarathi-Serve), never more than --max-num-batched-tokens "
            f"(default: {slo_tpot if slo_tpot is not None else 'none: always --max-num-batched-tokens'})",
        )
        g.add_argument(
            "--slo-ttft",
            type=float,
            default=slo_ttft,
            help="target seconds to first token: with --slo-tpot, a step carries more prompt tokens than the "
            "TPOT target allows when that lets waiting prompts still meet this deadline "
            f"(default: {slo_ttft if slo_ttft is not None else 'none'})",
        )
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        """The engine options of parsed arguments (other attributes of `args` are ignored)."""
        return cls(
            **{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        )

    def config_kwargs(self) -> dict[str, Any]:
        """The options as EngineConfig keyword arguments."""
        return dataclasses.asdict(self)

    def to_engine_config(self) -> EngineConfig:
        return EngineConfig(**self.config_kwargs())
