"""Architecture name -> model class, and the one function that turns a ModelSource into a ready model."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tokenmill.formats import WeightFormat
from tokenmill.layers.cpu_kernels import load_cpu_kernels
from tokenmill.layers.linear import default_plan
from tokenmill.layers.ops import TorchOps, make_ops
from tokenmill.layers.quantization import PackedWeight
from tokenmill.models.gguf import GGUFModel
from tokenmill.models.hf import HFModel
from tokenmill.models.llama import LlamaModel
from tokenmill.models.model_config import ModelConfig
from tokenmill.models.source import ModelSource
from tokenmill.models.tokenizer import Tokenizer
from tokenmill.models.weight_cache import default_cache_root, load_converted_gguf

MODEL_CLASSES: dict[str, type[LlamaModel]] = {
    "llama": LlamaModel,
    "mistral": LlamaModel,
    "qwen2": LlamaModel,
}


@dataclass
class LoadedModel:
    model: LlamaModel
    config: ModelConfig
    tokenizer: Tokenizer
    max_model_len: int


def resolve_weight_mode(
    mode: WeightFormat | str, source: ModelSource, ops: TorchOps, dtype: torch.dtype
) -> WeightFormat:
    """AUTO runs a GGUF's quantized weights natively where the kernels can (C++ ops, fp32 activations)
    and dequantizes them elsewhere; float checkpoints stay dense. Other modes are taken as asked."""
    mode = WeightFormat.parse(mode)
    if mode != WeightFormat.AUTO:
        return mode
    if source.kind == "gguf" and ops.module is not None and dtype == torch.float32:
        return WeightFormat.AUTO
    return WeightFormat.DENSE


def load_model(
    source: ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    max_model_len: int | None = None,
    weights: WeightFormat | str = WeightFormat.AUTO,
    cache_root: Path | None | Literal["default"] = "default",
    kernels: str = "auto",
    cpu_isa: str = "auto",
    activations: str = "exact",
) -> LoadedModel:
    """Build the model `source` names. GGUF weights that stay packed come through the weight cache under
    `cache_root` ('default': see weight_cache.default_cache_root; None: no cache). `kernels` picks the ops
    (layers/ops.py: 'auto' | 'torch' | 'cpp'), `cpu_isa` the instruction-set build of the C++ kernels,
    `activations` how packed linears round activations (EngineConfig.activations)."""
    if cache_root == "default":
        cache_root = default_cache_root()
    ops = make_ops(kernels, device, dtype, lambda: load_cpu_kernels(cpu_isa))
    mode = resolve_weight_mode(weights, source, ops, dtype)
    plan = default_plan(ops.module, activations)
    if source.kind == "gguf" and mode != WeightFormat.DENSE:  # packed weights: through the on-disk cache
        converted = load_converted_gguf(source.path, cache_root)
        config, tokenizer = converted.config, converted.tokenizer
        tensors: Iterable[tuple[str, torch.Tensor | PackedWeight]] = converted.tensors.items()
    elif source.kind == "gguf":
        checkpoint = GGUFModel(source.path)
        config = checkpoint.model_config()
        tokenizer = Tokenizer.from_gguf_metadata(checkpoint.metadata)
        tensors = checkpoint.tensors(config)
    else:
        checkpoint = HFModel(source.path)
        config = checkpoint.model_config()
        tokenizer = Tokenizer.from_hf_dir(source.path)
        tensors = checkpoint.tensors(config)
    cls = MODEL_CLASSES.get(config.architecture)
    if cls is None:
        raise ValueError(f"unsupported model architecture {config.architecture!r}")
    context = config.max_position_embeddings
    if max_model_len is None:
        max_model_len = context
    elif max_model_len > context:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's context length {context}")
    model = cls(config, device, dtype, max_positions=max_model_len, ops=ops, quant_plan=plan)
    model.load_weights(tensors, mode)
    if activations != "exact" and not model.has_packed_linears:
        raise ValueError(
            f"activations={activations!r} applies to packed (q4/q8) weights; this model's weights run dense "
            "(use a GGUF with quantized weights and --weights auto, or --weights q4/q8)"
        )
    return LoadedModel(model, config, tokenizer, max_model_len)
