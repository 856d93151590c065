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
    assert slow.budget(num_decodes=10) == 10  # no prompt chunk fits: the step decodes alone
    for _ in range(slow.tpot_window):
        slow.observe(10, 0.3, num_decodes=10)
    # ... but never more than tpot_window steps in a row: then every decode plus a prompt chunk
    assert slow.budget(num_decodes=10) == 10 + 32
    slow.observe(42, 0.6, num_decodes=10)
    assert slow.budget(num_decodes=10) == 10  # the chunk went: banking again
    assert slow.budget(num_decodes=0) == 2048  # no decode waits on the step: full budget


def test_cheap_decode_steps_bank_time_for_a_larger_chunk():
    """TPOT is a mean per request: steps under the target let a later one carry a larger prompt chunk, and
    a step over it is paid back by decode-only steps."""
    b = StepBudget(max_tokens=4096, slo_tpot_s=0.2, headroom=1.0, tpot_window=4)
    feed(b, fixed=0.02, per_token=0.001)
    assert b.budget(num_decodes=8) == 180  # nothing banked: one step's worth
    for _ in range(4):
        b.observe(8, 0.028, num_decodes=8)  # on the line: 0.172 s under the target each
    assert b.tpot_allowance() == pytest.approx(0.2 * 5 - 4 * 0.028)
    assert b.budget(num_decodes=8) == pytest.approx(868, abs=1)  # (0.888 - 0.02) / 0.001
    b.observe(868, 0.888, num_decodes=8)
    assert b.budget(num_decodes=8) == 8  # the big step used the bank: decode alone until it refills


def test_steps_below_and_past_the_split_follow_their_own_lines():
    """Packed weights: below the GEMM threshold every row pays the weight decode (steep line), past it a
    step pays the decode once (a fixed cost, then cheap rows); the budget prices each side with its own."""
    b = StepBudget(max_tokens=2048, slo_tpot_s=0.3, headroom=1.0, split_tokens=48)
    feed(b, fixed=0.01, per_token=0.006, sizes=range(1, 48, 4))
    feed(b, fixed=0.15, per_token=0.002, sizes=range(48, 600, 40))
    assert b.line(16) == pytest.approx((0.01, 0.006))
    assert b.line(200) == pytest.approx((0.15, 0.002))
    # 16 decodes: the cheapest chunk worth adding starts at the split (48 tokens), 0.15 + 0.002 * B <= 0.3
    assert b.budget(num_decodes=16) == pytest.approx(75, abs=1)
    flat = StepBudget(max_tokens=2048, slo_tpot_s=0.3, headroom=1.0)  # no split: one line over all
    feed(flat, fixed=0.01, per_token=0.006, sizes=range(1, 48, 4))
    assert flat.line(200) == flat.fit()


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


def test_ttft_target_serves_a_burst_a_group_at_a_time():
    """16 prompts at once with no decode running: the step ends where the most of them are still on time,
    not after all of them (every prompt a step completes waits for the whole step)."""
    b = StepBudget(max_tokens=4096, slo_tpot_s=0.2, slo_ttft_s=1.0, headroom=1.0)
    feed(b, fixed=0.02, per_token=0.001, sizes=range(8, 1200, 64))
    burst = [(1.0, 100)] * 16
    assert b.budget(0, burst) == 900  # 0.02 + 0.001 * 900 <= 1.0 < 0.02 + 0.001 * 1000
    # a prompt already past saving at the head rides along only while it delays no one who can make it
    assert b.budget(0, [(-1.0, 300)] + burst) == 900  # the late 300 tokens and 6 prompts on time
    # the line is not trusted beyond twice the largest step it was fitted on
    small = StepBudget(max_tokens=4096, slo_tpot_s=0.2, slo_ttft_s=1.0, headroom=1.0)
    feed(small, fixed=0.02, per_token=0.001, sizes=range(8, 260, 16))
    assert small.budget(0, burst) == 400  # steps up to 248 tokens seen: at most 496
    # nobody can be saved: throughput decides (the configured maximum); without a TTFT target, too
    assert b.budget(0, [(0.01, 100)] * 4) == 4096
    no_ttft = StepBudget(4096, 0.2, None, headroom=1.0)
    feed(no_ttft, fixed=0.02, per_token=0.001)
    assert no_ttft.budget(0, burst) == 4096


