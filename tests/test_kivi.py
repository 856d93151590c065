"""KIVI KV formats (kivi2, kivi4): quantizer error bounds, the write plan (seal on fill, residual blocks, unseal),
the fused C++ write against the torch one, the packed paged kernel against dequantize + plain attention, and the
engine end to end (capacity, closeness to the full cache, eviction, speculative decoding, n > 1)."""

from __future__ import annotations

import pytest
import torch
from test_attention import reference_rows
from test_seams import PROMPTS, _runner_sequence
from test_spec import NGRAM, speculating

from tokenmill import LLM, SamplingParams
from tokenmill.engine.scheduler import ScheduledBatch, ScheduledSeq
from tokenmill.kv.cache import KVCache, KVCacheSpec, dequantize_int4, int4_groups, quantize_int4
from tokenmill.kv.kivi import (
    KiviState,
    KiviWindow,
    dequantize_keys,
    dequantize_values,
    kivi_value_group,
    pack_codes,
    quantize_keys,
    quantize_values,
    unpack_codes,
)
from tokenmill.layers.attention import PagedAttention
from tokenmill.layers.cpu_kernels import ISA_LEVELS, load_cpu_kernels, supported_isas

BITS = [2, 4]
CPU = torch.device("cpu")


# ---- quantizers -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(
        0, 1 << bits, (5, 3, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    packed = pack_codes(codes, bits)
    assert packed.shape == (5, 3, 64 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("bits", BITS)
def test_key_quantization_is_per_channel_within_half_a_step(bits):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 16, 64, generator=g)  # [blocks, heads, block tokens, channels]
    x[..., 5] *= 40  # an outlier channel: per-channel scales keep it from spoiling the others
    packed, stats = quantize_keys(x, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 3, 16, 64 * bits // 8)
    assert stats.dtype == torch.float16 and stats.shape == (6, 3, 64, 2)
    err = (dequantize_keys(packed, stats, bits) - x).abs()
    step = stats[..., 0].float().unsqueeze(-2)  # [.., 1, D]: each channel's own step
    assert bool((err <= step / 2 + 2e-3 * x.abs().amax(dim=-2, keepdim=True)).all())  # + fp16 rounding of min
    others = torch.cat([err[..., :5], err[..., 6:]], dim=-1)
    assert float(others.max()) < float(err[..., 5].max()) / 5  # the outlier's error stays in its channel


@pytest.mark.parametrize("bits", BITS)
def test_value_quantization_is_per_token_group_within_half_a_step(bits):
    x = torch.randn(50, 3, 64, generator=torch.Generator().manual_seed(2)) * 4
    group = kivi_value_group(64, bits)
    assert group == 32
    packed, stats = quantize_values(x, bits, group)
    assert stats.shape == (50, 3, 2, 2)
    err = (dequantize_values(packed, stats, bits) - x).abs().view(50, 3, 2, group)
    step = stats[..., 0].float().unsqueeze(-1)
    assert bool((err <= step / 2 + 2e-3 * x.abs().max()).all())
    zero_packed, zero_stats = quantize_values(torch.zeros(2, 32), bits, group)
    assert float(dequantize_values(zero_packed, zero_stats, bits).abs().max()) == 0


def test_head_dims_the_format_cannot_pack_are_a_clear_error():
    with pytest.raises(ValueError, match="kivi2 needs head_dim divisible by 4"):
        KVCacheSpec(1, 1, 6, 16, torch.float32, "kivi2")
    assert kivi_value_group(16, 2) == 16 and kivi_value_group(128, 4) == 32 and kivi_value_group(96, 2) == 8


def test_bytes_per_block_count_codes_and_stats():
    spec = KVCacheSpec(30, 3, 64, 16, torch.float32, "kivi2")
    per_head = 2 * 16 * 64 * 2 // 8 + 4 * 64 + 4 * 16 * 2  # codes K and V, key stats per channel, value stats
    assert spec.bytes_per_block == 30 * 3 * per_head
    assert spec.bytes_per_token == spec.bytes_per_block // 16
    fp32 = KVCacheSpec(30, 3, 64, 16, torch.float32)
    rb = spec.residual_block_bytes
    assert rb == fp32.bytes_per_block // 2  # the residual is fp16 for fp32 activations
    assert spec.blocks_for_memory(2**30, 10) == (2**30 - 10 * rb) // spec.bytes_per_block
    assert spec.residual_blocks_for(2**30, 128) == 128
    assert spec.residual_blocks_for(4 * 5 * rb, 128) == 5  # within 1/4 of the budget
    assert fp32.residual_blocks_for(2**30, 128) == 0
    # a window of 40 tokens (3 blocks) and 1 sink token (1 block): 5 residual blocks per sequence, whole ones
    windowed = KVCacheSpec(30, 3, 64, 16, torch.float32, "kivi2", kivi_window=40, kivi_sinks=1)
    assert windowed.kivi_window_blocks == KiviWindow(3, 1) and KiviWindow(3, 1).blocks_per_seq == 5
    assert windowed.residual_blocks_for(2**30, 7) == 35
    assert windowed.residual_blocks_for(4 * 12 * rb, 128) == 10  # 2 sequences' worth
    assert windowed.residual_blocks_for(4 * rb, 128) == 5  # at least one sequence's
    with pytest.raises(ValueError, match="kivi_window must be a number of tokens >= 0"):
        KVCacheSpec(30, 3, 64, 16, torch.float32, "kivi2", kivi_window=-1)


# ---- the write plan --------------------------------------------------------------------------------------
def test_plan_seals_full_blocks_and_keeps_the_filling_one_open():
    state = KiviState(num_blocks=8, num_residual=2, block_size=4, device=CPU)
    # a 6-token prompt into blocks 3, 5: block 3 seals from the tokens, block 5 opens
    plan = state.plan_writes(torch.tensor([12, 13, 14, 15, 20, 21]))
    assert plan.seal_blocks.tolist() == [3] and plan.seal_src.tolist() == [[0, 1, 2, 3]]
    r = state.open[5]
    assert plan.res_rows.tolist() == [-1, -1, -1, -1, r * 4, r * 4 + 1]
    assert state.open_slot.tolist() == [-1] * 5 + [r, -1, -1]
    # two decode tokens fill block 5: it seals from its residual rows and this step's tokens
    plan = state.plan_writes(torch.tensor([22, 23]))
    assert plan.seal_blocks.tolist() == [5]
    assert plan.seal_src.tolist() == [[-(r * 4) - 1, -(r * 4 + 1) - 1, 0, 1]]
    assert state.open == {} and len(state.free) == 2 and int(state.open_slot.max()) == -1
    # a rewrite below the end of a sealed block (a rolled-back tail) unseals it first
    plan = state.plan_writes(torch.tensor([14]))
    assert plan.unseal_blocks.tolist() == [3] and plan.unseal_res.tolist() == [state.open[3]]
    # a freed block gives its residual back; the pool running dry is a clear error
    state.release(3)
    state.plan_writes(torch.tensor([0, 8]))
    with pytest.raises(RuntimeError, match="residual blocks of the KIVI cache are in use"):
        state.plan_writes(torch.tensor([24]))


def test_a_layer_writing_an_unplanned_step_is_a_clear_error():
    cache = KVCache(KVCacheSpec(1, 1, 8, 4, torch.float32, "kivi4"), 4, CPU, residual_blocks=2)
    k = torch.randn(2, 1, 8)
    with pytest.raises(RuntimeError, match="prepare_write"):
        cache.write(0, k, k, torch.tensor([0, 1]))


def _write_steps(cache: KVCache, steps, use_cpp: bool, h: int, hkv: int, d: int, seed: int = 3, seqs=None):
    """Write each step's tokens (random q/k/v, identity rotation) to every layer through the C++ fused write or
    the torch one; returns the keys and values written, by slot. `seqs`: per step, the window's sequences."""
    g = torch.Generator().manual_seed(seed)
    kernels = load_cpu_kernels()
    written = {}
    for n, slots in enumerate(steps):
        slots = torch.tensor(slots)
        t = slots.numel()
        cache.prepare_write(slots, seqs[n] if seqs else ())
        for i in range(cache.spec.num_layers):
            qkv = torch.randn(t, (h + 2 * hkv) * d, generator=g)
            k = qkv[:, h * d : (h + hkv) * d].reshape(t, hkv, d).clone()
            v = qkv[:, (h + hkv) * d :].reshape(t, hkv, d).clone()
            kv = cache.layer(i)
            if use_cpp:
                plan = kv.state.plan_for(slots)
                kv.unseal(slots)
                cos, sin = torch.ones(t, d // 2), torch.zeros(t, d // 2)
                kernels.rope_kivi_write(
                    qkv, cos, sin, kv.k, kv.v, kv.k_scale, kv.v_scale, kv.res_k, kv.res_v, plan.res_rows,
                    plan.seal_blocks, plan.seal_src, h, hkv, kv.kivi_bits,
                )  # fmt: skip
            else:
                kv.write(k, v, slots)
            for j, s in enumerate(slots.tolist()):
                written[(i, s)] = (k[j], v[j])
    return written


STEPS = [list(range(8, 8 + 4)) + list(range(20, 20 + 3)), [23], [24, 25], list(range(26, 32)) + [4, 5]]


@pytest.mark.parametrize("bits", BITS)
def test_cpp_write_matches_the_torch_write(bits):
    """Same plan, same codes: the fused C++ seal and residual writes equal kv/kivi.py's (codes may differ by
    one step where a value lands on a rounding tie)."""
    h, hkv, d, bs = 4, 2, 16, 4
    spec = KVCacheSpec(2, hkv, d, bs, torch.float32, f"kivi{bits}")
    caches = [KVCache(spec, 10, CPU, residual_blocks=3) for _ in range(2)]
    for cache, cpp in zip(caches, (True, False), strict=True):
        _write_steps(cache, STEPS, cpp, h, hkv, d)
    a, b = caches
    assert torch.equal(a.kivi.open_slot, b.kivi.open_slot)
    torch.testing.assert_close(a.key_stats, b.key_stats)
    torch.testing.assert_close(a.scales, b.scales)
    torch.testing.assert_close(a.residual, b.residual)
    diff = (unpack_codes(a.data, bits).int() - unpack_codes(b.data, bits).int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01


@pytest.mark.parametrize("bits", BITS)
def test_written_tokens_read_back_within_the_quantization_step(bits):
    """Tokens of sealed blocks read back within half a step of their channel (keys) or group (values); tokens
    of the block still filling read back as stored: rounded to the residual's fp16 (fp32 activations)."""
    h, hkv, d, bs = 4, 2, 16, 4
    cache = KVCache(KVCacheSpec(1, hkv, d, bs, torch.float32, f"kivi{bits}"), 10, CPU, residual_blocks=3)
    written = _write_steps(cache, STEPS, True, h, hkv, d)
    kv = cache.layer(0)
    keys, values = kv.blocks(torch.arange(10), torch.float32)  # [blocks, Hkv, bs, D]
    for (_, slot), (k, v) in written.items():
        blk, off = divmod(slot, bs)
        got_k, got_v = keys[blk, :, off], values[blk, :, off]
        if int(cache.kivi.open_slot[blk]) >= 0:
            assert cache.residual.dtype == torch.float16  # half the bytes of fp32 activations
            assert blk == 1 and torch.equal(got_k, k.half().float()) and torch.equal(got_v, v.half().float())
        else:
            kstep = kv.k_scale[blk, :, :, 0].float()  # [Hkv, D]
            assert bool(((got_k - k).abs() <= kstep / 2 + 1e-2).all())
            vstep = kv.v_scale[blk, :, off, :, 0].float().repeat_interleave(d // kv.v_scale.shape[-2], -1)
            assert bool(((got_v - v).abs() <= vstep / 2 + 1e-2).all())
    assert cache.kivi.open.keys() == {1}


def test_window_keeps_the_sinks_and_the_newest_full_blocks_open():
    state = KiviState(num_blocks=10, num_residual=6, block_size=4, device=CPU, window=KiviWindow(1, 1))
    table = [3, 5, 7, 9]
    # a 10-token prompt: block 3 is the sink, block 5 the window, block 7 fills: nothing seals
    plan = state.plan_writes(torch.tensor([12, 13, 14, 15, 20, 21, 22, 23, 28, 29]), [(table, 10)])
    assert plan.seal_blocks.numel() == 0 and state.open.keys() == {3, 5, 7} and state.full == {3, 5}
    r5 = state.open[5]
    # block 7 fills: the window moves onto it, and block 5, left behind, seals from its residual
    plan = state.plan_writes(torch.tensor([30, 31]), [(table, 12)])
    assert plan.seal_blocks.tolist() == [5]
    assert plan.seal_src.tolist() == [[-(r5 * 4 + o) - 1 for o in range(4)]]
    assert state.open.keys() == {3, 7} and state.full == {3, 7} and int(state.open_slot[5]) == -1
    # a step of another sequence leaves this one's blocks alone; a block freed while open gives its residual back
    plan = state.plan_writes(torch.tensor([0]), [([0], 1)])
    assert plan.seal_blocks.numel() == 0 and state.open.keys() == {0, 3, 7}
    state.release(3)
    assert state.open.keys() == {0, 7} and state.full == {7} and len(state.free) == 4
    # a rolled-back tail rewritten inside a full open block leaves it open, no longer full
    plan = state.plan_writes(torch.tensor([29]), [(table, 10)])
    assert plan.unseal_blocks.numel() == 0 and state.full == set() and 7 in state.open


@pytest.mark.parametrize("cpp", [True, False])
def test_window_writes_agree_and_freed_blocks_read_back_sealed(cpp):
    """With a window, the C++ and torch writes keep the same blocks open, and a full block freed while open is
    sealed (a prefix-cache hit reads its codes): it reads back within the quantization step."""
    h, hkv, d, bs = 4, 2, 16, 4
    spec = KVCacheSpec(2, hkv, d, bs, torch.float32, "kivi2", kivi_window=4, kivi_sinks=4)
    table = [2, 4, 6, 8, 9]
    steps = [list(range(8, 12)) + list(range(16, 20)) + [24, 25], [26], [27], [32, 33, 34, 35, 36]]
    seqs = [[(table, 10)], [(table, 11)], [(table, 12)], [(table, 17)]]
    caches = [KVCache(spec, 10, CPU, residual_blocks=3) for _ in range(2)]
    written = [
        _write_steps(c, steps, use, h, hkv, d, seqs=seqs) for c, use in zip(caches, (cpp, False), strict=True)
    ]
    a, b = caches
    assert a.kivi.open.keys() == {2, 8, 9} and a.kivi.full == {2, 8}  # sink, window, filling; 4 and 6 sealed
    assert torch.equal(a.kivi.open_slot, b.kivi.open_slot)
    torch.testing.assert_close(a.residual, b.residual)
    for block in (2, 8):
        a.release_block(block)
    assert a.kivi.open.keys() == {9}
    kv = a.layer(1)
    keys, values = kv.blocks(torch.tensor([2, 8]), torch.float32)
    for i, blk in enumerate((2, 8)):
        kstep = kv.k_scale[blk, :, :, 0].float()
        for off in range(bs):
            k, v = written[0][(1, blk * bs + off)]
            assert bool(((keys[i, :, off] - k).abs() <= kstep / 2 + 1e-2).all())
            vstep = kv.v_scale[blk, :, off, :, 0].float().repeat_interleave(d // kv.v_scale.shape[-2], -1)
            assert bool(((values[i, :, off] - v).abs() <= vstep / 2 + 1e-2).all())


# ---- the packed attention kernel --------------------------------------------------------------------------
def _kivi_rows_case(bits: int, d: int = 32):
    """A KIVI layer with sealed and open blocks, scattered block tables, decode and multi-query rows; with the
    same cache dequantized (open blocks: their residuals) for the reference."""
    g = torch.Generator().manual_seed(7)
    num_blocks, bs, hkv, group = 40, 16, 2, 3
    spec = KVCacheSpec(1, hkv, d, bs, torch.float32, f"kivi{bits}")
    cache = KVCache(spec, num_blocks, CPU, residual_blocks=8)
    kv = cache.layer(0)
    k_full = torch.randn(num_blocks, hkv, bs, d, generator=g)
    k_full[..., 3] += 6  # a channel offset, as real keys have
    v_full = torch.randn(num_blocks, hkv, bs, d, generator=g)
    kv.seal(torch.arange(num_blocks), k_full, v_full)
    open_blocks = [5, 11, 17, 30]  # the tail blocks of some rows are still filling: full precision
    for r, b in enumerate(open_blocks):
        cache.kivi.open[b] = r
        cache.kivi.open_slot[b] = r
        kv.res_k[r], kv.res_v[r] = k_full[b], v_full[b]
    k_ref, v_ref = kv.blocks(torch.arange(num_blocks), torch.float32)
    k_deq = dequantize_keys(kv.k, kv.k_scale, bits)
    assert torch.equal(k_ref[5], k_full[5].half().float()) and torch.equal(k_ref[0], k_deq[0])
    tables = torch.randperm(num_blocks, generator=g)[:25].view(5, 5)
    tables[1, 0], tables[3, 4], tables[4, 2], tables[2, 1] = 5, 11, 17, 30
    seq_lens = torch.tensor([1, 16, 17, 70, 33])
    query_lens = torch.tensor([1, 4, 1, 5, 16])
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), query_lens.cumsum(0)])
    q = torch.randn(int(qsl[-1]), hkv * group, d, generator=g)
    return q, kv, k_ref, v_ref, tables, seq_lens, qsl, group


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kernel", [True, False])
def test_kivi_paged_attention_equals_dequantize_then_attend(bits, kernel):
    q, kv, k_ref, v_ref, tables, seq_lens, qsl, group = _kivi_rows_case(bits)
    h, d = q.shape[1], q.shape[2]
    kernels = load_cpu_kernels()
    attn = PagedAttention(h, h // group, d, kivi_kernel=kernels.kivi_paged_attention if kernel else None)
    out, lse = attn.paged(q, kv, tables, seq_lens, qsl, return_lse=True)
    ref_out, ref_lse = reference_rows(q, k_ref, v_ref, tables, seq_lens, qsl, group, d**-0.5)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


LEVELS = [lv for lv in ISA_LEVELS if lv in supported_isas()]  # every code path this CPU runs


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("fmt", ["int4", "kivi4", "kivi2"])
def test_packed_kernels_equal_dequantize_then_attend_at_every_level(level, fmt):
    """The row decode's AVX-512, AVX2 and scalar paths (head_dim 48: vector loops and scalar tails)."""
    kernels = load_cpu_kernels(level)
    assert kernels is not None and kernels.cpu_isa() == level
    if fmt == "int4":
        q, k_cache, v_cache, tables, seq_lens, qsl, group = _kivi_rows_case(4, d=48)[:1] + _int4_case(48)
        (kc, ks), (vc, vs) = (quantize_int4(x, int4_groups(48)) for x in (k_cache, v_cache))
        out, lse = kernels.paged_attention(q, kc, vc, ks, vs, tables, seq_lens, qsl, 48**-0.5, True)
        k_ref, v_ref = dequantize_int4(kc, ks), dequantize_int4(vc, vs)
    else:
        q, kv, k_ref, v_ref, tables, seq_lens, qsl, group = _kivi_rows_case(int(fmt[-1]), d=48)
        attn = PagedAttention(q.shape[1], q.shape[1] // group, 48, kivi_kernel=kernels.kivi_paged_attention)
        out, lse = attn.paged(q, kv, tables, seq_lens, qsl, return_lse=True)
    ref_out, ref_lse = reference_rows(q, k_ref, v_ref, tables, seq_lens, qsl, group, 48**-0.5)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def _int4_case(d: int):
    _, kv, k_ref, v_ref, tables, seq_lens, qsl, group = _kivi_rows_case(4, d)
    return k_ref, v_ref, tables, seq_lens, qsl, group


def test_kivi_kernel_adds_attention_scores_like_the_torch_path():
    q, kv, _, _, tables, seq_lens, qsl, group = _kivi_rows_case(2)
    h, d = q.shape[1], q.shape[2]
    score_from = torch.tensor([0, 2, -1, 0, 10])
    sinks = []
    for kernel in (load_cpu_kernels().kivi_paged_attention, None):
        sink = torch.zeros(5, h // group, 80)
        PagedAttention(h, h // group, d, kivi_kernel=kernel).paged(
            q, kv, tables, seq_lens, qsl, False, sink, score_from
        )
        sinks.append(sink)
    torch.testing.assert_close(sinks[0], sinks[1], atol=1e-5, rtol=1e-5)
    assert float(sinks[0][2].abs().sum()) == 0 and float(sinks[0][0].sum()) > 0


# ---- moves (eviction) --------------------------------------------------------------------------------------
def test_moves_into_sealed_and_open_blocks_keep_the_token():
    h, hkv, d, bs = 4, 2, 16, 4
    cache = KVCache(KVCacheSpec(2, hkv, d, bs, torch.float32, "kivi4"), 10, CPU, residual_blocks=3)
    written = _write_steps(
        cache, [list(range(0, 14))], True, h, hkv, d
    )  # blocks 0..2 sealed, 3 open (2 tokens)
    table = [0, 1, 2, 3]
    layer, head = torch.tensor([0, 1, 1]), torch.tensor([1, 0, 1])
    src, dst = (
        torch.tensor([13, 12, 9]),
        torch.tensor([2, 5, 12]),
    )  # open -> sealed, open -> sealed, sealed -> open
    before = [cache.layer(i).blocks(torch.arange(4), torch.float32) for i in range(2)]
    cache.move_per_head(table, layer, head, src, dst)
    after = [cache.layer(i).blocks(torch.arange(4), torch.float32) for i in range(2)]
    for li, hi, s, t in zip(layer.tolist(), head.tolist(), src.tolist(), dst.tolist(), strict=True):
        if s >= 12:  # from the open block (exact) into a sealed one: within half a step of its new stats
            k_true, v_true = written[(li, s)][0][hi], written[(li, s)][1][hi]
            kv, blk, off = cache.layer(li), t // bs, t % bs
            kstep = kv.k_scale[blk, hi, :, 0].float()
            vstep = kv.v_scale[blk, hi, off, :, 0].float().repeat_interleave(d // kv.v_scale.shape[-2])
            assert bool(((after[li][0][blk, hi, off] - k_true).abs() <= kstep / 2 + 1e-2).all())
            assert bool(((after[li][1][blk, hi, off] - v_true).abs() <= vstep / 2 + 1e-2).all())
    # an untouched head of a requantized block keeps its values exactly
    torch.testing.assert_close(after[0][0][0, 0], before[0][0][0, 0], atol=0, rtol=0)
    # a move into the open block copies the dequantized source, as the fp16 residual stores it
    torch.testing.assert_close(after[1][0][3, 1, 0], before[1][0][2, 1, 1].half().float(), atol=0, rtol=0)


# ---- the engine ----------------------------------------------------------------------------------------------
def _logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    seq = _runner_sequence([0, 1, 2], ids[:30])
    llm.engine.runner.execute(ScheduledBatch([ScheduledSeq(seq, 30)]))
    seq.num_computed_tokens, seq.token_ids = 30, list(ids)
    return llm.engine.runner.execute(ScheduledBatch([ScheduledSeq(seq, 10, extra_logits=9)])).logits


@pytest.mark.parametrize("fmt, max_rel", [("kivi4", 0.08), ("kivi2", 0.3)])
def test_kivi_admits_more_tokens_and_stays_close(tiny_model_dir, fmt, max_rel):
    full = LLM(str(tiny_model_dir), kv_cache_memory="8MiB", kernels="cpp")
    kivi = LLM(str(tiny_model_dir), kv_cache_memory="8MiB", kernels="cpp", kv_cache_dtype=fmt)
    spec = kivi.engine.kv_spec
    residual = kivi.engine.runner.kv_cache.kivi.num_residual
    per_seq = spec.kivi_window_blocks.blocks_per_seq  # the block filling, the window's and the sinks'
    assert per_seq == 1 + 64 // 16 + 1  # the defaults: a 64-token window, 16 sink tokens, 16-token blocks
    seqs = min(128, 8 * 2**20 // 4 // spec.residual_block_bytes // per_seq)
    assert residual == per_seq * kivi.engine.max_num_seqs == per_seq * seqs
    want = (8 * 2**20 - residual * spec.residual_block_bytes) // spec.bytes_per_block
    assert kivi.engine.block_manager.num_blocks == want > full.engine.block_manager.num_blocks
    assert kivi.engine.runner.kv_cache.nbytes <= 8 * 2**20
    assert kivi.engine.block_manager.root_hash != full.engine.block_manager.root_hash
    ids = [(5 * i) % 700 + 3 for i in range(40)]
    a, b = _logits(full, ids), _logits(kivi, ids)
    assert 0 < float((a - b).norm() / a.norm()) < max_rel


@pytest.mark.parametrize("fmt", ["kivi4", "kivi2"])
def test_kivi_torch_and_cpp_paths_generate_the_same_tokens(tiny_model_dir, fmt):
    """Prompts of 5, 37, 70 tokens in 32-token chunks (block ends inside chunks and between steps), greedy."""
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outs = []
    for kernels in ("cpp", "torch"):
        llm = LLM(str(tiny_model_dir), kv_cache_memory="8MiB", kernels=kernels, kv_cache_dtype=fmt)
        llm.engine.scheduler.max_num_batched_tokens = 32
        outs.append([o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)])
        assert llm.engine.runner.kv_cache.kivi.open == {}  # every finished sequence gave its residual back
    assert outs[0] == outs[1] and all(len(t) == 24 for t in outs[0])


def test_kivi_first_tokens_follow_the_full_cache(tiny_model_dir):
    """Greedy on a random tiny model: kivi4's first generated token of each prompt equals the full cache's, and
    its logits track them (sequences diverge later, as with int4)."""
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    runs = []
    for fmt in ("auto", "kivi4"):
        llm = LLM(str(tiny_model_dir), kv_cache_memory="8MiB", kernels="cpp", kv_cache_dtype=fmt)
        runs.append([o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)])
    assert [t[0] for t in runs[0]] == [t[0] for t in runs[1]]
    assert sum(a == b for x, y in zip(*runs, strict=True) for a, b in zip(x, y, strict=True)) >= 8


@pytest.mark.parametrize("policy", ["h2o:budget=24,recent=8", "streaming:sinks=4,window=20"])
def test_kivi_with_eviction_torch_and_cpp_agree(tiny_model_dir, policy):
    """Evicting policies move kept tokens per head into sealed blocks (requantized) and open ones."""
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, kv_policy=policy)
    outs = []
    for kernels in ("cpp", "torch"):
        llm = LLM(
            str(tiny_model_dir), kv_cache_memory="8MiB", kernels=kernels, kv_cache_dtype="kivi4", block_size=8
        )
        outs.append([o.outputs[0].token_ids for o in llm.generate(PROMPTS[1:], params, use_tqdm=False)])
        assert llm.engine.kv_compressor.stats.evictions > 0
        assert llm.engine.runner.kv_cache.kivi.open == {}
    assert outs[0] == outs[1]


def test_kivi_with_speculative_decoding_and_n_siblings(tiny_model_dir, monkeypatch):
    """Drafts that are partly rejected roll back slots of blocks the verification sealed (the rewrite unseals
    them); n > 1 siblings copy a shared block that is still filling (copy-on-write of its residual). The C++
    and torch paths agree on both."""
    counts = {"unseal": 0, "copy": 0}
    plan_writes, open_copy = KiviState.plan_writes, KiviState.open_copy

    def counting_plan(self, slot_mapping, seqs=()):
        plan = plan_writes(self, slot_mapping, seqs)
        counts["unseal"] += plan.unseal_blocks.numel()
        return plan

    def counting_copy(self, src, dst):
        r = open_copy(self, src, dst)
        counts["copy"] += r is not None
        return r

    monkeypatch.setattr(KiviState, "plan_writes", counting_plan)
    monkeypatch.setattr(KiviState, "open_copy", counting_copy)
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=3, n=3, ignore_eos=True)
    # no window: every block seals as it fills, so rolled-back drafts rewrite sealed blocks
    kw = dict(kv_cache_memory="8MiB", kv_cache_dtype="kivi4", block_size=8, kivi_window=0, kivi_sinks=0)
    plain = LLM(str(tiny_model_dir), kernels="cpp", **kw).generate(PROMPTS, greedy, use_tqdm=False)
    outs = []
    for kernels in ("cpp", "torch"):
        llm = LLM(str(tiny_model_dir), kernels=kernels, speculative_config=NGRAM, **kw)
        spec_out = [
            o.outputs[0].token_ids for o in speculating(llm, plain).generate(PROMPTS, greedy, use_tqdm=False)
        ]
        stats = llm.engine.spec_stats
        assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
        n_out = llm.generate({"prompt_token_ids": list(range(40, 61))}, sampled, use_tqdm=False)[0].outputs
        outs.append((spec_out, [c.token_ids for c in n_out]))
        assert llm.engine.runner.kv_cache.kivi.open == {}
    assert outs[0] == outs[1] and len(outs[0][1]) == 3
    assert counts["unseal"] > 0 and counts["copy"] > 0
    # the draft stream changes which blocks are sealed when a row reads them, so the tokens may differ from
    # the plain run's; most stay the same
    same = sum(
        a == b
        for x, y in zip(outs[0][0], (o.outputs[0].token_ids for o in plain), strict=True)
        for a, b in zip(x, y, strict=True)
    )
    assert same >= 60, same  # 80 of 90 when written


def test_residual_blocks_cap_the_sequences_running_at_once(tiny_model_dir):
    small = LLM(str(tiny_model_dir), kv_cache_memory="256KiB", kernels="cpp", kv_cache_dtype="kivi2")
    spec = small.engine.kv_spec
    cap = 256 * 1024 // 4 // spec.residual_block_bytes // spec.kivi_window_blocks.blocks_per_seq
    assert 1 <= small.engine.max_num_seqs == cap < 128 and small.engine.scheduler.max_num_seqs == cap
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    many = [{"prompt_token_ids": [9 + i, 10, 11]} for i in range(cap + 3)]
    assert all(len(o.outputs[0].token_ids) == 5 for o in small.generate(many, params, use_tqdm=False))
