"""Attention backends: the C++ paged kernel and the torch reference agree with plain attention, over ragged
rows of one or several queries; partial attentions merge exactly through their log-sum-exp."""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.kv.cache import (
    LayerKV,
    dequantize_int4,
    dequantize_int8,
    int4_groups,
    quantize_int4,
    quantize_int8,
)
from tokenmill.layers.attention import (
    AttentionRow,
    PagedAttention,
    build_attention_metadata,
    merge_attention,
    sdpa_with_lse,
)
from tokenmill.layers.cpu_kernels import load_cpu_kernels


def reference_rows(q, k_cache, v_cache, tables, seq_lens, qsl, group, scale):
    """Plain causal attention, one query at a time: query j of a row sees keys [0, seq_len - n + j]."""
    outs, lses = [], []
    for b in range(len(seq_lens)):
        s, e = int(qsl[b]), int(qsl[b + 1])
        n, length = e - s, int(seq_lens[b])
        k = k_cache[tables[b]].transpose(0, 1).flatten(1, 2)[:, :length].repeat_interleave(group, 0)
        v = v_cache[tables[b]].transpose(0, 1).flatten(1, 2)[:, :length].repeat_interleave(group, 0)
        for j in range(n):
            vis = length - n + j + 1
            scores = (q[s + j].unsqueeze(1) @ k[:, :vis].transpose(1, 2)).squeeze(1) * scale  # [H, vis]
            lse = torch.logsumexp(scores, -1)
            outs.append((torch.softmax(scores, -1).unsqueeze(1) @ v[:, :vis]).squeeze(1))
            lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


@pytest.fixture
def rows_case():
    g = torch.Generator().manual_seed(0)
    num_blocks, bs, hkv, group, d = 40, 16, 2, 3, 32
    k_cache = torch.randn(num_blocks, hkv, bs, d, generator=g)  # the cache layout: heads, then tokens
    v_cache = torch.randn(num_blocks, hkv, bs, d, generator=g)
    seq_lens = torch.tensor([1, 16, 17, 70, 33])
    query_lens = torch.tensor([1, 4, 1, 5, 16])  # decodes and multi-query (verification) rows
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), query_lens.cumsum(0)])
    tables = torch.randperm(num_blocks, generator=g)[:25].view(5, 5)  # scattered, non-consecutive blocks
    q = torch.randn(int(qsl[-1]), hkv * group, d, generator=g)
    return q, k_cache, v_cache, tables, seq_lens, qsl, group


def test_cpu_kernel_matches_reference_with_lse(rows_case):
    kernels = load_cpu_kernels()
    assert kernels is not None, "the C++ attention kernel failed to build"
    q, k_cache, v_cache, tables, seq_lens, qsl, group = rows_case
    scale = q.shape[-1] ** -0.5
    out, lse = kernels.paged_attention(q, k_cache, v_cache, None, None, tables, seq_lens, qsl, scale, True)
    ref_out, ref_lse = reference_rows(q, k_cache, v_cache, tables, seq_lens, qsl, group, scale)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("query_len", [1, 3])
