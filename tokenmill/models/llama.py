"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2 with QKV bias) over a flat token batch.

Pure function of its inputs: weights + tokens + positions + attention metadata + KV cache in, logits
for the requested rows out. Q/K/V and gate/up projections are fused into one matmul each.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.layers.attention import AttentionMetadata, TorchAttention
from tokenmill.layers.cpu_kernels import load_cpu_kernels
from tokenmill.layers.linear import DenseLinear
from tokenmill.layers.norm import rms_norm
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.model_config import ModelConfig


@dataclass
class LlamaLayer:
    input_norm: torch.Tensor
    qkv: DenseLinear
    o_proj: DenseLinear
    post_norm: torch.Tensor
    gate_up: DenseLinear
    down: DenseLinear


class LlamaModel:
    def __init__(self, config: ModelConfig, device: torch.device, dtype: torch.dtype, max_positions: int):
        self.config = config
        self.device = device
        self.dtype = dtype
        self.layers: list[LlamaLayer] = []
        self.embed: torch.Tensor | None = None
        self.final_norm: torch.Tensor | None = None
        self.lm_head: DenseLinear | None = None
        self.rotary = RotaryEmbedding(
            config.head_dim, max_positions, config.rope_theta, config.rope_scaling, device, dtype
        )
        kernels = load_cpu_kernels() if device.type == "cpu" else None
        self.attention = TorchAttention(
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            decode_kernel=kernels.paged_decode_attention if kernels is not None else None,
        )
        c = config
        self._q_size = c.num_heads * c.head_dim
        self._kv_size = c.num_kv_heads * c.head_dim

    # ---- weights -------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take tensors under HF names (float32, any order), cast them, and fuse projections."""
        c = self.config
        raw: dict[str, torch.Tensor] = {}
        for name, tensor in weights:
            raw[name] = tensor.to(device=self.device, dtype=self.dtype)

        def take(name: str) -> torch.Tensor:
            try:
                return raw.pop(name)
            except KeyError:
                raise ValueError(f"model weights are missing tensor {name!r}") from None

        def expect(tensor: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
            if tuple(tensor.shape) != shape:
                raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {shape}")
            return tensor

        h, inter = c.hidden_size, c.intermediate_size
        self.embed = expect(take("model.embed_tokens.weight"), (c.vocab_size, h), "embed_tokens")
        self.final_norm = take("model.norm.weight")
        head = raw.pop("lm_head.weight", None)
        if head is None:
            if not c.tie_word_embeddings:
                raise ValueError("model weights are missing tensor 'lm_head.weight'")
            head = self.embed
        self.lm_head = DenseLinear(expect(head, (c.vocab_size, h), "lm_head"))
        self.layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            q = expect(take(p + "self_attn.q_proj.weight"), (self._q_size, h), p + "q_proj")
            k = expect(take(p + "self_attn.k_proj.weight"), (self._kv_size, h), p + "k_proj")
            v = expect(take(p + "self_attn.v_proj.weight"), (self._kv_size, h), p + "v_proj")
            bias = None
            if c.attention_bias:
                bias = torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            gate = expect(take(p + "mlp.gate_proj.weight"), (inter, h), p + "gate_proj")
            up = expect(take(p + "mlp.up_proj.weight"), (inter, h), p + "up_proj")
            self.layers.append(
                LlamaLayer(
                    input_norm=take(p + "input_layernorm.weight"),
                    qkv=DenseLinear(torch.cat([q, k, v]).contiguous(), bias),
                    o_proj=DenseLinear(take(p + "self_attn.o_proj.weight")),
                    post_norm=take(p + "post_attention_layernorm.weight"),
                    gate_up=DenseLinear(torch.cat([gate, up]).contiguous()),
                    down=DenseLinear(take(p + "mlp.down_proj.weight")),
                )
            )
        raw.pop("model.rotary_emb.inv_freq", None)
        for name in list(raw):
            if ".rotary_emb." in name:
                raw.pop(name)
        if raw:
            raise ValueError(f"unexpected tensors in model weights: {sorted(raw)[:5]}")

    # ---- forward -------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],  # per layer (K, V)
        logits_indices: torch.Tensor,  # rows of the batch whose next-token logits are wanted
        layers: Sequence[int] | None = None,  # which layers to run (layer skipping); None: all
    ) -> torch.Tensor:
        c = self.config
        x = F.embedding(input_ids, self.embed)
        t = x.shape[0]
        cos, sin = self.rotary.cos_sin(positions)
        qk_size = self._q_size + self._kv_size
        for i in range(c.num_layers) if layers is None else layers:
            layer = self.layers[i]
            h = rms_norm(x, layer.input_norm, c.rms_norm_eps)
            qkv = layer.qkv(h)
            # rotate q and k heads together: they sit side by side in the fused projection
            qk = self.rotary.apply(qkv[:, :qk_size].view(t, -1, c.head_dim), cos, sin)
            q, k = qk.split([c.num_heads, c.num_kv_heads], dim=1)
            v = qkv[:, qk_size:].view(t, c.num_kv_heads, c.head_dim)
            k_cache, v_cache = kv_caches[i]
            attn = self.attention(q, k, v, k_cache, v_cache, meta)
            x = x + layer.o_proj(attn.reshape(t, self._q_size))
            h = rms_norm(x, layer.post_norm, c.rms_norm_eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        x = rms_norm(x[logits_indices], self.final_norm, c.rms_norm_eps)
        return self.lm_head(x).float()
