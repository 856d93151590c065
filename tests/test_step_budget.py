"""The SLO-aware step budget: follows the measured cost per token, never exceeds the configured maximum,
never starves a waiting prompt."""

from __future__ import annotations

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.engine.step_budget import StepBudget


def feed(budget: StepBudget, fixed: float, per_token: float, sizes=range(8, 400, 24)) -> None:
    for n in sizes:
        budget.observe(n, fixed + per_token * n)


def test_budget_is_the_largest_step_inside_the_target():
    b = StepBudget(max_tokens=2048, slo_tpot_s=0.2, headroom=1.0)
    assert b.budget(num_decodes=4) == 2048  # nothing measured yet: the configured maximum
    feed(b, fixed=0.02, per_token=0.001)
    assert b.fit() == pytest.approx((0.02, 0.001))
    assert b.budget(num_decodes=4) == pytest.approx(180, abs=1)  # (0.2 - 0.02) / 0.001


def test_budget_never_exceeds_the_maximum_nor_starves_prompts():
    fast = StepBudget(max_tokens=256, slo_tpot_s=0.2)
    feed(fast, fixed=0.001, per_token=1e-6)
    assert fast.budget(num_decodes=8) == 256
    slow = StepBudget(max_tokens=2048, slo_tpot_s=0.05, min_chunk=32)
    feed(slow, fixed=0.2, per_token=0.01)  # even an empty step misses the target
    assert slow.budget(num_decodes=10) == 10 + 32  # every decode plus a prompt chunk still fit
    assert slow.budget(num_decodes=0) == 2048  # no decode waits on the step: full budget


def test_no_target_means_the_configured_budget():
    b = StepBudget(max_tokens=512, slo_tpot_s=None)
    feed(b, fixed=0.1, per_token=0.01)
    assert b.budget(num_decodes=3) == 512


def test_engine_with_tpot_target_finishes_everything(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), kv_cache_memory="32MiB", slo_tpot=1e-4, max_num_batched_tokens=512)
    # a target no step can meet: steps shrink to decodes + a 32-token chunk, and every request still ends
    prompts = [{"prompt_token_ids": list(range(10, 10 + n))} for n in (100, 150, 200)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [8, 8, 8]
    assert llm.engine.step_budget.fit() is not None


def test_bad_slo_is_a_clear_error():
    from tokenmill.config import EngineConfig

    with pytest.raises(ValueError, match="slo_tpot"):
        EngineConfig(slo_tpot=0)


def test_ttft_target_raises_the_budget_only_for_savable_prompts():
    b = StepBudget(max_tokens=2048, slo_tpot_s=0.2, slo_ttft_s=2.0, headroom=1.0)
    feed(b, fixed=0.02, per_token=0.001)
    tpot = b.budget(num_decodes=8)
    assert tpot == pytest.approx(180, abs=1)
    # 1,000 prompt tokens due in 1.5 s: B >= (1000 * 0.02 + 1.5 * 8) / (1.5 - 1000 * 0.001) = 64: the TPOT
    # budget already does it
    assert b.budget(8, [(1.5, 1000)]) == tpot
    # 1,400 tokens due in 1.5 s: B >= (28 + 12) / (1.5 - 1.4) = 400; the step grows past the TPOT budget
    raised = b.budget(8, [(1.5, 1400)])
    assert raised == 400
    steps = 1400 / (raised - 8)
    assert steps * (0.02 + 0.001 * raised) <= 1.5 + 1e-9  # and that budget does meet the deadline
    # a prompt no budget can save (1,600 tokens cost 1.6 s of per-token time alone) leaves the TPOT budget,
    # and so does a deadline already missed; a savable prompt behind them still counts everything before it
    assert b.budget(8, [(1.5, 1600)]) == tpot
    assert b.budget(8, [(-0.5, 10)]) == tpot
    assert b.budget(8, [(-0.5, 10), (1.5, 1390)]) == 400
    # the maximum is never exceeded, and without a TTFT target pending prompts change nothing
    assert b.budget(8, [(0.9, 880)]) <= 2048
    no_ttft = StepBudget(2048, 0.2, None, headroom=1.0)
    feed(no_ttft, fixed=0.02, per_token=0.001)
    assert no_ttft.budget(8, [(1.5, 1400)]) == tpot


def test_engine_with_ttft_target_finishes_everything(tiny_model_dir):
    llm = LLM(
        str(tiny_model_dir), kv_cache_memory="32MiB", slo_tpot=1e-4, slo_ttft=0.5, max_num_batched_tokens=512
    )
    prompts = [{"prompt_token_ids": list(range(10, 10 + n))} for n in (100, 150, 200, 300)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [8, 8, 8, 8]
    with pytest.raises(ValueError, match="slo_ttft"):
        LLM(str(tiny_model_dir), slo_ttft=-1)
