"""Sampling: parameter validation, seeded reproducibility, top-k/top-p/min-p, penalties, stop strings,
logprobs, and n > 1 sharing prompt blocks."""

from __future__ import annotations

import math

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.layers.sampler import Sampler, SamplingRow

PROMPT = {"prompt_token_ids": list(range(100, 140))}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return LLM(str(tiny_model_dir), kv_cache_memory="64MiB")


# ---- validation ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["x"] * 65}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"logprobs": 21}, "logprobs"),
        ({"seed": "abc"}, "seed"),
    ],
)
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_stop_may_be_a_single_string():
    assert SamplingParams(stop="END").stop == ["END"]


# ---- the sampler on hand-made logits -----------------------------------------------------------------
def _seq(params: SamplingParams, token_ids: list[int], num_prompt: int, seed: int = 0) -> SamplingRow:
    return SamplingRow(params, torch.Generator().manual_seed(seed), list(token_ids), num_prompt)


def test_top_k_top_p_min_p_restrict_support():
    logits = torch.tensor([[4.0, 3.9, 3.8, 0.0, -1.0, -2.0]])
    sampler = Sampler({5})
    cases = [
        (SamplingParams(temperature=1.0, top_k=2), {0, 1}),
        (SamplingParams(temperature=1.0, top_p=0.5), {0, 1}),
        (SamplingParams(temperature=1.0, min_p=0.5), {0, 1, 2}),
    ]
    for params, allowed in cases:
        seen = {sampler(logits, [_seq(params, [7], 1, seed=s)])[0].token_id for s in range(200)}
        assert seen == allowed, (params, seen)


def test_penalties_follow_openai_and_hf_rules():
    sampler = Sampler(set())
    base = torch.tensor([2.0, 1.9, -1.0, 0.5])
    # token 0 appeared twice in the output: frequency 1.0 * 2 + presence 0.5 pushes it below token 1.
    seq = _seq(SamplingParams(temperature=0, frequency_penalty=1.0, presence_penalty=0.5), [3, 0, 0], 1)
    row = base.clone()
    sampler._apply_penalties(row, seq)
    assert row.tolist() == pytest.approx([2.0 - 2.5, 1.9, -1.0, 0.5])
    assert sampler(base.unsqueeze(0), [seq])[0].token_id == 1
    # repetition penalty divides positive and multiplies negative logits of seen tokens (prompt included)
    seq = _seq(SamplingParams(temperature=0, repetition_penalty=2.0), [2, 0], 1)
    row = base.clone()
    sampler._apply_penalties(row, seq)
    assert row.tolist() == pytest.approx([1.0, 1.9, -2.0, 0.5])


def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 5.0, 9.0, 1.0]])
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[1])
    seq = _seq(params, [3], 1)
    assert Sampler({2})(logits, [seq])[0].token_id == 3


def test_logprobs_are_raw_log_softmax():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    seq = _seq(SamplingParams(temperature=0, logprobs=2), [0], 1)
    r = Sampler(set())(logits, [seq])[0]
    expected = torch.log_softmax(logits[0], -1)
    assert r.token_id == 1 and r.rank == 1
    assert r.logprob == pytest.approx(float(expected[1]))
    assert [t for t, _ in r.top] == [1, 2]
    assert r.top[1][1] == pytest.approx(float(expected[2]))


# ---- end to end on the tiny model ------------------------------------------------------------------
def test_top_k_1_equals_greedy(tiny):
    greedy = tiny.generate(
        PROMPT, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), use_tqdm=False
    )
    topk1 = tiny.generate(
        PROMPT, SamplingParams(max_tokens=20, temperature=1.3, top_k=1, ignore_eos=True), use_tqdm=False
    )
    assert greedy[0].token_ids == topk1[0].token_ids


def test_seed_reproducible_whatever_the_batch(tiny):
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=1234, ignore_eos=True)
    alone = tiny.generate(PROMPT, params, use_tqdm=False)[0].token_ids
    others = [{"prompt_token_ids": list(range(7, 7 + k))} for k in (3, 50, 17)]
    unseeded = SamplingParams(max_tokens=30, temperature=1.0, ignore_eos=True)
    outs = tiny.generate(
        others[:2] + [PROMPT] + others[2:], [unseeded, unseeded, params, unseeded], use_tqdm=False
    )
    assert outs[2].token_ids == alone
    other_seed = SamplingParams(max_tokens=20, temperature=1.0, seed=4321, ignore_eos=True)
    assert tiny.generate(PROMPT, other_seed, use_tqdm=False)[0].token_ids != alone


