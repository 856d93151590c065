"""Shared fixtures: a tiny random-weight Llama written as an HF folder (fast tests), and the real default
model with the transformers oracle (integration tests)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config) -> None:
    """Converted-weight cache entries of this run go to a private folder (inherited by servers the tests
    start), not the user's ~/.cache/tokenmill."""
    if "TOKENMILL_CACHE_DIR" not in os.environ:
        import tempfile

        os.environ["TOKENMILL_CACHE_DIR"] = tempfile.mkdtemp(prefix="tokenmill-test-cache-")
        config._tokenmill_cache = os.environ["TOKENMILL_CACHE_DIR"]


def pytest_unconfigure(config) -> None:
    folder = getattr(config, "_tokenmill_cache", None)
    if folder is not None:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from tokenmill.models.source import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def real_tokenizer(default_gguf):
    from tokenmill.models.gguf import GGUFModel
    from tokenmill.models.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(GGUFModel(default_gguf).metadata)


def random_llama_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights scaled so that logits are well spread (no near-ties for greedy decoding to trip on)."""
    g = torch.Generator().manual_seed(seed)
    h, inter = config["hidden_size"], config["intermediate_size"]
    nh, nkv, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    weights = {"model.embed_tokens.weight": torch.randn(config["vocab_size"], h, generator=g)}
    weights["lm_head.weight"] = torch.randn(config["vocab_size"], h, generator=g) * 0.4  # logits std ~3
    weights["model.norm.weight"] = torch.ones(h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights.update(
            {
                p + "input_layernorm.weight": torch.ones(h),
                p + "post_attention_layernorm.weight": torch.ones(h),
                p + "self_attn.q_proj.weight": w(nh * hd, h),
                p + "self_attn.k_proj.weight": w(nkv * hd, h),
                p + "self_attn.v_proj.weight": w(nkv * hd, h),
                p + "self_attn.o_proj.weight": w(h, nh * hd),
                p + "mlp.gate_proj.weight": w(inter, h),
                p + "mlp.up_proj.weight": w(inter, h),
                p + "mlp.down_proj.weight": w(h, inter),
            }
        )
    return weights


def write_tiny_model(folder: Path, tokenizer, config: dict = TINY_CONFIG, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(random_llama_weights(config, seed), str(folder / "model.safetensors"))
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": tokenizer.bos_token,
                "eos_token": tokenizer.eos_token,
                "add_bos_token": False,
                "chat_template": tokenizer.chat_template,
            }
        )
    )
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, real_tokenizer) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"), real_tokenizer)


@pytest.fixture(scope="session")
def real_llm():
    from tokenmill import LLM

    return LLM(dtype="float32", weights="dense")  # the exact fp32 path; formats are tested in test_quant


@pytest.fixture(scope="session")
def hf_oracle(default_gguf):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32
    ).eval()