@pytest.mark.parametrize("cache", ["fp32", "int8", "int4"])
def test_cpu_kernel_splits_long_rows_exactly(threads, query_len, cache):
    """One long row with one KV head: the kernel cuts its keys into chunks (a partial softmax each, merged
    through their maxima) so both threads have work; the result is attention over all of them (over the
    dequantized cache for int8 and int4)."""
    kernels = load_cpu_kernels()
    g = torch.Generator().manual_seed(3)
    bs, d, group, length = 16, 64, 3, 301
    k_cache = torch.randn(24, 1, bs, d, generator=g) * 3  # large logits: the merge must rescale exactly
    v_cache = torch.randn(24, 1, bs, d, generator=g)
    ks = vs = None
    if cache != "fp32":
        (kc, ks), dequantize = _int8(k_cache) if cache == "int8" else _int4(k_cache)
        (vc, vs), _ = _int8(v_cache) if cache == "int8" else _int4(v_cache)
        k_cache, v_cache = dequantize(kc, ks), dequantize(vc, vs)
    else:
        kc, vc = k_cache, v_cache
    tables = torch.randperm(24, generator=g)[:19].view(1, 19)
    seq_lens = torch.tensor([length])
    qsl = torch.tensor([0, query_len])
    q = torch.randn(query_len, group, d, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, lse = kernels.paged_attention(q, kc, vc, ks, vs, tables, seq_lens, qsl, d**-0.5, True)
    finally:
        torch.set_num_threads(before)
    ref_out, ref_lse = reference_rows(q, k_cache, v_cache, tables, seq_lens, qsl, group, d**-0.5)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_torch_paged_path_matches_reference(rows_case):
    q, k_cache, v_cache, tables, seq_lens, qsl, group = rows_case
    h, d = q.shape[1], q.shape[2]
    attn = PagedAttention(h, h // group, d, kernel=None)
    out, lse = attn.paged(q, LayerKV(k_cache, v_cache), tables, seq_lens, qsl, return_lse=True)
    ref_out, ref_lse = reference_rows(q, k_cache, v_cache, tables, seq_lens, qsl, group, d**-0.5)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_merged_partial_attention_equals_attention_over_both():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 7, 16, generator=g)
    k = torch.randn(1, 4, 50, 16, generator=g)
    v = torch.randn(1, 4, 50, 16, generator=g)
    full, full_lse = sdpa_with_lse(q, k, v, causal=False, scale=0.25)
    a, a_lse = sdpa_with_lse(q, k[:, :, :20], v[:, :, :20], causal=False, scale=0.25)
    b, b_lse = sdpa_with_lse(q, k[:, :, 20:], v[:, :, 20:], causal=False, scale=0.25)
    # merge works on [..., H, D] / [..., H]: move heads next to last
    out, lse = merge_attention(
        a.transpose(1, 2), a_lse.transpose(1, 2), b.transpose(1, 2), b_lse.transpose(1, 2)
    )
    torch.testing.assert_close(out, full.transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse.transpose(1, 2), atol=1e-5, rtol=1e-5)
    # an empty part (lse = -inf) leaves the other unchanged
    empty_lse = torch.full_like(a_lse, float("-inf"))
    out, lse = merge_attention(
        a.transpose(1, 2),
        a_lse.transpose(1, 2),
        torch.zeros_like(a).transpose(1, 2),
        empty_lse.transpose(1, 2),
    )
    torch.testing.assert_close(out, a.transpose(1, 2))


@pytest.mark.parametrize("kernel", [False, True])
def test_long_chunk_over_cached_prefix_matches_reference(kernel):
    """A prompt chunk of 40 queries after 30 cached slots (SDPA over the prefix, causal over itself, merged)."""
    g = torch.Generator().manual_seed(2)
    bs, hkv, group, d = 16, 2, 3, 32
    k_cache = torch.randn(10, hkv, bs, d, generator=g)
    v_cache = torch.randn(10, hkv, bs, d, generator=g)
    table = [7, 2, 9, 4, 5]
    n, cached = 40, 30
    meta = build_attention_metadata([AttentionRow(n, cached + n, table)], bs, torch.device("cpu"))
    assert meta.num_paged_rows == 0  # a long chunk: the SDPA path
    q = torch.randn(n, hkv * group, d, generator=g)
    slots = meta.slot_mapping  # the chunk's own keys, as the model would have written them
    k_new = k_cache[slots // bs, :, slots % bs]
    v_new = v_cache[slots // bs, :, slots % bs]
    attn = PagedAttention(hkv * group, hkv, d, kernel=load_cpu_kernels().paged_attention if kernel else None)
    out, lse = attn(q, k_new, v_new, LayerKV(k_cache, v_cache), meta, return_lse=True)
    qsl = torch.tensor([0, n])
    ref_out, ref_lse = reference_rows(
        q, k_cache, v_cache, torch.tensor([table]), torch.tensor([cached + n]), qsl, group, d**-0.5
    )
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_metadata_slots_come_from_held_slots_not_positions():
    """A row's new tokens go after the slots it holds, through its block table."""
    meta = build_attention_metadata(
        [AttentionRow(1, 5, [3]), AttentionRow(3, 18, [8, 1])], block_size=16, device=torch.device("cpu")
    )
    assert meta.slot_mapping.tolist() == [3 * 16 + 4, 8 * 16 + 15, 1 * 16 + 0, 1 * 16 + 1]
    assert meta.query_start_loc.tolist() == [0, 1, 4]
    assert meta.num_paged_rows == 2


def test_engine_outputs_equal_with_torch_and_cpp_kernels(tiny_model_dir):
    """Kernel choice by config, both in one process: same greedy tokens."""
    prompts = [{"prompt_token_ids": list(range(50, 50 + n))} for n in (3, 40, 90)]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    cpp = LLM(str(tiny_model_dir), kv_cache_memory="32MiB", kernels="cpp")
    torch_ = LLM(str(tiny_model_dir), kv_cache_memory="32MiB", kernels="torch")
    assert cpp.engine.runner.model.ops.name == "cpp" and cpp.engine.runner.model.attention.kernel is not None
    assert (
        torch_.engine.runner.model.ops.name == "torch" and torch_.engine.runner.model.attention.kernel is None
    )
    with_kernel = [o.token_ids for o in cpp.generate(prompts, params, use_tqdm=False)]
    without = [o.token_ids for o in torch_.generate(prompts, params, use_tqdm=False)]
    assert with_kernel == without


def test_bad_kernel_choice_is_a_clear_error():
    from tokenmill.config import EngineConfig

    with pytest.raises(ValueError, match="kernels must be one of"):
        EngineConfig(kernels="fast")


# ---- int8 KV blocks ---------------------------------------------------------------------------------------
def test_int8_quantization_error_is_within_half_a_step():
    x = torch.randn(50, 3, 64, generator=torch.Generator().manual_seed(3)) * 4
    codes, scale = quantize_int8(x)
    assert codes.dtype == torch.int8 and scale.shape == (50, 3)
    err = (dequantize_int8(codes, scale) - x).abs()
    assert bool((err <= scale.unsqueeze(-1) / 2 + 1e-6).all())
    zeros_codes, zeros_scale = quantize_int8(torch.zeros(2, 8))
    assert zeros_codes.abs().sum() == 0 and zeros_scale.abs().sum() == 0


def _int8(x):
    return quantize_int8(x), dequantize_int8


def _int4(x):
    return quantize_int4(x, int4_groups(x.shape[-1])), dequantize_int4


@pytest.mark.parametrize("fmt", [_int8, _int4], ids=["int8", "int4"])
@pytest.mark.parametrize("kernel", [True, False])
def test_quantized_paged_attention_reads_packed_blocks(rows_case, kernel, fmt):
    """The packed kernel equals plain attention over the dequantized cache."""
    q, k_cache, v_cache, tables, seq_lens, qsl, group = rows_case
    (kc, ks), dequantize = fmt(k_cache)
    (vc, vs), _ = fmt(v_cache)
    h, d = q.shape[1], q.shape[2]
    attn = PagedAttention(h, h // group, d, kernel=load_cpu_kernels().paged_attention if kernel else None)
    out, lse = attn.paged(q, LayerKV(kc, vc, ks, vs), tables, seq_lens, qsl, return_lse=True)
    ref_out, ref_lse = reference_rows(
        q, dequantize(kc, ks), dequantize(vc, vs), tables, seq_lens, qsl, group, d**-0.5
    )
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def test_int8_quantize_on_write_matches_the_torch_quantizer():
    """The fused rotary + KV write quantizes exactly as kv/cache.py does (codes may differ by one step where
    x / scale lands on a rounding tie under different division rounding)."""
    kernels = load_cpu_kernels()
    g = torch.Generator().manual_seed(4)
    t, h, hkv, d, bs = 7, 6, 2, 32, 4
    qkv = torch.randn(t, (h + 2 * hkv) * d, generator=g)
    cos, sin = torch.ones(t, d // 2), torch.zeros(t, d // 2)  # identity rotation
    slots = torch.tensor([0, 5, 6, 9, 3, -1, 12])
    kc = torch.zeros(4, hkv, bs, d, dtype=torch.int8)
    vc = torch.zeros_like(kc)
    ks, vs = torch.zeros(4, hkv, bs), torch.zeros(4, hkv, bs)
    expected = LayerKV(kc.clone(), vc.clone(), ks.clone(), vs.clone())
    keys = qkv[:, h * d : (h + hkv) * d].reshape(t, hkv, d).clone()
    values = qkv[:, (h + hkv) * d :].reshape(t, hkv, d).clone()
    expected.write(keys, values, slots)
    kernels.rope_kv_write(qkv, cos, sin, kc, vc, ks, vs, slots, h, hkv)
    torch.testing.assert_close(ks, expected.k_scale)
    torch.testing.assert_close(vs, expected.v_scale)
    assert (kc.int() - expected.k.int()).abs().max() <= 1
    assert (vc.int() - expected.v.int()).abs().max() <= 1


# ---- int4 KV blocks ---------------------------------------------------------------------------------------
def test_int4_quantization_error_is_within_half_a_step():
    x = torch.randn(50, 3, 64, generator=torch.Generator().manual_seed(5)) * 4
    groups = int4_groups(64)
    packed, sm = quantize_int4(x, groups)
    assert packed.dtype == torch.uint8 and packed.shape == (50, 3, 32) and sm.shape == (50, 3, 2, 2)
    err = (dequantize_int4(packed, sm) - x).abs().view(50, 3, groups, -1)
    step = sm[..., 0].float().unsqueeze(-1)
    assert bool((err <= step / 2 + 2e-3 * x.abs().max()).all())  # + the fp16 rounding of min
    assert int4_groups(16) == 2 and int4_groups(128) == 4


def test_int4_quantize_on_write_matches_the_torch_quantizer():
    kernels = load_cpu_kernels()
    g = torch.Generator().manual_seed(6)
    t, h, hkv, d, bs = 7, 6, 2, 64, 4
    groups = int4_groups(d)
    qkv = torch.randn(t, (h + 2 * hkv) * d, generator=g)
    cos, sin = torch.ones(t, d // 2), torch.zeros(t, d // 2)
    slots = torch.tensor([0, 5, 6, 9, 3, -1, 12])
    kc = torch.zeros(4, hkv, bs, d // 2, dtype=torch.uint8)
    vc = torch.zeros_like(kc)
    ks = torch.zeros(4, hkv, bs, groups, 2, dtype=torch.float16)
    vs = torch.zeros_like(ks)
    expected = LayerKV(kc.clone(), vc.clone(), ks.clone(), vs.clone())
    keys = qkv[:, h * d : (h + hkv) * d].reshape(t, hkv, d).clone()
    values = qkv[:, (h + hkv) * d :].reshape(t, hkv, d).clone()
    expected.write(keys, values, slots)
    kernels.rope_kv_write(qkv, cos, sin, kc, vc, ks, vs, slots, h, hkv)
    torch.testing.assert_close(ks, expected.k_scale)
    torch.testing.assert_close(vs, expected.v_scale)
    got = dequantize_int4(kc, ks)
    want = dequantize_int4(expected.k, expected.k_scale)
    step = ks[..., 0].float().repeat_interleave(d // groups, dim=-1)
    assert bool(((got - want).abs() <= step + 1e-6).all())  # codes equal, or one step apart on a tie
