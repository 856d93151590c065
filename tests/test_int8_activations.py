"""int8 activations (EngineConfig.activations="int8"): the packed linears' few-row dot products round each
block of 32 activations to int8, as llama.cpp's Q8 blocks. The kernels must equal that rounding exactly (up to
fp32 summation order), stay close to the exact path, and the option must be refused where it changes nothing."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType

from tests.conftest import random_llama_weights
from tests.test_models import SMALL_CONFIG, small_tokenizer_fields, write_gguf
from tokenmill import LLM, EngineConfig, SamplingParams
from tokenmill.layers.cpu_kernels import load_cpu_kernels
from tokenmill.layers.linear import GEMM_MIN_ROWS, QuantKernelPlan, QuantLinear, default_plan
from tokenmill.layers.quantization import dequantize, quantize

KERNELS = load_cpu_kernels()
vector_kernels = pytest.mark.skipif(
    KERNELS is None or KERNELS.cpu_isa() == "portable",
    reason="int8 activations need the AVX2/AVX-512 kernels",
)
INT8 = QuantKernelPlan(int8_activations=True)


def int8_reference(x: torch.Tensor, w) -> torch.Tensor:
    """x rounded to int8 per block of 32 (absmax / 127, ties to even) times the weight; a 4-bit weight's
    offsets multiply the exact fp32 block sums, as in the kernel."""
    m, k = x.shape
    blocks = x.view(m, k // 32, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    xq = (torch.where(scale > 0, blocks / torch.where(scale > 0, scale, 1), 0).round() * scale).view(m, k)
    if w.format == "q8":
        return xq @ dequantize(w).T
    n = w.shape[0]
    lo, hi = (w.codes & 0x0F).view(n, -1, 16), (w.codes >> 4).view(n, -1, 16)
    codes = torch.cat([lo, hi], -1).float()  # [N, K/32, 32]: byte j holds elements j and j + 16
    scaled = (codes * w.scales.float().unsqueeze(-1)).view(n, k)
    return xq @ scaled.T + blocks.sum(-1) @ w.mins.float().T


@vector_kernels
@pytest.mark.parametrize("fmt", ["q4", "q8"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, GEMM_MIN_ROWS - 1])
def test_kernel_equals_int8_rounding(fmt, rows):
    g = torch.Generator().manual_seed(rows)
    w = quantize(torch.randn(203, 96, generator=g) * 0.05, fmt)  # 203 outputs: a tail after groups of 4
    x = torch.randn(rows, 96, generator=g) * torch.linspace(0.1, 4, 96)  # blocks of different ranges
    out = QuantLinear(w, None, KERNELS, INT8)(x)
    ref = int8_reference(x, w)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    exact = QuantLinear(w, None, KERNELS, QuantKernelPlan())(x)
    assert not torch.allclose(out, exact, rtol=1e-6, atol=0), "int8 rounding must change the result"
    rel = (out - exact).norm() / exact.norm()
    assert rel < 0.03, f"int8 activations off by {rel:.4f} of the exact result"  # ~1/127 a block, summed


@vector_kernels
def test_prefill_rows_keep_the_exact_gemm():
    """From the GEMM threshold on, weights are decoded for torch's GEMM: the option leaves prompts exact."""
    g = torch.Generator().manual_seed(0)
    w = quantize(torch.randn(64, 96, generator=g) * 0.05, "q4")
    x = torch.randn(GEMM_MIN_ROWS, 96, generator=g)
    torch.testing.assert_close(
        QuantLinear(w, None, KERNELS, INT8)(x), QuantLinear(w, None, KERNELS, QuantKernelPlan())(x)
    )


def test_plan_refuses_int8_without_vector_kernels():
    with pytest.raises(ValueError, match="AVX2 or AVX-512"):
        default_plan(None, "int8")
    with pytest.raises(ValueError, match="exact or int8"):
        default_plan(KERNELS, "int4")
    if KERNELS is not None and KERNELS.cpu_isa() != "portable":
        assert default_plan(KERNELS, "int8").int8_activations
        assert not default_plan(KERNELS).int8_activations


def test_config_rejects_int8_where_it_changes_nothing():
    with pytest.raises(ValueError, match="activations must be one of"):
        EngineConfig(activations="fp8")
    for bad in ({"kernels": "torch"}, {"dtype": "bfloat16"}):
        with pytest.raises(ValueError, match="needs device cpu, dtype float32"):
            EngineConfig(activations="int8", **bad)


@vector_kernels
@pytest.mark.parametrize("weights", ["dense", "auto"])
def test_dense_weights_refuse_int8(tmp_path, weights):
    """Dense weights, asked for or an fp32 GGUF's own: int8 activations would change nothing."""
    path = write_gguf(
        tmp_path / "m.gguf", SMALL_CONFIG, random_llama_weights(SMALL_CONFIG), small_tokenizer_fields()
    )
    with pytest.raises(ValueError, match="packed"):
        LLM(str(path), weights=weights, activations="int8", kv_cache_memory="16MiB")


@vector_kernels
def test_model_with_int8_activations_stays_close(tmp_path):
    path = write_gguf(
        tmp_path / "m.gguf",
        SMALL_CONFIG,
        random_llama_weights(SMALL_CONFIG),
        small_tokenizer_fields(),
        GGMLQuantizationType.Q4_0,
    )
    prompt = {"prompt_token_ids": list(range(10, 40))}
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True)
    outs = {}
    for mode in ("exact", "int8"):
        llm = LLM(str(path), activations=mode, kv_cache_memory="16MiB")
        assert llm.engine.runner.model.layers[0].gate_up.plan.int8_activations == (mode == "int8")
        outs[mode] = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    exact, int8 = outs["exact"], outs["int8"]
    first = list(exact.logprobs[0])[0]
    assert int8.logprobs[0][first].logprob == pytest.approx(exact.logprobs[0][first].logprob, abs=0.05)
    decode_lps = [lp for step in int8.logprobs[1:] for lp in step.values()]
    exact_lps = [lp for step in exact.logprobs[1:] for lp in step.values()]
    assert [lp.logprob for lp in decode_lps] != [lp.logprob for lp in exact_lps]  # decode steps did change
