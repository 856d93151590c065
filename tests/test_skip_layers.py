"""Lossy layer skipping (`skip_layers`): the engine runs the kept layers only and stores K/V for them alone.

The tiny model's first layer, embedding and head are the same random weights as a one-layer model of the
same seed, so the two-layer model with layer 1 skipped must generate exactly what the one-layer model does.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY_CONFIG, write_tiny_model
from tokenmill import LLM, SamplingParams
from tokenmill.bench.modes import mode_options, split_modes
from tokenmill.config import EngineConfig
from tokenmill.spec.config import parse_skip_layers

PROMPTS = [
    {"prompt_token_ids": [11, 12, 13, 14, 15] * 6},
    {"prompt_token_ids": list(range(40, 80)) + list(range(40, 60))},
]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def one_layer_dir(tmp_path_factory, real_tokenizer):
    return write_tiny_model(
        tmp_path_factory.mktemp("tiny-one-layer"), real_tokenizer, {**TINY_CONFIG, "num_hidden_layers": 1}
    )


def run(llm: LLM, params: SamplingParams = GREEDY):
    return llm.generate(PROMPTS, params, use_tqdm=False)


def test_skipping_a_layer_runs_the_model_without_it(tiny_model_dir, one_layer_dir):
    skipped = LLM(str(tiny_model_dir), kv_cache_memory="16MiB", skip_layers=[1])
    alone = LLM(str(one_layer_dir), kv_cache_memory="16MiB")
    full = LLM(str(tiny_model_dir), kv_cache_memory="16MiB")
    got, want, plain = run(skipped), run(alone), run(full)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    for g, w in zip(got, want, strict=True):
        ids = g.outputs[0].token_ids
        assert [lp[t].logprob for t, lp in zip(ids, g.outputs[0].logprobs, strict=True)] == pytest.approx(
            [lp[t].logprob for t, lp in zip(ids, w.outputs[0].logprobs, strict=True)], abs=1e-4
        )
    assert [o.outputs[0].token_ids for o in got] != [o.outputs[0].token_ids for o in plain]
    # K/V of the skipped layer is not stored: the same memory holds twice the tokens
    assert skipped.engine.kv_spec.num_layers == 1
    assert skipped.engine.kv_capacity_tokens == 2 * full.engine.kv_capacity_tokens
    assert skipped.engine.block_manager.num_used_blocks == 0


def test_skip_layers_with_eviction_and_chunked_prefill(tiny_model_dir, one_layer_dir):
    """Eviction ranks tokens by the attention of the layers that run (its scores follow the cache's layers)."""
    options = {
        "kv_cache_memory": "16MiB",
        "kv_policy": "h2o:budget=24,recent=8",
        "max_num_batched_tokens": 16,
    }
    skipped = LLM(str(tiny_model_dir), skip_layers="1", **options)
    alone = LLM(str(one_layer_dir), **options)
    assert [o.outputs[0].token_ids for o in run(skipped)] == [o.outputs[0].token_ids for o in run(alone)]
    assert skipped.engine.kv_compressor.stats.evictions > 0
    assert skipped.engine.block_manager.num_used_blocks == 0


def test_skip_layers_from_the_layerskip_search_file(tmp_path, tiny_model_dir):
    path = tmp_path / "skip.json"
    path.write_text(json.dumps({"skip_layers": [0], "num_layers": 2}))
    assert EngineConfig(skip_layers=str(path)).skip_layers == (0,)
    llm = LLM(str(tiny_model_dir), kv_cache_memory="16MiB", skip_layers=str(path))
    assert llm.engine.kept_layers == [1]


@pytest.mark.parametrize(
    "value, expected",
    [(None, ()), ("", ()), (3, (3,)), ([5, 2], (2, 5)), ("16,25", (16, 25)), ("25/16", (16, 25))],
)
def test_parse_skip_layers(value, expected):
    assert parse_skip_layers(value) == expected


@pytest.mark.parametrize(
    "options, message",
    [
        ({"skip_layers": [0, 1]}, "skips all 2 layers"),
        ({"skip_layers": [2]}, "not layers of this model"),
    ],
)
def test_skip_layers_the_model_does_not_allow(tiny_model_dir, options, message):
    with pytest.raises(ValueError, match=message):
        LLM(str(tiny_model_dir), kv_cache_memory="16MiB", **options)


@pytest.mark.parametrize(
    "value, message",
    [
        ("a,b", "layer indices such as 3,5,8"),
        ([1, 1], "distinct"),
        ([-1], "indices >= 0"),
        ("/nonexistent/skip.json", "cannot be read"),
    ],
)
def test_bad_skip_layers(value, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(skip_layers=value)


def test_skip_layers_and_layerskip_drafts_do_not_combine():
    with pytest.raises(ValueError, match="cannot be combined"):
        EngineConfig(skip_layers=[1], speculative_config={"method": "layerskip", "skip_layers": [2]})


def test_eval_modes_name_skipped_layers():
    """`tokenmill eval ppl --compare full,skip_layers=25,skip_layers=16/25` (commas separate modes)."""
    modes = split_modes("full,skip_layers=25,skip_layers=16/25")
    assert modes == ["full", "skip_layers=25", "skip_layers=16/25"]
    assert EngineConfig(**mode_options(modes[2])).skip_layers == (16, 25)
    assert EngineConfig(**mode_options(modes[1])).skip_layers == (25,)
