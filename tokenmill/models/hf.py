"""Hugging Face folders: config.json -> ModelConfig, *.safetensors -> tensors under their HF names."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tokenmill.models.model_config import ModelConfig

_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


class HFModel:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        config_path = self.folder / "config.json"
        try:
            self.raw_config: dict[str, Any] = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read {config_path}: {exc}") from exc
        self.files = sorted(self.folder.glob("*.safetensors"))
        if not self.files:
            raise ValueError(f"{self.folder} has no *.safetensors weights")

    def model_config(self) -> ModelConfig:
        c = self.raw_config
        names = c.get("architectures") or []
        arch = next((_ARCHITECTURES[n] for n in names if n in _ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported model architecture {names or c.get('model_type')!r} in {self.folder}; "
                f"supported: {', '.join(sorted(_ARCHITECTURES))}"
            )
        num_heads = int(c["num_attention_heads"])
        hidden = int(c["hidden_size"])
        rope_scaling = c.get("rope_scaling")
        if rope_scaling is not None:
            rope_scaling = dict(rope_scaling)
            rope_scaling.setdefault("rope_type", rope_scaling.get("type", "default"))
        return ModelConfig(
            architecture=arch,
            vocab_size=int(c["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(c["intermediate_size"]),
            num_layers=int(c["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(c.get("num_key_value_heads") or num_heads),
            head_dim=int(c.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-5)),
            rope_theta=float(c.get("rope_theta", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(c.get("attention_bias", False)),
        )

    def tensors(self, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
        for file in self.files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name).to(torch.float32)
