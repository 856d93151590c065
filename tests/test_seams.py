"""The core seams: slots separate from positions, multi-query rows, rollback, the KV cache's own sizing."""

from __future__ import annotations

import random

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.scheduler import ScheduledBatch, ScheduledSeq
from tokenmill.engine.sequence import Sequence
from tokenmill.kv.cache import KVCache, KVCacheSpec

PARAMS = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [(7 * i + 3 * n) % 900 + 5 for i in range(n)]} for n in (5, 37, 70)]


def generate(llm: LLM, prompts=PROMPTS, params=PARAMS) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("kernels", ["cpp", "torch"])
def test_scattered_slots_give_identical_output(tiny_model_dir, kernels):
    """Blocks handed out in a shuffled order put each sequence's tokens in non-consecutive slots."""
    plain = LLM(str(tiny_model_dir), kv_cache_memory="32MiB", kernels=kernels, enable_prefix_caching=False)
    expected = generate(plain)
    scattered = LLM(
        str(tiny_model_dir), kv_cache_memory="32MiB", kernels=kernels, enable_prefix_caching=False
    )
    bm = scattered.engine.block_manager
    order = list(bm.free_ids)
    random.Random(0).shuffle(order)
    bm.free_ids.clear()
    bm.free_ids.update((i, None) for i in order)
    assert generate(scattered) == expected
    tables = []  # the shuffle did scatter: run one request and look at its table mid-flight
    scattered.engine.add_request(PROMPTS[2], PARAMS, request_id="look")
    scattered.engine.step()
    tables = scattered.engine.requests["look"].seqs[0].block_table
    assert tables != sorted(tables) or tables != list(range(tables[0], tables[0] + len(tables)))


def _runner_sequence(block_table: list[int], ids: list[int]) -> Sequence:
    return Sequence(0, None, 0, list(ids), None, None, max_tokens=0, block_table=block_table)


@pytest.mark.parametrize("kernels", ["cpp", "torch"])
def test_multi_query_rows_match_the_prompt_path(tiny_model_dir, kernels):
    """Logits of k query tokens run as one decode row (paged kernel) equal those of the same tokens inside
    one long prompt chunk (SDPA path)."""
    llm = LLM(str(tiny_model_dir), kv_cache_memory="32MiB", kernels=kernels)
    runner = llm.engine.runner
    ids = [(5 * i) % 700 + 3 for i in range(45)]
    whole = _runner_sequence([0, 1, 2], ids)
    ref = runner.execute(ScheduledBatch([ScheduledSeq(whole, 45, extra_logits=44)])).logits
    split = _runner_sequence([5, 9, 4], ids[:40])
    runner.execute(ScheduledBatch([ScheduledSeq(split, 40)]))
    split.num_computed_tokens = 40
    split.token_ids = list(ids)
    rows = runner.execute(ScheduledBatch([ScheduledSeq(split, 5, extra_logits=4)]))
    assert [j for _, j in rows.rows] == [0, 1, 2, 3, 4]
    torch.testing.assert_close(rows.logits, ref[40:], atol=1e-4, rtol=1e-4)


