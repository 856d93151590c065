"""The per-token operations of a decoder layer, behind one interface with two implementations.

`TorchOps` runs plain torch (any device and dtype); `CppOps` runs tokenmill's C++ CPU kernels (residual add +
RMSNorm in one pass, rotary + KV-cache write in one pass, silu * up in one pass; fp32), which matter because
in a small decode step every torch op costs more in dispatch than in arithmetic. The model's single decoder
loop calls these, so the residual stream and the KV write are handled in exactly one place. Which set runs
is the engine's choice (`EngineConfig.kernels`), made once at load time: no environment variable, no global.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from tokenmill.kv.cache import LayerKV
from tokenmill.layers.norm import rms_norm
from tokenmill.layers.rotary import RotaryEmbedding

KERNEL_CHOICES = ("auto", "torch", "cpp")


@dataclass(frozen=True)
class HeadLayout:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


class TorchOps:
    """Reference implementations: plain torch ops, any device and dtype."""

    name = "torch"
    module: ModuleType | None = None  # the compiled kernels (quantized linears, paged attention), if any

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual stream x (+ delta) and its RMS-normalised copy: (new x, normed)."""
        if delta is not None:
            x = x + delta
        return x, rms_norm(x, weight, eps)

    def rope_write_kv(
        self,
        qkv: torch.Tensor,  # [T, (H + 2 Hkv) * D] fused projection output
        cos: torch.Tensor,  # [T, D / 2]
        sin: torch.Tensor,
        kv: LayerKV,
        slot_mapping: torch.Tensor,
        heads: HeadLayout,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotate q and k, store k and v at their slots (quantized on write if the cache format is);
        returns q [T, H, D], k, v [T, Hkv, D] in full precision."""
        t, d = qkv.shape[0], heads.head_dim
        qk_size = heads.q_size + heads.kv_size
        qk = RotaryEmbedding.apply(qkv[:, :qk_size].view(t, -1, d), cos.unsqueeze(1), sin.unsqueeze(1))
        q, k = qk.split([heads.num_heads, heads.num_kv_heads], dim=1)
        v = qkv[:, qk_size:].view(t, heads.num_kv_heads, d)
        kv.write(k, v, slot_mapping)
        return q, k, v

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class CppOps(TorchOps):
    """The C++ kernels. The elementwise ops are fp32-only; for other dtypes those fall back to torch while
    attention and quantized linears still use the compiled kernels."""

    name = "cpp"

    def __init__(self, module: ModuleType, dtype: torch.dtype):
        self.module = module
        self.fused = dtype == torch.float32

    def add_rms_norm(self, x, delta, weight, eps):
        if not self.fused:
            return super().add_rms_norm(x, delta, weight, eps)
        return x, self.module.add_rms_norm(x, delta, weight, eps)  # adds delta into x in place

    def rope_write_kv(self, qkv, cos, sin, kv, slot_mapping, heads):
        if not self.fused:
            return super().rope_write_kv(qkv, cos, sin, kv, slot_mapping, heads)
        if kv.kivi:  # seal the blocks this step fills, residual rows for the rest (kv/kivi.py)
            plan = kv.state.plan_for(slot_mapping)
            kv.unseal(slot_mapping)
            self.module.rope_kivi_write(
                qkv, cos, sin, kv.k, kv.v, kv.k_scale, kv.v_scale, kv.res_k, kv.res_v, plan.res_rows,
                plan.seal_blocks, plan.seal_src, heads.num_heads, heads.num_kv_heads, kv.kivi_bits,
            )  # fmt: skip
        else:
            self.module.rope_kv_write(
                qkv,
                cos,
                sin,
                kv.k,
                kv.v,
                kv.k_scale,
                kv.v_scale,
                slot_mapping,
                heads.num_heads,
                heads.num_kv_heads,
            )
        t, d = qkv.shape[0], heads.head_dim
        qk_size = heads.q_size + heads.kv_size
        q = qkv[:, : heads.q_size].view(t, heads.num_heads, d)
        k = qkv[:, heads.q_size : qk_size].view(t, heads.num_kv_heads, d)
        v = qkv[:, qk_size:].view(t, heads.num_kv_heads, d)
        return q, k, v

    def silu_mul(self, gate_up):
        return self.module.silu_mul(gate_up) if self.fused else super().silu_mul(gate_up)


def make_ops(choice: str, device: torch.device, dtype: torch.dtype, module_loader) -> TorchOps:
    """The ops for `choice` ('auto' | 'torch' | 'cpp'). `module_loader()` builds/loads the C++ kernels (or
    returns None when they cannot be built). 'auto' takes C++ on the CPU when it builds, torch otherwise;
    'cpp' where it cannot run is an error, not a silent fallback."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}, got {choice!r}")
    if choice == "torch":
        return TorchOps()
    if device.type != "cpu":
        if choice == "cpp":
            raise ValueError(f"kernels='cpp' runs on the CPU only, not on {device.type}")
        return TorchOps()
    module = module_loader()
    if module is None:
        if choice == "cpp":
            raise ValueError("kernels='cpp' was asked for but the C++ CPU kernels could not be built")
        return TorchOps()
    return CppOps(module, dtype)