def test_ttft_target_takes_an_arriving_prompt_whole_beside_the_decodes():
    b = StepBudget(max_tokens=2048, slo_tpot_s=0.2, slo_ttft_s=2.0, headroom=1.0)
    feed(b, fixed=0.02, per_token=0.001, sizes=range(8, 1600, 64))
    tpot = b.budget(num_decodes=8)
    assert tpot == pytest.approx(180, abs=1)
    # 1,000 prompt tokens due in 1.5 s: one step of 8 + 1,000 tokens (1.028 s) makes it
    assert b.budget(8, [(1.5, 1000)]) == 1008
    # two prompts: both fit in one step before the first one's deadline
    assert b.budget(8, [(1.5, 600), (1.8, 700)]) == 1308
    # the second would make the first late: the step ends after the first
    assert b.budget(8, [(0.7, 600), (1.8, 700)]) == 608
    # a prompt no step can save any more leaves the TPOT budget, and so does a deadline already missed
    assert b.budget(8, [(1.0, 1600)]) == tpot
    assert b.budget(8, [(-0.5, 10)]) == tpot
    # the maximum is never exceeded
    assert b.budget(8, [(9.0, 3000)]) == tpot


def test_engine_with_ttft_target_finishes_everything(tiny_model_dir):
    llm = LLM(
        str(tiny_model_dir), kv_cache_memory="32MiB", slo_tpot=1e-4, slo_ttft=0.5, max_num_batched_tokens=512
    )
    prompts = [{"prompt_token_ids": list(range(10, 10 + n))} for n in (100, 150, 200, 300)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [8, 8, 8, 8]
    with pytest.raises(ValueError, match="slo_ttft"):
        LLM(str(tiny_model_dir), slo_ttft=-1)


def test_calibration_seeds_the_step_time_line(tiny_model_dir):
    """A server calibrates before its first request: the budget has a line at once, and nothing of the
    synthetic requests stays behind."""
    llm = LLM(str(tiny_model_dir), kv_cache_memory="32MiB", slo_tpot=0.2, slo_ttft=2.0)
    engine = llm.engine
    assert engine.step_budget.fit() is None
    engine.calibrate_step_time()
    assert engine.step_budget.fit() is not None
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.stats.queries == 0
    out = llm.generate(["hello"], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    engine.add_request("hi", SamplingParams(max_tokens=1), request_id="busy")
    with pytest.raises(RuntimeError, match="idle"):
        engine.calibrate_step_time()


def test_arrival_time_sets_the_ttft_deadline(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), kv_cache_memory="32MiB")
    request = llm.engine.add_request("hello", SamplingParams(max_tokens=1), arrival_time=123.0)
    assert request.metrics.arrival_time == 123.0


def test_build_off_thread_loads_and_reraises(tiny_model_dir, tmp_path):
    """The server loads its engine on a short-lived thread (libgomp's per-thread pools); load errors still
    reach the caller as they are."""
    from tokenmill.config import EngineConfig
    from tokenmill.engine.async_engine import build_off_thread

    engine = build_off_thread(EngineConfig(model=str(tiny_model_dir), kv_cache_memory="32MiB", slo_tpot=0.2))
    assert engine.step_budget.fit() is not None  # a latency target: calibrated while loading
    with pytest.raises(Exception) as info:
        build_off_thread(EngineConfig(model=str(tmp_path / "missing.gguf")))
    assert "missing.gguf" in str(info.value)


def test_an_idle_engine_takes_a_burst_of_requests_together(tiny_model_dir):
    """Requests arriving close together at an idle engine are taken before its first step (so the step
    budget plans their first tokens together); a gap longer than ARRIVAL_GAP_S ends the burst."""
    import threading
    import time

    from tokenmill.engine import async_engine
    from tokenmill.engine.async_engine import AbortCommand, AsyncLLMEngine

    engine = AsyncLLMEngine(LLM(str(tiny_model_dir), kv_cache_memory="32MiB").engine)

    for i in range(4):  # queued together (no timing to race on a loaded machine)
        engine._commands.put(AbortCommand(f"r{i}"))
    feeder = threading.Timer(async_engine.ARRIVAL_GAP_S * 5, lambda: engine._commands.put(AbortCommand("r4")))
    feeder.start()
    taken = engine._take_burst()
    feeder.join()
    assert [c.request_id for c in taken] == ["r0", "r1", "r2", "r3"]  # r4 came after the gap
    assert engine._take_burst() == [AbortCommand("r4")]
    started = time.monotonic()
    assert engine._take_burst() == []  # nothing more: one gap's wait
    assert time.monotonic() - started < async_engine.BURST_WINDOW_S
