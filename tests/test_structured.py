"""Constrained decoding in the engine (tiny random model, llguidance): each constraint form holds, a batch
mixing constrained and free requests keeps the free ones token-exact, speculative drafts are masked per
position and rolled back, invalid constraints are AdmissionErrors naming the field, logit_bias applies."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from tokenmill import LLM, AdmissionError, SamplingParams
from tokenmill.layers.sampler import Sampler, SamplingRow, allowed_tokens
from tokenmill.spec import DraftAsk
from tokenmill.structured import StructuredOutputs

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "ok", "color"],
    "additionalProperties": False,
}
PROMPTS = ["Hello", "Describe a person", {"prompt_token_ids": [11, 12, 13, 14, 15] * 4}]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), max_model_len=512, kv_cache_memory="16MiB")


def run(llm: LLM, params, prompts=PROMPTS):
    return llm.generate(prompts, params, use_tqdm=False)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_outputs_validate(llm, temperature):
    params = SamplingParams(max_tokens=80, temperature=temperature, seed=7, n=2, structured={"json": SCHEMA})
    for out in run(llm, params):
        for c in out.outputs:
            assert c.finish_reason == "stop", c.text  # the grammar ended it, not max_tokens
            jsonschema.validate(json.loads(c.text), SCHEMA)
    assert llm.engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize(
    "structured, check",
    [
        ({"regex": r"[0-9]{3}-[a-z]{2}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
        ({"choice": ["yes", "no", "maybe"]}, lambda t: t in ("yes", "no", "maybe")),
        (
            {"grammar": 'start: "(" NUM ("+" NUM)? ")"\nNUM: /[0-9]{1,2}/'},  # Lark
            lambda t: re.fullmatch(r"\([0-9]{1,2}(\+[0-9]{1,2})?\)", t),
        ),
        ({"grammar": 'root ::= "a" [b-c]{1,3} "d"'}, lambda t: re.fullmatch(r"a[bc]{1,3}d", t)),  # GBNF
        # any object: a random model may write one endless key, cut by max_tokens (the real model's test parses)
        ({"json_object": True}, lambda t: t.startswith('{"') or isinstance(json.loads(t), dict)),
    ],
)
def test_each_constraint_form_holds(llm, structured, check):
    for temperature in (0.0, 0.9):
        params = SamplingParams(max_tokens=60, temperature=temperature, seed=3, structured=structured)
        for out in run(llm, params, PROMPTS[:2]):
            c = out.outputs[0]
            assert check(c.text), (structured, c.text)
            assert c.finish_reason == "stop" or "json_object" in structured


def test_mixed_batch_keeps_free_requests_token_exact(llm):
    free = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=24, temperature=0.8, seed=11, ignore_eos=True)
    alone = run(llm, [free, seeded, free], PROMPTS)
    constrained = SamplingParams(max_tokens=40, temperature=0.7, seed=1, structured={"json": SCHEMA})
    mixed = run(
        llm,
        [free, constrained, seeded, SamplingParams(max_tokens=30, structured={"regex": "[a-z]+"}), free],
        [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[2]],
    )
    assert [mixed[i].outputs[0].token_ids for i in (0, 2, 4)] == [o.outputs[0].token_ids for o in alone]
    jsonschema.validate(json.loads(mixed[1].outputs[0].text), SCHEMA)


class WrongDrafts:
    """Proposes the known constrained continuation with every third token replaced by one the grammar refuses
    (a letter inside an integer, a quote where a key is done), so verification both accepts and rejects."""

    def __init__(self, outputs, bad_token: int):
        self.full = [o.prompt_token_ids + o.outputs[0].token_ids for o in outputs]
        self.bad = bad_token
        self.calls = 0

    prior_cost = 0.0

    def propose(self, asks: list[DraftAsk]) -> list[list[int]]:
        return [self._one(a.token_ids, a.k) for a in asks]

    def release(self, seq_id: int) -> None:
        pass

    def _one(self, token_ids: list[int], k: int) -> list[int]:
        self.calls += 1
        for full in self.full:
            if full[: len(token_ids)] == token_ids:
                guess = full[len(token_ids) : len(token_ids) + k]
                return [t if (i + self.calls) % 3 else self.bad for i, t in enumerate(guess)]
        return []


def test_speculative_drafts_are_masked_per_position_and_rolled_back(tiny_model_dir, llm):
    params = SamplingParams(max_tokens=80, temperature=0, structured={"json": SCHEMA}, logprobs=1)
    plain = run(llm, params)
    spec_llm = LLM(str(tiny_model_dir), max_model_len=512, kv_cache_memory="16MiB", speculative_config=NGRAM)
    bad = spec_llm.get_tokenizer().encode("}}}", add_special_tokens=False)[0]
    spec_llm.engine.proposer = WrongDrafts(plain, bad)
    spec = run(spec_llm, params)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    stats = spec_llm.engine.spec_stats
    assert stats.num_draft_tokens > 0 and 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    # sampling with speculation: every output still validates
    sampled = run(
        spec_llm, SamplingParams(max_tokens=80, temperature=1.0, seed=5, n=3, structured={"json": SCHEMA})
    )
    for out in sampled:
        for c in out.outputs:
            jsonschema.validate(json.loads(c.text), SCHEMA)
    assert spec_llm.engine.block_manager.num_used_blocks == 0


def test_verify_rejects_a_draft_the_grammar_refuses():
    sampler = Sampler({2})
    logits = torch.zeros(3, 64)
    logits[0, 5] = 10.0  # the model's favourite is draft 5 ...
    logits[0, 6] = 5.0
    logits[1, 9] = 10.0
    bitmask = torch.zeros(1, 2, dtype=torch.int32)
    bitmask[0, 0] = (1 << 6) | (1 << 7)  # ... but the grammar allows only 6 and 7 at position 0
    row = SamplingRow(SamplingParams(temperature=0), None, [1, 2, 3], 3, bitmask)
    emitted = sampler.verify(logits, row, [5, 9])
    assert [r.token_id for r in emitted] == [6]
    assert allowed_tokens(bitmask[0], 64).nonzero().flatten().tolist() == [6, 7]


@pytest.mark.parametrize(
    "structured, words",
    [
        ({"regex": "(["}, "regex"),
        ({"json": {"type": "nonsense"}}, "JSON schema"),
        ({"json": "{not json"}, "json"),
        ({"grammar": "start: undefined_rule"}, "grammar"),
        ({"choice": []}, "choice"),
        ({"regex": "a", "choice": ["b"]}, "exactly one"),
    ],
)
def test_invalid_constraints_are_admission_errors(llm, structured, words):
    with pytest.raises(AdmissionError) as exc:
        run(llm, SamplingParams(max_tokens=4, structured=structured), ["Hi"])
    assert exc.value.param == "structured" and words in exc.value.message
    assert not llm.engine.has_unfinished_requests()
    assert run(llm, SamplingParams(max_tokens=3), ["Hi"])[0].outputs[0].token_ids  # the engine is fine


def test_compiled_grammars_are_cached_by_constraint(llm):
    backend = llm.engine.structured
    a = backend.compile(StructuredOutputs(json={"type": "object", "properties": {"x": {"type": "integer"}}}))
    before = backend.num_compiled
    b = backend.compile(
        StructuredOutputs(json='{"properties": {"x": {"type": "integer"}}, "type": "object"}')
    )
    assert a is b and backend.num_compiled == before


def test_logit_bias(llm):
    tok = llm.get_tokenizer()
    target = tok.encode(" banana", add_special_tokens=False)[0]
    out = run(llm, SamplingParams(max_tokens=5, temperature=0, logit_bias={target: 100.0}), ["Hi"])[0]
    assert out.outputs[0].token_ids == [target] * 5
    with pytest.raises(AdmissionError) as exc:
        SamplingParams(logit_bias={1: 500.0})
    assert exc.value.param == "logit_bias"


def test_prompt_logprobs_match_generation_logprobs(tiny_model_dir):
    """Scores of a prompt's tokens equal the logprobs the same tokens had when they were generated, whatever
    the prefill chunking, and a prefix-cache hit does not skip them."""
    llm = LLM(str(tiny_model_dir), max_model_len=512, kv_cache_memory="16MiB", max_num_batched_tokens=16)
    prefix = llm.get_tokenizer().encode("The quick brown fox jumps over the lazy dog")
    gen = run(
        llm,
        SamplingParams(max_tokens=20, temperature=0, logprobs=2, ignore_eos=True),
        [{"prompt_token_ids": prefix}],
    )
    out_ids = gen[0].outputs[0].token_ids
    full = prefix + out_ids
    for _ in range(2):  # the second time, the prompt's blocks are in the prefix cache
        scored = run(llm, SamplingParams(max_tokens=1, prompt_logprobs=3), [{"prompt_token_ids": full}])[0]
        entries = scored.prompt_logprobs
        assert len(entries) == len(full) and entries[0] is None
        for i, token in enumerate(out_ids):
            want = gen[0].outputs[0].logprobs[i][token]
            got = entries[len(prefix) + i][token]
            assert abs(got.logprob - want.logprob) < 1e-3 and got.rank == want.rank == 1
        assert all(len([lp for lp in e.values() if lp.rank <= 3]) >= 3 for e in entries[1:])


@pytest.mark.integration
def test_real_model_json_schema_and_choice(real_llm):
    """The default model, short outputs: a schema-constrained answer parses, validates and is right; a choice
    is one of the choices."""
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    }
    outs = real_llm.chat(
        [
            [{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
            [{"role": "user", "content": "Is water wet? Answer yes or no."}],
        ],
        [
            SamplingParams(max_tokens=16, temperature=0, structured={"json": schema}),
            SamplingParams(max_tokens=4, temperature=0, structured={"choice": ["yes", "no"]}),
        ],
        use_tqdm=False,
    )
    answer = json.loads(outs[0].outputs[0].text)
    jsonschema.validate(answer, schema)
    assert "Paris" in answer["city"]
    assert outs[1].outputs[0].text in ("yes", "no")
