"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2 with QKV bias) over a flat token batch.

Pure function of its inputs: weights + tokens + positions + attention metadata + KV cache in, logits
for the requested rows out. Q/K/V and gate/up projections are fused into one matmul each. One decoder loop runs over an ops object
(layers/ops.py: torch or C++), so the residual stream and the KV write are handled in one place.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from tokenmill.kv.cache import KVCache
from tokenmill.layers.attention import AttentionMetadata, PagedAttention
from tokenmill.layers.linear import (
    ConcatLinear,
    DenseLinear,
    Linear,
    QuantKernelPlan,
    QuantLinear,
    default_plan,
)
from tokenmill.layers.norm import rms_norm
from tokenmill.layers.ops import HeadLayout, TorchOps
from tokenmill.layers.quantization import PackedWeight, cat_rows, convert
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.model_config import ModelConfig


@dataclass
class LlamaLayer:
    input_norm: torch.Tensor
    qkv: Linear
    o_proj: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear


class LlamaModel:
    def __init__(
        self,
        config: ModelConfig,
        device: torch.device,
        dtype: torch.dtype,
        max_positions: int,
        ops: TorchOps | None = None,
        quant_plan: QuantKernelPlan | None = None,
    ):
        self.config = config
        self.device = device
        self.dtype = dtype
        self.layers: list[LlamaLayer] = []
        self.embed: DenseLinear | QuantLinear | None = None  # looked up by rows; shared with a tied lm_head
        self.final_norm: torch.Tensor | None = None
        self.lm_head: DenseLinear | QuantLinear | None = None
        self.rotary = RotaryEmbedding(
            config.head_dim, max_positions, config.rope_theta, config.rope_scaling, device, dtype
        )
        self.ops = ops or TorchOps()
        self.kernels = self.ops.module  # compiled kernels for quantized linears and attention, or None
        # how packed linears run (layers/linear.py): the level's measured plan unless the loader chose one
        self.quant_plan = quant_plan or default_plan(self.kernels)
        self.heads = HeadLayout(config.num_heads, config.num_kv_heads, config.head_dim)
        self.attention = PagedAttention(
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            kernel=self.kernels.paged_attention if self.kernels is not None else None,
            kivi_kernel=self.kernels.kivi_paged_attention if self.kernels is not None else None,
        )

    # ---- weights -------------------------------------------------------------------------------
    def load_weights(
        self, weights: Iterable[tuple[str, torch.Tensor | PackedWeight]], weight_mode: str = "dense"
    ) -> None:
        """Take tensors under HF names (float32 or packed, any order), convert the 2-D weights as
        `weight_mode` asks (see quantization.convert), cast the rest, and fuse projections."""
        c = self.config
        if weight_mode not in ("dense", "auto") and self.dtype != torch.float32:
            raise ValueError(f"weights {weight_mode!r} run with float32 activations; use --dtype float32")
        raw: dict[str, torch.Tensor | PackedWeight] = {}
        for name, tensor in weights:
            if isinstance(tensor, PackedWeight) or tensor.dim() == 2:
                tensor = convert(tensor, weight_mode)
            if isinstance(tensor, PackedWeight):
                raw[name] = PackedWeight(tensor.format, *(t.to(self.device) for t in tensor.tensors()))
            else:
                raw[name] = tensor.to(device=self.device, dtype=self.dtype)

        def take(name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor | PackedWeight:
            try:
                tensor = raw.pop(name)
            except KeyError:
                raise ValueError(f"model weights are missing tensor {name!r}") from None
            if shape is not None and tuple(tensor.shape) != shape:
                raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {shape}")
            return tensor

        h, inter = c.hidden_size, c.intermediate_size
        self.embed = self._linear([take("model.embed_tokens.weight", (c.vocab_size, h))])
        self.final_norm = take("model.norm.weight")
        if "lm_head.weight" in raw:
            self.lm_head = self._linear([take("lm_head.weight", (c.vocab_size, h))])
        elif c.tie_word_embeddings:
            self.lm_head = self.embed
        else:
            raise ValueError("model weights are missing tensor 'lm_head.weight'")
        self.layers = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            q = take(p + "self_attn.q_proj.weight", (self.heads.q_size, h))
            k = take(p + "self_attn.k_proj.weight", (self.heads.kv_size, h))
            v = take(p + "self_attn.v_proj.weight", (self.heads.kv_size, h))
            bias = None
            if c.attention_bias:
                bias = torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            gate = take(p + "mlp.gate_proj.weight", (inter, h))
            up = take(p + "mlp.up_proj.weight", (inter, h))
            self.layers.append(
                LlamaLayer(
                    input_norm=take(p + "input_layernorm.weight"),
                    qkv=self._linear([q, k, v], bias),
                    o_proj=self._linear([take(p + "self_attn.o_proj.weight")]),
                    post_norm=take(p + "post_attention_layernorm.weight"),
                    gate_up=self._linear([gate, up]),
                    down=self._linear([take(p + "mlp.down_proj.weight")]),
                )
            )
        raw.pop("model.rotary_emb.inv_freq", None)
        for name in list(raw):
            if ".rotary_emb." in name:
                raw.pop(name)
        if raw:
            raise ValueError(f"unexpected tensors in model weights: {sorted(raw)[:5]}")

    def linear_parts(self) -> list:
        """Every single-weight linear the LM head and the layers run (a fused linear's parts one by one)."""
        linears = [self.lm_head] + [
            lin for layer in self.layers for lin in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)
        ]
        return [p for lin in linears for p in (lin.parts if isinstance(lin, ConcatLinear) else [lin])]

    @property
    def has_packed_linears(self) -> bool:
        """Whether any linear runs packed weights (what EngineConfig.activations acts on)."""
        return any(isinstance(p, QuantLinear) for p in self.linear_parts())

    def batched_rows_threshold(self) -> int:
        """Activation rows from which the packed linears decode their weights once for a GEMM instead of per
        row in the GEMV (quant_plan), so a step's cost per row drops there; 0 without packed linears."""
        return self.quant_plan.gemm_min_rows if self.has_packed_linears else 0

    def _linear(self, parts: list, bias: torch.Tensor | None = None) -> Linear:
        """One linear over the row-wise concatenation of `parts` (fused QKV / gate-up): a single weight when
        the parts share a format, side-by-side linears when they do not (mixed-type GGUFs)."""
        if all(isinstance(p, PackedWeight) for p in parts):
            if len({p.format for p in parts}) == 1:
                return QuantLinear(
                    cat_rows(parts) if len(parts) > 1 else parts[0], bias, self.kernels, self.quant_plan
                )
        elif not any(isinstance(p, PackedWeight) for p in parts):
            return DenseLinear(torch.cat(parts).contiguous() if len(parts) > 1 else parts[0], bias)
        linears: list[DenseLinear | QuantLinear] = []
        start = 0
        for p in parts:
            n = p.shape[0]
            b = None if bias is None else bias[start : start + n]
            linears.append(
                QuantLinear(p, b, self.kernels, self.quant_plan)
                if isinstance(p, PackedWeight)
                else DenseLinear(p, b)
            )
            start += n
        return ConcatLinear(linears)

    # ---- forward -------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T] token positions (for rotary), independent of the KV slots
        meta: AttentionMetadata,
        kv_cache: KVCache,
        logits_indices: torch.Tensor,  # rows of the batch whose next-token logits are wanted
        layers: Sequence[int] | None = None,  # which layers to run (layer skipping); None: all
    ) -> torch.Tensor:
        """Logits `[len(logits_indices), vocab]` (fp32). New K/V of every run layer go to the cache."""
        c, ops = self.config, self.ops
        x = self.embed.rows(input_ids).to(self.dtype).contiguous()
        cos, sin = self.rotary.cos_sin(positions)
        cos, sin = cos.squeeze(1), sin.squeeze(1)
        t = x.shape[0]
        delta: torch.Tensor | None = None  # the last sublayer's output, added to x by the next norm
        for i in range(c.num_layers) if layers is None else layers:
            layer = self.layers[i]
            kv = kv_cache.layer(i)
            x, h = ops.add_rms_norm(x, delta, layer.input_norm, c.rms_norm_eps)
            q, k, v = ops.rope_write_kv(layer.qkv(h), cos, sin, kv, meta.slot_mapping, self.heads)
            attn = self.attention(q, k, v, kv, meta, scores=meta.layer_scores(kv_cache.index(i)))
            x, h = ops.add_rms_norm(
                x, layer.o_proj(attn.reshape(t, self.heads.q_size)), layer.post_norm, c.rms_norm_eps
            )
            delta = layer.down(ops.silu_mul(layer.gate_up(h)))
        x = x[logits_indices]
        if delta is not None:
            x = x + delta[logits_indices]
        x = rms_norm(x, self.final_norm, c.rms_norm_eps)
        return self.lm_head(x).float()
