"""Engine-wide options: what model, where it runs, and how much memory and work a step may take."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenmill.formats import ACTIVATIONS, WeightFormat
from tokenmill.kv.policy import KVPolicy, parse_kv_policy
from tokenmill.spec.config import SpeculativeConfig, parse_skip_layers

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# KIVI's full-precision tokens per sequence (EngineConfig.kivi_window / kivi_sinks; chosen in README "KIVI window")
KIVI_WINDOW = 64
KIVI_SINKS = 16
DEFAULT_KV_CACHE_MEMORY = 2 * 1024**3  # bytes; ~46k tokens of SmolLM2-135M KV in fp32
KV_CACHE_DTYPES = (
    "auto",
    "int8",
    "int4",
    "kivi2",
    "kivi4",
)  # kv/cache.py implements them; listed here so config imports no layer
KERNELS = ("auto", "torch", "cpp")  # which implementation of the model's ops runs
CPU_ISAS = ("auto", "portable", "avx2", "avx512")  # which instruction set the C++ kernels are built for


def default_cpu_isa() -> str:
    """$TOKENMILL_CPU_ISA, or auto."""
    return os.environ.get("TOKENMILL_CPU_ISA", "auto")


def physical_cores() -> int:
    """Cores (not hyper-threads) this process may run on: the default thread count, since two threads on
    one core's siblings only contend for its vector units."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(set(_DTYPES))}, got {dtype!r}") from None


def parse_memory(value: int | str) -> int:
    """Accept bytes as an int or a string such as '512MiB', '2GiB', '1.5GB'."""
    if isinstance(value, int):
        return value
    text = value.strip().lower().replace(" ", "")
    units = {
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "k": 2**10,
        "m": 2**20,
        "g": 2**30,
        "b": 1,
    }
    for suffix, scale in units.items():
        if text.endswith(suffix):
            try:
                return int(float(text[: -len(suffix)]) * scale)
            except ValueError:
                break
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"kv_cache_memory must be bytes or a size like '2GiB', got {value!r}") from None


@dataclass
class EngineConfig:
    """Options of one engine. Validated in __post_init__ so a bad option fails before the model loads."""

    model: str | None = None  # alias, .gguf path or HF folder; None: the embedded default model
    dtype: str | torch.dtype = "float32"
    weights: WeightFormat | str = WeightFormat.AUTO  # auto | dense | q4 | q8: see formats.WeightFormat
    device: str | torch.device = "cpu"
    kv_cache_memory: int | str = DEFAULT_KV_CACHE_MEMORY  # bytes for K and V of all layers
    block_size: int = 16  # tokens per KV block
    max_num_batched_tokens: int = 2048  # token budget per step (prompt chunks + decodes)
    max_num_seqs: int = 128  # sequences running at once
    max_model_len: int | None = None  # default: the model's context length
    enable_prefix_caching: bool = True
    seed: int = 0  # seeds generators of requests that give no seed
    threads: int | None = None  # CPU threads for torch and the kernels; None: the physical cores
    # Which implementation of the model's ops runs: torch, the C++ CPU kernels, or auto (cpp where it builds,
    # for fp32 on the CPU; torch elsewhere).
    kernels: str = "auto"
    # The instruction set the C++ kernels are built for; auto: the best this CPU has.
    cpu_isa: str = field(default_factory=default_cpu_isa)
    # Packed weights' few-row (decode) dot products: "exact" keeps activations at int16 per block of 32 (fp32
    # quality, token-exact against the oracle); "int8" rounds them to int8 per block, as llama.cpp's Q8 blocks:
    # fewer instructions per weight, a small quality cost (`tokenmill eval ppl --compare full,activations=int8`).
    activations: str = "exact"
    slo_tpot: float | None = None  # seconds per output token to keep steps within (engine/step_budget.py)
    slo_ttft: float | None = None  # seconds to first token that may raise a step's budget (step_budget.py)
    kv_cache_dtype: str = "auto"  # auto (the activations' dtype) | int8 | int4 | kivi2 | kivi4: how K/V are stored (kv/cache.py)
    # KIVI formats only: tokens of each sequence kept in full precision, the newest (after the block being filled)
    # and the first (attention sinks); rounded up to whole blocks (kv/kivi.py)
    kivi_window: int = KIVI_WINDOW
    kivi_sinks: int = KIVI_SINKS
    # default KV eviction policy of requests that name none (kv/policy.py): full | streaming:... | h2o:... |
    # snapkv:...
    kv_policy: KVPolicy | str = "full"
    # speculative decoding (spec/config.py): a dict like vLLM's, a JSON string, or None (off)
    speculative_config: SpeculativeConfig | dict[str, Any] | str | None = None
    # Layers every forward pass leaves out (lossy layer skipping, as SkipDecode / Unified Layer Skipping): a
    # list, "3,5,8", or the JSON file `tokenmill eval layerskip` writes; their K/V is not stored either.
    skip_layers: tuple[int, ...] | list[int] | str | int | None = None

    def __post_init__(self) -> None:
        self.torch_dtype = parse_dtype(self.dtype)
        self.torch_device = torch.device(self.device)
        self.kv_cache_memory = parse_memory(self.kv_cache_memory)
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs", "kv_cache_memory"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive integer, got {self.threads!r}")
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        self.skip_layers = parse_skip_layers(self.skip_layers)
        if self.skip_layers and self.speculative_config and self.speculative_config.method == "layerskip":
            raise ValueError(
                "skip_layers (lossy layer skipping) and speculative method layerskip cannot be combined: "
                "give the draft's layers in speculative_config.skip_layers alone"
            )
        try:
            self.kv_policy = parse_kv_policy(self.kv_policy)
        except ValueError as e:
            raise ValueError(f"kv_policy: {e}") from None
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}"
            )
        for name in ("kivi_window", "kivi_sinks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a number of tokens >= 0, got {value!r}")
        for name in ("slo_tpot", "slo_ttft"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        self.weights = WeightFormat.parse(self.weights)
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {self.activations!r}")
        draft = self.speculative_config.draft_activations if self.speculative_config else None
        for name, value in (
            ("activations", self.activations),
            ("speculative_config.draft_activations", draft),
        ):
            if value not in (None, "exact") and (
                self.torch_device.type != "cpu"
                or self.kernels == "torch"
                or self.torch_dtype != torch.float32
            ):
                raise ValueError(
                    f"{name}={value!r} rounds the activations of the C++ CPU kernels' packed linears: "
                    "it needs device cpu, dtype float32 and kernels auto or cpp"
                )
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}")
        if self.kernels == "cpp" and self.torch_device.type != "cpu":
            raise ValueError(f"kernels='cpp' runs on the CPU only; device is {self.torch_device}")
        if self.cpu_isa not in CPU_ISAS:
            source = (
                " (from TOKENMILL_CPU_ISA)" if self.cpu_isa == os.environ.get("TOKENMILL_CPU_ISA") else ""
            )
            raise ValueError(f"cpu_isa must be one of {', '.join(CPU_ISAS)}, got {self.cpu_isa!r}{source}")
