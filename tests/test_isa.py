"""CPU kernel ISA levels: the level picker, one build per level (named after it), a level the CPU lacks
refused, and the kernels at the portable level and at the detected one agreeing with each other, with plain
torch, and in greedy generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill import LLM, SamplingParams
from tokenmill.layers import cpu_kernels
from tokenmill.layers.cpu_kernels import (
    ISA_LEVELS,
    UnsupportedISAError,
    build_directory,
    build_name,
    detect_isa,
    kernel_info,
    load_cpu_kernels,
    pick_isa,
    resolve_isa,
)
from tokenmill.layers.linear import GEMM_MIN_ROWS, GEMM_TILE_BYTES
from tokenmill.layers.quantization import dequantize, quantize

AVX2 = {"avx2", "fma", "f16c"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"}
LEVELS = sorted({"portable", detect_isa()}, key=ISA_LEVELS.index)  # one build each; the same on AVX2-only
needs_two_levels = pytest.mark.skipif(len(LEVELS) < 2, reason="this CPU only runs the portable level")


# ---- picking a level --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "capability, flags, level",
    [
        ("AVX512", AVX512, "avx512"),
        ("AVX512", AVX512 | {"amx_tile", "amx_bf16", "amx_int8"}, "avx512"),  # Sapphire Rapids
        ("avx512", AVX512, "avx512"),
        ("AVX512", AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}, "avx2"),  # no VNNI/BF16: Skylake-X
        ("AVX512", AVX512 - {"avx512_bf16"}, "avx2"),  # Ice Lake
        ("AVX2", AVX512, "avx2"),  # torch capped (ATEN_CPU_CAPABILITY=avx2): so are the kernels
        ("AVX2", AVX2, "avx2"),
        ("AVX2", {"avx2", "fma"}, "portable"),  # no F16C
        ("DEFAULT", AVX512, "portable"),
        ("NO AVX", set(), "portable"),
        ("VSX", set(), "portable"),
        ("SVE256", set(), "portable"),
        ("SOMETHING NEW", AVX512, "portable"),
        ("", AVX512, "portable"),
        ("AVX512", None, "avx2"),  # flags unreadable: torch's own AVX2 check is trusted, VNNI/BF16 are not
        ("AVX2", None, "avx2"),
        ("DEFAULT", None, "portable"),
    ],
)
def test_pick_isa(capability, flags, level):
    assert pick_isa(capability, flags) == level


def test_detected_level_is_one_of_the_levels_and_auto_means_it():
    assert detect_isa() in ISA_LEVELS
    assert resolve_isa("auto") == detect_isa()
    assert resolve_isa("portable") == "portable"


@pytest.mark.parametrize("name", ["native", "AVX2", "sse4", "amx", ""])
def test_unknown_level_is_a_value_error(name):
    with pytest.raises(ValueError, match="cpu isa must be one of"):
        load_cpu_kernels(name)


def test_level_the_cpu_lacks_is_refused(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_cpuinfo", lambda: ("Some AVX2 CPU", frozenset(AVX2)))
    monkeypatch.setattr(cpu_kernels, "torch_capability", lambda: "AVX2")
    monkeypatch.setattr(cpu_kernels, "_is_x86", lambda: True)
    assert cpu_kernels.supported_isas() == ("portable", "avx2")
    with pytest.raises(UnsupportedISAError, match="cannot run the avx512 kernels.*avx512_vnni"):
        load_cpu_kernels.__wrapped__("avx512")  # (past the cache: this CPU may have loaded it already)
    info = kernel_info("avx512")
    assert info["kernels_loaded"] is False and "cannot run" in info["error"]


def test_level_above_torch_capability_is_allowed_when_the_cpu_has_it(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_cpuinfo", lambda: ("Some CPU", frozenset(AVX512)))
    monkeypatch.setattr(cpu_kernels, "torch_capability", lambda: "DEFAULT")  # e.g. ATEN_CPU_CAPABILITY
    monkeypatch.setattr(cpu_kernels, "_is_x86", lambda: True)
    assert resolve_isa("auto") == "portable"
    assert resolve_isa("avx512") == "avx512"


# ---- builds -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=LEVELS)
def level_kernels(request):
    kernels = load_cpu_kernels(request.param)
    assert kernels is not None, f"the {request.param} build failed"
    return request.param, kernels


@pytest.fixture(scope="module")
def both():
    built = {level: load_cpu_kernels(level) for level in LEVELS}
    assert all(k is not None for k in built.values())
    return built


def test_each_checkout_builds_in_its_own_folder(monkeypatch, tmp_path):
    """torch keys builds by name alone: a second checkout must not share (and keep rebuilding) this one's."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    here = build_directory("avx2")
    assert here.parent == tmp_path and here.name.startswith(build_name("avx2") + "-")
    assert build_directory("avx2") == here != build_directory("portable")
    monkeypatch.setattr(cpu_kernels, "_SOURCES", ["/another/checkout/csrc/fused.cpp"])
    assert build_directory("avx2") != here


def test_build_is_named_after_its_level(level_kernels):
    level, kernels = level_kernels
    assert build_name(level) == f"tokenmill_cpu_kernels_{level}"
    assert kernels.__name__ == build_name(level)
    assert kernels.cpu_isa() == level
    assert load_cpu_kernels(level) is kernels  # cached


def test_auto_is_the_detected_build():
    assert load_cpu_kernels("auto") is load_cpu_kernels(detect_isa())


