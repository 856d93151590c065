"""Engine invariants on a tiny random model: the same greedy tokens whatever the batch, chunking,
prefix-cache hits or preemption; no leaked blocks; clear admission errors."""

from __future__ import annotations

import random

import pytest

from tokenmill import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def make_prompts(count: int, seed: int = 0, lo: int = 5, hi: int = 90) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49000) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def gen(llm: LLM, prompts, params=GREEDY):
    return [
        o.token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    ]


def assert_no_leaks(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.running and not engine.scheduler.waiting
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, f"{bm.num_used_blocks} blocks still held"
    assert all(b.ref_count == 0 for b in bm.blocks)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return LLM(str(tiny_model_dir), kv_cache_memory="64MiB")


@pytest.fixture(scope="module")
def prompts():
    return make_prompts(16)


@pytest.fixture(scope="module")
def alone(tiny_model_dir, prompts):
    """Each prompt run on its own in a fresh engine: the reference for every invariance test."""
    llm = LLM(str(tiny_model_dir), kv_cache_memory="64MiB", enable_prefix_caching=False)
    return [gen(llm, [p])[0] for p in prompts]


def test_generates_requested_length(tiny, prompts, alone):
    assert all(len(t) == GREEDY.max_tokens for t in alone)
    assert len({tuple(t) for t in alone}) > 1  # the model is not degenerate


def test_batch_of_mixed_lengths_matches_alone(tiny, prompts, alone):
    assert gen(tiny, prompts) == alone
    assert_no_leaks(tiny)


def test_prefix_cache_hit_matches_alone(tiny_model_dir, prompts, alone):
    llm = LLM(str(tiny_model_dir), kv_cache_memory="64MiB")
    shared = prompts[3]
    assert len(shared) >= 33
    first = llm.generate([{"prompt_token_ids": shared}], GREEDY, use_tqdm=False)[0]
    again = llm.generate([{"prompt_token_ids": shared}], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens == (len(shared) - 1) // 16 * 16
    assert again.token_ids == first.token_ids == alone[3]
    # A longer prompt sharing the prefix also hits; its output equals a cold run of it.
    longer = shared + [101, 202, 303]
    hit = llm.generate([{"prompt_token_ids": longer}], GREEDY, use_tqdm=False)[0]
    assert hit.num_cached_tokens >= len(shared) // 16 * 16
    cold = LLM(str(tiny_model_dir), kv_cache_memory="64MiB", enable_prefix_caching=False)
    assert hit.token_ids == gen(cold, [longer])[0]
    assert_no_leaks(llm)


def test_prefix_cache_stats_count_hits(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), kv_cache_memory="64MiB")
    prompt = make_prompts(1, seed=7, lo=70, hi=70)[0]
    gen(llm, [prompt])
    stats = llm.engine.block_manager.stats
    assert (stats.queries, stats.hits) == (70, 0)
    gen(llm, [prompt])
    assert (stats.queries, stats.hits) == (140, 64)  # 4 full blocks of 16; the 5th holds the last token


def test_chunked_prefill_matches_alone(tiny_model_dir, prompts, alone):
    llm = LLM(
        str(tiny_model_dir), kv_cache_memory="64MiB", max_num_batched_tokens=16, enable_prefix_caching=False
    )
    assert gen(llm, prompts) == alone
    assert_no_leaks(llm)


def test_preemption_matches_alone(tiny_model_dir, prompts, alone):
    # 12 blocks of 16 tokens: any one request fits, 16 together cannot.
    block_bytes = 2 * 2 * 2 * 16 * 4 * 16
    llm = LLM(str(tiny_model_dir), kv_cache_memory=12 * block_bytes)
    assert llm.engine.block_manager.num_blocks == 12
    assert gen(llm, prompts) == alone
    assert llm.engine.scheduler.num_preemptions > 0
    assert_no_leaks(llm)


def test_abort_frees_blocks(tiny):
    engine = tiny.engine
    req = engine.add_request({"prompt_token_ids": make_prompts(1, seed=3, lo=60, hi=60)[0]}, GREEDY)
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    out = engine.abort_request(req.request_id)
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert_no_leaks(tiny)
    waiting = engine.add_request("never scheduled", GREEDY)
    engine.abort_request(waiting.request_id)
    assert_no_leaks(tiny)


def test_outputs_keep_input_order_and_timing(tiny):
    outs = tiny.generate(["one", "two three four five six", "seven"], GREEDY, use_tqdm=False)
    assert [o.prompt for o in outs] == ["one", "two three four five six", "seven"]
    for o in outs:
        m = o.metrics
        assert o.finished and o.finish_reason == "length"
        assert m.arrival_time <= m.first_token_time <= m.finish_time


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ("", GREEDY, "empty"),
        ({"prompt_token_ids": []}, GREEDY, "empty"),
        ({"prompt_token_ids": [1, 2, 10**9]}, GREEDY, "token ids"),
        ({"prompt_token_ids": [5] * 1024}, GREEDY, "context"),
        ({"prompt_token_ids": [5] * 1000}, SamplingParams(max_tokens=100), "max_tokens"),
        ({"nothing": 1}, GREEDY, "prompt_token_ids"),
    ],
)
def test_admission_errors(tiny, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        tiny.generate([prompt], params, use_tqdm=False)
    assert_no_leaks(tiny)


def test_request_larger_than_kv_cache_is_refused(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), kv_cache_memory=2 * 2 * 2 * 16 * 4 * 16 * 4)  # 64 tokens
    with pytest.raises(ValueError, match="KV cache"):
        llm.generate(["hello"], SamplingParams(max_tokens=100), use_tqdm=False)


def test_bad_batch_leaves_engine_clean(tiny):
    with pytest.raises(ValueError):
        tiny.generate(["fine", ""], GREEDY, use_tqdm=False)
    assert_no_leaks(tiny)


def test_max_tokens_none_fills_context(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), max_model_len=40)
    out = llm.generate(
        [{"prompt_token_ids": [5] * 30}],
        SamplingParams(max_tokens=None, temperature=0, ignore_eos=True),
        use_tqdm=False,
    )[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"