def test_positions_are_independent_of_slots(tiny_model_dir):
    """A sequence that dropped slots keeps its positions: its next token's K/V goes to the next held slot,
    while rotary uses the token's true position."""
    llm = LLM(str(tiny_model_dir), kv_cache_memory="32MiB", kernels="cpp")
    runner = llm.engine.runner
    ids = [(3 * i) % 500 + 11 for i in range(20)]
    seq = _runner_sequence([2, 6], ids)
    runner.execute(ScheduledBatch([ScheduledSeq(seq, 19)]))
    seq.num_computed_tokens = 19
    # keep 16 of the 19 slots' tokens by pretending 3 were dropped and the rest moved down: the next slot is 16
    seq.num_dropped_slots = 3
    kv = runner.kv_cache
    bs = kv.block_size

    def phys(i: int) -> int:
        return seq.block_table[i // bs] * bs + i % bs

    kv.move_slots(torch.tensor([phys(i) for i in range(3, 19)]), torch.tensor([phys(i) for i in range(16)]))
    k_layer0 = kv.layer(0).k
    before = k_layer0[6, :, 0].clone()  # held slot 16 = block 6 offset 0: stale after the compaction
    step = runner.execute(ScheduledBatch([ScheduledSeq(seq, 1)]))
    assert step.logits.shape[0] == 1 and torch.isfinite(step.logits).all()
    assert not torch.equal(k_layer0[6, :, 0], before)  # the token at position 19 went to held slot 16
    assert seq.num_kv_slots == 16


def test_truncate_rolls_back_slots_and_prefix_hashes():
    bm = BlockManager(num_blocks=8, block_size=4)
    from tokenmill.engine.sequence import Request

    request = Request("r", None, [1, 2, 3, 4, 5], SamplingParams())
    seq = Sequence(0, request, 0, [1, 2, 3, 4, 5], None, None, max_tokens=20)
    bm.append_slots(seq, 5)
    seq.num_computed_tokens = 5
    seq.token_ids += [6, 7, 8, 9, 10]  # a bonus token + 4 drafts, verified in one step
    bm.append_slots(seq, 5)
    seq.num_computed_tokens = 10
    bm.commit(seq)
    assert len(seq.block_hashes) == 2 and len(bm.cached) == 2
    used = bm.num_used_blocks
    bm.truncate(seq, 3)  # drafts 8, 9, 10 rejected
    assert seq.token_ids == [1, 2, 3, 4, 5, 6, 7]
    assert seq.num_computed_tokens == 7 and len(seq.block_table) == 2
    assert len(seq.block_hashes) == 1 and len(bm.cached) == 1  # block 2 no longer full of kept tokens
    assert bm.num_used_blocks == used - 1
    other = Sequence(1, request, 0, [1, 2, 3, 4, 5, 6, 7, 8, 9], None, None, max_tokens=1)
    ids, _ = bm.find_cached_prefix(other)
    assert ids == seq.block_table[:1]  # only the block of accepted tokens is served
    with pytest.raises(ValueError, match="roll back"):
        bm.truncate(seq, 5)
    bm.free(seq)
    assert bm.num_used_blocks == 0


def test_kv_cache_sizes_itself_in_bytes():
    spec = KVCacheSpec(num_layers=2, num_kv_heads=3, head_dim=8, block_size=4, dtype=torch.float32)
    assert spec.bytes_per_token == 2 * 2 * 3 * 8 * 4
    assert spec.blocks_for_memory(10 * spec.bytes_per_block + 5) == 10
    half = KVCacheSpec(2, 3, 8, 4, torch.bfloat16)
    assert half.blocks_for_memory(10 * spec.bytes_per_block) == 20  # a smaller format admits more
    assert spec.format != half.format
    cache = KVCache(spec, 10, torch.device("cpu"))
    k = torch.randn(3, 3, 8)
    slots = torch.tensor([5, 0, 13])
    cache.write(1, k, k * 2, slots)
    got_k, got_v = cache.gather(1, torch.tensor([1, 0, 3, 2]), 8)
    # sequence slot i lives at physical slot table[i // 4] * 4 + i % 4: slot 1 -> 5, slot 4 -> 0
    torch.testing.assert_close(got_k[:, 1], k[0])
    torch.testing.assert_close(got_k[:, 4], k[1])
    torch.testing.assert_close(got_v[:, 4], 2 * k[1])
    cache.move_slots(torch.tensor([13]), torch.tensor([2]))
    torch.testing.assert_close(cache.layer(1).k[0, :, 2], k[2])


@pytest.mark.parametrize(
    "dtype, bytes_per_head, max_rel", [("int8", lambda d: d + 4, 0.05), ("int4", lambda d: d / 2 + 8, 0.25)]
)
def test_quantized_kv_admits_more_tokens_and_stays_close(tiny_model_dir, dtype, bytes_per_head, max_rel):
    """Quantized blocks in the same bytes: 4 d / (bytes per head) times the blocks; prefix-cache keys differ by
    format; logits over a prompt and decode rows stay close to the fp32 cache's."""
    full = LLM(str(tiny_model_dir), kv_cache_memory="8MiB", kernels="cpp")
    quant = LLM(str(tiny_model_dir), kv_cache_memory="8MiB", kernels="cpp", kv_cache_dtype=dtype)
    ratio = quant.engine.block_manager.num_blocks / full.engine.block_manager.num_blocks
    head_dim = full.engine.model_config.head_dim  # 16: int4 has two groups of 8, 4 bytes each
    assert ratio == pytest.approx(4 * head_dim / bytes_per_head(head_dim), rel=0.01)
    assert quant.engine.block_manager.root_hash != full.engine.block_manager.root_hash
    ids = [(5 * i) % 700 + 3 for i in range(40)]
    logits = []
    for llm in (full, quant):
        seq = _runner_sequence([0, 1, 2], ids[:30])
        llm.engine.runner.execute(ScheduledBatch([ScheduledSeq(seq, 30)]))
        seq.num_computed_tokens, seq.token_ids = 30, list(ids)
        logits.append(
            llm.engine.runner.execute(ScheduledBatch([ScheduledSeq(seq, 10, extra_logits=9)])).logits
        )
    rel = (logits[0] - logits[1]).norm() / logits[0].norm()
    assert 0 < rel < max_rel
    out = quant.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 24 for o in out)


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantized_kv_torch_and_cpp_paths_agree(tiny_model_dir, dtype):
    runs = []
    for kernels in ("cpp", "torch"):
        llm = LLM(str(tiny_model_dir), kv_cache_memory="8MiB", kernels=kernels, kv_cache_dtype=dtype)
        seq = _runner_sequence([3, 1], [(7 * i) % 600 + 9 for i in range(20)])
        runs.append(
            llm.engine.runner.execute(ScheduledBatch([ScheduledSeq(seq, 20, extra_logits=19)])).logits
        )
        seq.num_computed_tokens, seq.token_ids = 20, seq.token_ids + [17, 18]
        runs.append(llm.engine.runner.execute(ScheduledBatch([ScheduledSeq(seq, 2, extra_logits=1)])).logits)
    torch.testing.assert_close(runs[0], runs[2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(runs[1], runs[3], atol=2e-3, rtol=2e-3)