def test_kernel_info_reports_the_build():
    info = kernel_info()
    assert info["isa"] == detect_isa() and info["build_name"] == build_name(detect_isa())
    assert info["kernels_loaded"] is True and info["error"] is None
    assert (
        isinstance(info["cpu_model"], str)
        and info["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    )
    assert kernel_info(load=False)["kernels_loaded"] is None


# ---- the kernels agree across levels ----------------------------------------------------------------------
def quant_call(kernels, w, x, fp32_min_rows=0):
    if w.format == "q4":
        return kernels.q4_linear(x, w.codes, w.scales, w.mins, GEMM_MIN_ROWS, GEMM_TILE_BYTES, fp32_min_rows)
    return kernels.q8_linear(x, w.codes, w.scales, GEMM_MIN_ROWS, GEMM_TILE_BYTES, fp32_min_rows)


@pytest.mark.parametrize("fmt", ["q4", "q8"])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, 17, GEMM_MIN_ROWS - 1, GEMM_MIN_ROWS])
@pytest.mark.parametrize("n, k", [(203, 576), (37, 96)])  # odd row counts: the 4-row groups' remainder
@pytest.mark.parametrize(
    "fp32_min_rows", [0, 2]
)  # 2: the fp32 multi-row paths (AVX-512 16-row, AVX2 8-row tiles)
def test_quant_linear_agrees_across_levels(both, fmt, rows, n, k, fp32_min_rows):
    g = torch.Generator().manual_seed(rows * 1000 + n)
    w = quantize(torch.randn(n, k, generator=g) * 0.05, fmt)
    x = torch.randn(rows, k, generator=g)
    ref = x @ dequantize(w).T
    tol = {"rtol": 1e-4, "atol": 1e-4 * ref.abs().max().item()}  # int16 activations: a step of 3e-5
    outs = {level: quant_call(kernels, w, x, fp32_min_rows) for level, kernels in both.items()}
    if fp32_min_rows and 1 < rows < GEMM_MIN_ROWS:  # plain fp32 math: only the summation order differs
        for level in ("avx512", "avx2"):
            if level in outs:
                torch.testing.assert_close(outs[level], ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    for out in outs.values():
        torch.testing.assert_close(out, ref, **tol)
    for out in outs.values():
        torch.testing.assert_close(out, outs["portable"], **tol)
    for level, kernels in both.items():
        dq = (
            kernels.q4_dequantize(w.codes, w.scales, w.mins)
            if fmt == "q4"
            else kernels.q8_dequantize(w.codes, w.scales)
        )
        assert torch.equal(dq, dequantize(w)), level


@needs_two_levels
def test_elementwise_and_attention_kernels_agree_across_levels(both):
    g = torch.Generator().manual_seed(0)
    tol = {"rtol": 1e-5, "atol": 1e-5}
    x, delta, weight = (
        torch.randn(5, 576, generator=g),
        torch.randn(5, 576, generator=g),
        torch.rand(576, generator=g),
    )
    gate_up = torch.randn(5, 2 * 1536, generator=g)
    blocks, hkv, bs, d, b = 12, 3, 16, 64, 3
    k_cache, v_cache = (
        torch.randn(blocks, hkv, bs, d, generator=g),
        torch.randn(blocks, hkv, bs, d, generator=g),
    )
    q = torch.randn(b, 9, d, generator=g)
    tables, lens = torch.randperm(blocks, generator=g)[: b * 4].view(b, 4), torch.tensor([1, 17, 64])
    outs = {}
    for level, kernels in both.items():
        xl = x.clone()
        normed = kernels.add_rms_norm(xl, delta, weight, 1e-5)
        outs[level] = (
            normed,
            xl,
            kernels.silu_mul(gate_up),
            kernels.paged_attention(
                q, k_cache, v_cache, None, None, tables, lens, torch.arange(b + 1), d**-0.5, False
            )[0],
        )
    ref_x = x + delta
    ref_norm = weight * ref_x * torch.rsqrt(ref_x.pow(2).mean(-1, keepdim=True) + 1e-5)
    ref_silu = F.silu(gate_up[:, :1536]) * gate_up[:, 1536:]
    for level, (normed, xl, silu, attn) in outs.items():
        torch.testing.assert_close(xl, ref_x, **tol, msg=level)
        torch.testing.assert_close(normed, ref_norm, **tol, msg=level)
        torch.testing.assert_close(silu, ref_silu, **tol, msg=level)
        torch.testing.assert_close(attn, outs["portable"][3], **tol, msg=level)


# ---- generation -------------------------------------------------------------------------------------------
@needs_two_levels
@pytest.mark.parametrize("weights", ["dense", "q8", "q4"])
def test_greedy_generation_is_identical_at_every_level(tiny_model_dir, both, weights):
    prompts = [{"prompt_token_ids": list(range(50, 50 + n))} for n in (3, 40)]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    tokens = {}
    for level, kernels in both.items():
        llm = LLM(str(tiny_model_dir), kv_cache_memory="32MiB", weights=weights, cpu_isa=level)
        assert llm.engine.runner.model.kernels is kernels
        tokens[level] = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert all(t == tokens["portable"] for t in tokens.values())


def test_env_report_names_the_linear_plan():
    from tokenmill.entrypoints.env_info import env_report, format_report
    from tokenmill.layers.cpu_kernels import cpu_vendor
    from tokenmill.layers.linear import plan_for

    r = env_report(load=False)
    assert r["linear_plan"]["gemm_min_rows"] == plan_for(detect_isa(), cpu_vendor()).gemm_min_rows
    assert f"{r['linear_plan']['gemm_min_rows']}+ rows" in format_report(r)


def test_env_report_names_the_decode_attention_kernel():
    from tokenmill.entrypoints.env_info import env_report, format_report

    r = env_report(load=False)
    line = next(ln for ln in format_report(r).splitlines() if "decode attention" in ln)
    assert ("split-KV" in line) == (r["isa"] != "portable")