def test_stop_string_spanning_two_tokens(tiny):
    tok = tiny.get_tokenizer()
    base = tiny.generate(
        PROMPT, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), use_tqdm=False
    )[0]
    ids = base.token_ids
    pieces = [tok.decode(ids[: i + 1]) for i in range(len(ids))]
    # choose a boundary whose text on both sides is long enough, and a stop string across it
    for k in range(2, len(ids) - 1):
        left, right = pieces[k][len(pieces[k - 1]) :], pieces[k + 1][len(pieces[k]) :]
        stop = left[-2:] + right[:2]
        if (
            len(left) >= 2
            and len(right) >= 2
            and stop.isprintable()
            and base.text.find(stop) == len(pieces[k]) - 2
        ):
            break
    else:
        pytest.fail("no suitable token boundary in the greedy output")
    out = tiny.generate(
        PROMPT, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop]), use_tqdm=False
    )[0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert out.text == base.text[: len(pieces[k]) - 2]
    assert stop not in out.text
    assert out.token_ids == ids[: k + 2]


def test_stop_token_ids_and_min_tokens(tiny):
    base = tiny.generate(
        PROMPT, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), use_tqdm=False
    )[0].token_ids
    stop_at = base[2]
    out = tiny.generate(
        PROMPT, SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_at]), use_tqdm=False
    )[0]
    assert out.token_ids == base[:3] and out.finish_reason == "stop" and out.outputs[0].stop_reason == stop_at
    held = tiny.generate(
        PROMPT,
        SamplingParams(max_tokens=10, temperature=0, min_tokens=6, stop_token_ids=[stop_at]),
        use_tqdm=False,
    )[0]
    assert len(held.token_ids) >= 6 and stop_at not in held.token_ids[:6]


def test_logprobs_end_to_end(tiny):
    out = tiny.generate(
        PROMPT, SamplingParams(max_tokens=8, temperature=0, logprobs=3, ignore_eos=True), use_tqdm=False
    )[0]
    c = out.outputs[0]
    assert len(c.logprobs) == 8
    for token, entry in zip(c.token_ids, c.logprobs, strict=True):
        assert entry[token].rank == 1 and entry[token].logprob <= 0
        assert len(entry) == 3
        assert max(lp.logprob for lp in entry.values()) == entry[token].logprob
    assert c.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs, strict=True))
    )
    assert math.isfinite(c.cumulative_logprob)


def test_n3_shares_prompt_blocks_and_copies_on_write(tiny):
    engine = tiny.engine
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    single = tiny.generate(PROMPT, greedy, use_tqdm=False)[0].token_ids
    engine.block_manager.cached.clear()  # make sharing come from the fork, not from the prefix cache
    for b in engine.block_manager.blocks:
        b.hash, b.token_ids = None, None
    req = engine.add_request(PROMPT, SamplingParams(n=3, max_tokens=12, temperature=0, ignore_eos=True))
    outputs = []
    while not req.finished:
        step_outs = engine.step()
        if all(s.block_table for s in req.seqs) and all(s.num_output_tokens == 1 for s in req.seqs[1:]):
            tables = [s.block_table for s in req.seqs]
            shared = engine.block_manager.blocks[tables[0][0]]
            assert tables[0][:2] == tables[1][:2] == tables[2][:2] and shared.ref_count == 3
            assert len({t[2] for t in tables}) == 3  # the partly filled block was copied on write
        outputs += step_outs
    final = outputs[-1]
    assert final.finished and len(final.outputs) == 3
    assert all(c.token_ids == single for c in final.outputs)  # copy-on-write kept each child exact
    sampled = tiny.generate(
        PROMPT, SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=5, ignore_eos=True), use_tqdm=False
    )[0]
    assert len({tuple(c.token_ids) for c in sampled.outputs}) == 3
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
