"""GGUF files: metadata -> ModelConfig, tensors -> torch (dequantized with the `gguf` package, or with
`packed`, quantized blocks repacked into the layers' packed formats: `pack_gguf`).

Tensors come out under Hugging Face names so that one weight-loading path serves GGUF and HF models.
llama.cpp's converter permutes Llama Q/K rows for its interleaved rotary layout; we undo that here so the
model can use the half-split ("rotate_half") rotary that HF checkpoints use.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import Q4_K, dequantize

from tokenmill.formats import WeightFormat
from tokenmill.layers.quantization import BLOCK, PackedWeight, quantize
from tokenmill.models.model_config import ModelConfig

Q = GGMLQuantizationType
SUPPORTED_TYPES = {
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
}  # fmt: skip
_FLOAT_TYPES = {Q.F32, Q.F16, Q.BF16}
# GGUF block types whose bytes the packed formats hold as they are (Q4_K: up to the fp16 rounding of its
# sub-block scales), so they load without a detour through fp32.
NATIVE_GGUF_FORMATS = {
    Q.Q4_0: WeightFormat.Q4,
    Q.Q4_1: WeightFormat.Q4,
    Q.Q4_K: WeightFormat.Q4,
    Q.Q8_0: WeightFormat.Q8,
}
SUPPORTED_ARCHITECTURES = {"llama", "qwen2", "mistral"}
_PERMUTED_ARCHITECTURES = {"llama", "mistral"}  # llama.cpp's converter permutes Q/K only for these

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


class GGUFModel:
    """An open GGUF file: its metadata as plain Python values and lazily dequantized tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.reader = GGUFReader(str(self.path))
        except Exception as exc:  # the gguf package raises bare ValueErrors on a bad magic or version
            raise ValueError(f"{self.path} is not a readable GGUF file: {exc}") from exc
        self.metadata: dict[str, Any] = {}
        for key, field in self.reader.fields.items():
            if key.startswith("GGUF."):
                continue
            self.metadata[key] = field.contents()
        self.architecture = str(self.metadata.get("general.architecture", ""))

    def model_config(self) -> ModelConfig:
        arch = self.architecture
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported model architecture {arch!r} in {self.path.name}; "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        m = self.metadata

        def get(key: str, default: Any = None) -> Any:
            return m.get(f"{arch}.{key}", default)

        num_heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        head_dim = int(
            get("attention.key_length", 0) or get("rope.dimension_count", 0) or hidden // num_heads
        )
        tensor_names = {t.name for t in self.reader.tensors}
        vocab = get("vocab_size") or len(m.get("tokenizer.ggml.tokens", []))
        rope_scaling: dict[str, Any] | None = None
        if "rope_freqs.weight" in tensor_names:  # llama3-style scaling baked into per-dim factors
            factors = self._tensor_by_name("rope_freqs.weight")
            rope_scaling = {"rope_type": "freq_factors", "factors": factors.tolist()}
        elif get("rope.scaling.type") == "linear":
            rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor", 1.0))}
        return ModelConfig(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(get("attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(get("context_length", 4096)),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
        )

    def _tensor_by_name(self, name: str) -> np.ndarray:
        for t in self.reader.tensors:
            if t.name == name:
                return self._dequantize(t)
        raise KeyError(name)

    def _dequantize(self, tensor: Any) -> np.ndarray:
        qtype = GGMLQuantizationType(tensor.tensor_type)
        if qtype not in SUPPORTED_TYPES:
            raise ValueError(
                f"tensor {tensor.name} in {self.path.name} uses quantization type {qtype.name}, which is not "
                f"supported; supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))}"
            )
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists the fastest dim first
        return np.array(dequantize(tensor.data, qtype), dtype=np.float32).reshape(shape)  # a writable copy

    def tensors(
        self, config: ModelConfig, packed: bool = False
    ) -> Iterator[tuple[str, torch.Tensor | PackedWeight]]:
        """Yield (HF name, tensor) for every weight the model needs: float32 tensors, or with `packed`,
        quantized 2-D weights kept quantized: Q4_0/Q4_1/Q4_K/Q8_0 repacked as they are, other quantized
        types (Q5_*, Q6_K, Q2_K, Q3_K) decoded and requantized to q8, which is finer than all of them."""
        for t in self.reader.tensors:
            if t.name == "rope_freqs.weight":
                continue
            hf_name = _hf_name(t.name)
            if hf_name is None:
                continue  # e.g. unused rope tables; the model validates that nothing it needs is missing
            heads = None
            if config.architecture in _PERMUTED_ARCHITECTURES:
                if hf_name.endswith("q_proj.weight"):
                    heads = config.num_heads
                elif hf_name.endswith("k_proj.weight"):
                    heads = config.num_kv_heads
            qtype = GGMLQuantizationType(t.tensor_type)
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            if packed and len(shape) == 2 and qtype in NATIVE_GGUF_FORMATS:
                weight = pack_gguf(t.data, qtype, *shape)
                if heads is not None:
                    weight = weight.rows(torch.from_numpy(_unpermute(np.arange(shape[0]), heads)))
                yield hf_name, weight
                continue
            array = self._dequantize(t)
            if heads is not None:
                array = _unpermute(array, heads)
            tensor = torch.from_numpy(np.ascontiguousarray(array))
            if packed and len(shape) == 2 and qtype not in _FLOAT_TYPES:
                yield hf_name, quantize(tensor, WeightFormat.Q8)
            else:
                yield hf_name, tensor


def pack_gguf(raw: np.ndarray, qtype: GGMLQuantizationType, rows: int, cols: int) -> PackedWeight:
    """Repack a GGUF tensor's raw blocks ([rows, bytes per row] uint8) without going through fp32."""
    if cols % BLOCK:
        raise ValueError(f"row length {cols} is not a multiple of {BLOCK}")
    raw = np.ascontiguousarray(raw).reshape(rows, -1)
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0):
        size = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q8_0: 34}[qtype]
        blocks = raw.reshape(rows, cols // BLOCK, size)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
        if qtype == Q.Q8_0:
            codes = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
            return PackedWeight(WeightFormat.Q8, torch.from_numpy(codes), torch.from_numpy(d))
        if qtype == Q.Q4_0:
            m = (d.astype(np.float32) * -8).astype(np.float16)  # exact: a power-of-two multiple
            qs = blocks[..., 2:]
        else:
            m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
            qs = blocks[..., 4:]
        codes = np.ascontiguousarray(qs).reshape(rows, cols // 2)
        return PackedWeight(
            WeightFormat.Q4, torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(m)
        )
    if qtype == Q.Q4_K:
        blocks = raw.reshape(-1, 144)  # super-blocks of 256: d, dmin, 12 bytes of 6-bit scales, 128 bytes qs
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, mn = Q4_K.get_scale_min(blocks[:, 4:16].copy())
        scales = (d * sc.astype(np.float32)).astype(np.float16)  # [blocks, 8]
        mins = (-dmin * mn.astype(np.float32)).astype(np.float16)
        # each 32 bytes of qs hold sub-block 2j (low nibbles) and 2j+1 (high nibbles), element by element
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        q = (qs & 0x0F).reshape(-1, 8, 32)
        codes = (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8).reshape(rows, cols // 2)
        return PackedWeight(
            WeightFormat.Q4,
            torch.from_numpy(codes),
            torch.from_numpy(scales.reshape(rows, -1)),
            torch.from_numpy(mins.reshape(rows, -1)),
        )
    raise ValueError(f"GGUF type {qtype.name} has no native packed format")


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def _unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Invert llama.cpp's `permute`: rows (head, rot_half, pair) -> (head, pair, rot_half)."""
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )
