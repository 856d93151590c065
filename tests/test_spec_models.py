"""Model-based proposers (draft model, layer skip) and adaptive k: greedy output equals plain decoding token
for token, alone and in mixed batches, across preemption and chunked prefill; neither KV cache leaks a
block; bad drafts are clear errors; the adaptive rule switches speculation off when it cannot pay."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import TINY_CONFIG, write_tiny_model
from tokenmill import LLM, SamplingParams
from tokenmill.layers.cpu_kernels import load_cpu_kernels
from tokenmill.spec.adaptive import AdaptiveLength, expected_tokens, speedup
from tokenmill.spec.draft import check_same_vocabulary

PROMPTS = [
    {"prompt_token_ids": [11, 12, 13, 14, 15] * 6},
    {"prompt_token_ids": list(range(40, 80)) + list(range(40, 60))},
    {"prompt_token_ids": [7, 8, 9] * 3},
]
GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
KERNELS = load_cpu_kernels()
vector_kernels = pytest.mark.skipif(
    KERNELS is None or KERNELS.cpu_isa() == "portable",
    reason="int8 activations need the AVX2/AVX-512 kernels",
)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory, real_tokenizer):
    """The target's first layer and head alone (same seed, one layer): a draft that agrees often, not always."""
    return write_tiny_model(
        tmp_path_factory.mktemp("tiny-draft"), real_tokenizer, {**TINY_CONFIG, "num_hidden_layers": 1}
    )


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), kv_cache_memory="16MiB")
    return llm.generate(PROMPTS, GREEDY, use_tqdm=False)


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def assert_no_leaks(llm: LLM) -> None:
    engine = llm.engine
    assert engine.block_manager.num_used_blocks == 0
    assert engine.proposer.block_manager.num_used_blocks == 0  # the draft's own cache
    assert not engine.proposer._shadows


def test_draft_model_is_lossless_and_frees_its_cache(tiny_model_dir, draft_dir, plain):
    llm = LLM(
        str(tiny_model_dir),
        kv_cache_memory="16MiB",
        speculative_config={"method": "draft_model", "model": str(draft_dir), "num_speculative_tokens": 3},
    )
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == tokens(plain)
    stats = llm.engine.spec_stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # it accepted and rejected drafts
    assert_no_leaks(llm)


@vector_kernels
def test_a_cheaper_draft_stays_lossless(tiny_model_dir, draft_dir, plain):
    """The draft packed to q4 with int8 activations (cheaper, and proposing differently) while the target runs
    dense and exact: the output is still the target's, token for token."""
    spec = {"method": "draft_model", "model": str(draft_dir), "num_speculative_tokens": 3}
    cheap = {**spec, "draft_weights": "q4", "draft_activations": "int8"}
    llm = LLM(str(tiny_model_dir), kv_cache_memory="16MiB", speculative_config=cheap)
    draft = llm.engine.proposer.runner.model
    assert draft.has_packed_linears and draft.layers[0].gate_up.plan.int8_activations
    assert not llm.engine.runner.model.has_packed_linears  # the target's own settings are untouched
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == tokens(plain)
    assert llm.engine.spec_stats.num_accepted_tokens > 0
    assert_no_leaks(llm)
    with pytest.raises(ValueError, match="speculative_config draft model .* packed"):
        LLM(str(tiny_model_dir), speculative_config={**spec, "draft_activations": "int8"})  # dense draft
    with pytest.raises(ValueError, match="speculative_config.draft_activations='int8' .* needs device cpu"):
        LLM(str(tiny_model_dir), kernels="torch", speculative_config=cheap)


def test_draft_model_across_preemption_chunked_prefill_and_mixed_requests(tiny_model_dir, draft_dir):
    prompts = PROMPTS + [{"prompt_token_ids": [(37 * i) % 900 + 5 for i in range(70)]}]
    params = [GREEDY, GREEDY, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True), GREEDY]
    reference = LLM(str(tiny_model_dir), kv_cache_memory="16MiB").generate(prompts, params, use_tqdm=False)
    tight = LLM(
        str(tiny_model_dir),
        kv_cache_memory=9 * 16 * 2 * 2 * 16 * 4 * 2,  # 9 blocks of 16 tokens: forces preemption
        max_num_batched_tokens=24,  # prompts arrive in chunks, beside verification rows
        speculative_config={"method": "draft", "model": str(draft_dir), "num_speculative_tokens": 4},
    )
    out = tight.generate(prompts, params, use_tqdm=False)
    assert tokens(out) == tokens(reference)
    assert tight.engine.scheduler.num_preemptions > 0
    assert tight.engine.spec_stats.num_accepted_tokens > 0
    assert_no_leaks(tight)


def test_aborted_requests_release_the_draft_cache(tiny_model_dir, draft_dir):
    llm = LLM(
        str(tiny_model_dir),
        kv_cache_memory="16MiB",
        speculative_config={"method": "draft_model", "model": str(draft_dir)},
    )
    engine = llm.engine
    request = engine.add_request(PROMPTS[1], GREEDY)
    for _ in range(4):
        engine.step()
    assert engine.proposer.block_manager.num_used_blocks > 0
    engine.abort_request(request.request_id)
    assert_no_leaks(llm)


def test_a_draft_with_another_vocabulary_is_refused(tiny_model_dir, tmp_path, real_tokenizer):
    bigger = write_tiny_model(tmp_path / "big-vocab", real_tokenizer, {**TINY_CONFIG, "vocab_size": 50000})
    with pytest.raises(ValueError, match="vocabulary of 50000 ids"):
        LLM(str(tiny_model_dir), speculative_config={"method": "draft_model", "model": str(bigger)})

    class OtherTokenizer:
        vocab_size = real_tokenizer.vocab_size

        class backend:
            @staticmethod
            def get_vocab():
                return {"a": 0}

    with pytest.raises(ValueError, match="different tokenizer"):
        check_same_vocabulary(real_tokenizer, 49152, OtherTokenizer, 49152, "other")


def test_layerskip_is_lossless(tiny_model_dir, plain):
    llm = LLM(
        str(tiny_model_dir),
        kv_cache_memory="16MiB",
        speculative_config={"method": "layerskip", "skip_layers": [1], "num_speculative_tokens": 3},
    )
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == tokens(plain)
    stats = llm.engine.spec_stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert_no_leaks(llm)
    with pytest.raises(ValueError, match="not layers of this model"):
        LLM(str(tiny_model_dir), speculative_config={"method": "layerskip", "skip_layers": [2]})


def test_adaptive_length_is_lossless(tiny_model_dir, draft_dir, plain):
    llm = LLM(
        str(tiny_model_dir),
        kv_cache_memory="16MiB",
        speculative_config={
            "method": "draft_model",
            "model": str(draft_dir),
            "num_speculative_tokens": "auto",
        },
    )
    adaptive = llm.engine.adaptive
    assert adaptive is not None and adaptive.max_k == 8
    # this draft reads ~all the weights the target does (the tiny model is mostly its LM head), so the rule
    # would rightly never speculate; start it from a free draft instead, and let it measure the real cost
    adaptive.draft_cost = 0.0
    chosen = []
    choose = adaptive.choose
    adaptive.choose = lambda *a: chosen.append(choose(*a)) or chosen[-1]
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == tokens(plain)
    assert llm.engine.spec_stats.num_draft_tokens > 0
    assert len(set(chosen)) > 1  # k changed along the way
    # verification is priced on the steps that held decode and verification rows only, never a prompt chunk
    decode_steps = [n for n, _ in llm.engine.decode_times._samples]
    assert decode_steps and max(decode_steps) <= len(PROMPTS) * 9
    assert min(decode_steps) < max(decode_steps)  # plain and verifying steps: a line can be fitted
    assert_no_leaks(llm)


def test_adaptive_rule_speculates_only_while_it_pays():
    assert expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 4) == 5.0
    assert abs(expected_tokens(0.5, 2) - 1.75) < 1e-9
    # a memory-bound step (fixed cost dominates): good acceptance speculates at batch 1
    fit = (0.05, 0.0005)  # 50 ms per step + 0.5 ms per token
    good = AdaptiveLength(max_k=8, draft_cost=0.0)
    for _ in range(50):
        good.observe(4, 2)  # acceptance about 2/3
    assert 0.6 < good.acceptance < 0.7
    assert good.choose(1, fit) >= 4
    # ...but not at batch 256, where the (k + 1)-fold verification costs more than it returns
    assert good.choose(256, fit) == 0
    assert speedup(0.66, 4, 256, *fit, 0.0) < 1.0 < speedup(0.66, 4, 1, *fit, 0.0)
    # nothing accepted: off at any batch size
    bad = AdaptiveLength(max_k=8, draft_cost=0.0)
    for _ in range(50):
        bad.observe(4, 0)
    assert bad.choose(1, fit) == 0
    # while off, one sequence still speculates every 8th step, so acceptance keeps being measured
    steps = [(bad.choose(1, fit), bad.probe()) for _ in range(16)]
    assert all(k == 0 for k, _ in steps) and [p for _, p in steps].count(4) == 2
    # an expensive draft's probes back off while the rule stays off: 8, 16, 32, 64 steps apart, then 128
    dear = AdaptiveLength(max_k=8, draft_cost=2.0, accepted=bad.accepted, rejected=bad.rejected)
    probes = [i for i in range(1, 301) if dear.choose(1, fit) == 0 and dear.probe()]
    assert probes == [8, 24, 56, 120, 248]
    assert dear._probe_interval == 128
    for _ in range(100):  # later the draft is right every time and cheaper (say, less loaded): it pays again
        dear.observe(4, 4)
    dear.draft_cost = 0.3
    assert dear.choose(1, fit) > 0 and dear._probe_interval == 0  # speculating resets the back-off
    # an expensive draft needs more acceptance: the same record at a draft cost of 0.5 picks a shorter k
    costly = AdaptiveLength(max_k=8, draft_cost=0.5, accepted=good.accepted, rejected=good.rejected)
    assert 0 < costly.choose(1, fit) < good.choose(1, fit)
    # the evidence fades on steps without speculation, so an off switch is retried later
    for _ in range(300):
        bad.choose(1, fit)
    assert bad.choose(1, fit) > 0


def test_eval_layerskip_saves_a_usable_choice(tiny_model_dir, tmp_path, plain):
    text = tmp_path / "calib.txt"
    text.write_text("def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n" * 8)
    out = tmp_path / "skip.json"
    result = subprocess.run(
        [sys.executable, "-m", "tokenmill.entrypoints.cli", "eval", "layerskip", "--model", str(tiny_model_dir),
         "--file", str(text), "--output", str(out), "--num-tokens", "64"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads(out.read_text())
    assert saved["num_layers"] == 2 and len(saved["skip_layers"]) == 1
    assert 0.0 <= saved["acceptance"] <= 1.0 and saved["evaluations"] >= 2
    assert [len(p) for p in saved["path"]] == [1]  # the greedy path, one subset per round (2 layers: 1 round)
    llm = LLM(
        str(tiny_model_dir),
        kv_cache_memory="16MiB",
        speculative_config={"method": "layerskip", "skip_layers_file": str(out)},
    )
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == tokens(plain)
