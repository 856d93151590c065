"""The quality harness of `tokenmill eval ppl | passkey | needle`: KV modes, windows, teacher forcing
through the engine, prompt builders, scoring, the command line; and perplexity equal to transformers'."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from tokenmill.bench import evals, ppl, retrieval
from tokenmill.bench.evals import UnsupportedModeError, kv_mode_overrides, mode_options, split_modes
from tokenmill.bench.ppl import make_windows
from tokenmill.config import EngineConfig
from tokenmill.entrypoints.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_options(tiny_model_dir) -> dict:
    return {"model": str(tiny_model_dir), "threads": 1, "kv_cache_memory": "8MiB"}


@pytest.fixture(scope="module")
def text() -> str:
    from tokenmill.bench.quality import reference_text

    return reference_text()[:3000]


# ---- modes ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode, expected",
    [
        ("full", {}),
        ("auto", {}),
        ("int8", {"kv_cache_dtype": "int8"}),
        ("kivi2", {"kv_cache_dtype": "kivi2"}),
        ("dtype=bfloat16", {"dtype": "bfloat16"}),
        ("streaming:sinks=4,window=256", {"kv_policy": "streaming:sinks=4,window=256"}),
        ("h2o:budget=256,recent=32", {"kv_policy": "h2o:budget=256,recent=32"}),
        ("snapkv:budget=128", {"kv_policy": "snapkv:budget=128"}),
        ("weights=q8", {"weights": "q8"}),
        ("block-size=32", {"block_size": 32}),
        ("enable_prefix_caching=false", {"enable_prefix_caching": False}),
        ("kv_cache_dtype=int4", {"kv_cache_dtype": "int4"}),
        ("int4+weights=q4", {"kv_cache_dtype": "int4", "weights": "q4"}),
    ],
)
def test_kv_mode_overrides(mode, expected):
    assert kv_mode_overrides(mode) == expected


@pytest.mark.parametrize(
    "mode, words",
    [
        ("bogus", "unknown KV mode"),
        ("h2o", "needs its parameters"),
        ("lru:size=3", "unknown KV policy"),
        ("", "empty"),
        ("fp32", "name it `full`"),
        ("bf16", "name it `full`"),
    ],
)
def test_bad_mode_is_a_clear_error(mode, words):
    with pytest.raises(ValueError, match=words):
        kv_mode_overrides(mode)


def test_split_modes_keeps_policy_parameters_together():
    assert split_modes("full,streaming:sinks=4,window=256,weights=q8,int8") == [
        "full",
        "streaming:sinks=4,window=256",
        "weights=q8",
        "int8",
    ]
    assert split_modes(["full", "h2o:budget=64,recent=8"]) == ["full", "h2o:budget=64,recent=8"]
    with pytest.raises(ValueError, match="no KV mode"):
        split_modes(" , ")


def test_a_mode_the_engine_lacks_fails_before_any_model_loads(text):
    with pytest.raises(UnsupportedModeError, match="not supported by this build"):
        mode_options("no_such_option=1")
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    if "kv_cache_dtype" not in fields:  # until the quantized KV formats land
        with pytest.raises(UnsupportedModeError, match="KV mode 'int8' is not supported by this build"):
            ppl.evaluate_ppl(text, ["full", "int8"], engine_options={"model": "/nonexistent"})
    with pytest.raises(ValueError, match="KV mode 'block_size=0'.*block_size"):
        mode_options("block_size=0")


def test_without_compare_the_mode_is_the_engine_as_configured():
    assert evals.default_modes({}) == evals.default_modes({"kv_cache_dtype": "auto"}) == ["full"]
    assert evals.default_modes({"kv_cache_dtype": "int8"}) == ["auto"]  # not called "full" when it is not
    assert evals.default_modes({"kv_policy": "streaming:sinks=4,window=64"}) == ["auto"]


# ---- windows -------------------------------------------------------------------------------------------------
def scored(windows) -> list[int]:
    return [t for w in windows for t in range(w.first_target, w.end)]


@pytest.mark.parametrize(
    "n, window, stride", [(1000, 128, 50), (1000, 128, 1), (300, 64, 63), (129, 128, 64)]
)
def test_sliding_windows_score_every_token_once(n, window, stride):
    windows = make_windows(n, window, stride)
    assert scored(windows) == list(range(1, n))  # each token but the first, once, in order
    for w in windows:
        assert w.end - w.begin <= window and w.begin < w.first_target <= w.end
        assert w.begin % stride == 0


def test_disjoint_windows():
    windows = make_windows(300, 128)
    assert [(w.begin, w.end, w.first_target) for w in windows] == [
        (0, 128, 1),
        (128, 256, 129),
        (256, 300, 257),
    ]
    assert len(scored(windows)) == len(set(scored(windows))) == 300 - 3
    assert [w.end for w in make_windows(129, 128)] == [128]  # a 1-token tail has nothing to score
    with pytest.raises(ValueError, match="stride"):
        make_windows(100, 16, 17)
    with pytest.raises(ValueError, match="window"):
        make_windows(100, 1)


# ---- perplexity through the engine ---------------------------------------------------------------------------
def test_teacher_forcing_through_the_engine_matches_the_runner(tiny_options, text):
    """Both paths (prompt chunks, decodes) give the nll of a direct teacher-forced run of each window, and the
    engine is left as it was."""
    from tokenmill.bench.quality import teacher_forced
    from tokenmill.entrypoints.llm import LLM
    from tokenmill.sampling_params import SamplingParams

    llm = LLM(**tiny_options, enable_prefix_caching=False, max_num_batched_tokens=16)
    ids = llm.get_tokenizer().encode(text)[:150]
    windows = make_windows(len(ids), 64, 48)
    reference = torch.cat(
        [
            teacher_forced(llm.engine.runner.model, ids[w.begin : w.end], 64).nll[
                w.first_target - w.begin - 1 :
            ]
            for w in windows
        ]
    ).double()
    assert len(reference) == len(ids) - 1
    for chunk in (16, 1):
        got = torch.cat(ppl.score_windows(llm, ids, windows, chunk))
        torch.testing.assert_close(got, reference, atol=2e-4, rtol=1e-4)
    runner = llm.engine.runner
    assert "execute" not in vars(runner) and runner.sampler.__class__.__name__ == "Sampler"
    out = llm.generate([ids[:10]], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4 and not llm.engine.has_unfinished_requests()


def test_compare_two_modes_gives_two_results(tiny_options, text):
    results = ppl.evaluate_ppl(
        text,
        ["full", "weights=q8"],
        window=48,
        stride=32,
        num_tokens=120,
        chunk=32,
        engine_options=tiny_options,
    )
    assert [r.mode for r in results] == ["full", "weights=q8"]
    assert [r.overrides for r in results] == [{}, {"weights": "q8"}]
    for r in results:
        assert r.num_scored == 119 and r.num_tokens == 120 and r.stride == 32 and r.window == 48
        assert math.isfinite(r.perplexity) and r.perplexity == pytest.approx(math.exp(r.nll_mean))
    assert results[0].perplexity != results[1].perplexity  # q8 weights are not the fp32 ones
    table = ppl.format_table(results, "topics.txt")
    assert "| full |" in table and "| weights=q8 |" in table and "+0.00%" in table


# ---- retrieval prompts and scoring -----------------------------------------------------------------------------
@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("length", [256, 1024])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_passkey_prompt_puts_the_key_at_the_depth(real_tokenizer, length, depth, chat):
    p = retrieval.passkey_prompt(real_tokenizer, length, depth, "71432", chat)
    assert length - 8 <= len(p.ids) <= length  # under by less than one filler sentence
    assert real_tokenizer.decode(p.ids[p.fact_start : p.fact_end]).strip() == (
        "The pass key is 71432. Remember it. 71432 is the pass key."
    )
    assert abs(p.depth - depth) <= 0.03
    text = real_tokenizer.decode(p.ids)
    before, after = text.split("The pass key is 71432")
    n_before = sum(before.count(s) for s in retrieval.PASSKEY_FILLER)
    n_after = sum(after.count(s) for s in retrieval.PASSKEY_FILLER)
    assert abs(n_before / (n_before + n_after) - depth) <= 0.03
    assert text.rstrip().endswith("What is the pass key? The pass key is") != chat
    if chat:
        template = real_tokenizer.apply_chat_template([{"role": "user", "content": "XYZ"}])
        assert p.ids[:8] == real_tokenizer.encode(template.split("XYZ")[0], add_special_tokens=False)[:8]


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_needle_prompt_puts_the_needle_at_the_depth(real_tokenizer, depth):
    p = retrieval.needle_prompt(real_tokenizer, 1024, depth)
    assert len(p.ids) == 1024
    assert retrieval.NEEDLE in real_tokenizer.decode(p.ids[p.fact_start : p.fact_end])
    assert abs(p.depth - depth) <= 0.05
    assert abs(p.fact_start / len(p.ids) - depth) <= 0.1
    later = retrieval.needle_prompt(real_tokenizer, 1024, depth, offset=5000)
    assert later.ids != p.ids and len(later.ids) == 1024


def test_too_short_a_length_is_a_clear_error(real_tokenizer):
    with pytest.raises(ValueError, match="too short"):
        retrieval.passkey_prompt(real_tokenizer, 32, 0.5, "12345")


def test_scoring():
    assert retrieval.passkey_correct(" 71432. Remember", "71432")
    assert retrieval.passkey_correct(" 7 1 4 3 2", "71432")
    assert not retrieval.passkey_correct(" 71433.", "71432")
    assert not retrieval.passkey_correct("", "71432")
    assert retrieval.needle_correct(" to eat a Sandwich")
    assert retrieval.needle_correct(" sit in dolores park")
    assert not retrieval.needle_correct(" visit the Golden Gate Bridge")


def test_accuracy_grid_and_table():
    cells = [
        retrieval.RetrievalCell(n, d, n - 2, correct, 2)
        for (n, d), correct in zip([(64, 0.0), (64, 1.0), (128, 0.0), (128, 1.0)], [2, 1, 0, 2], strict=True)
    ]
    r = retrieval.RetrievalResult("passkey", "full", {}, [64, 128], [0.0, 1.0], False, 8, 5 / 8, 1.0, cells)
    assert r.grid() == [[1.0, 0.5], [0.0, 1.0]]
    table = retrieval.format_table([r, dataclasses.replace(r, mode="int8")])
    assert "| 64 (62) | 100% | 50% | 75% |" in table and "| int8 | 62% | 75% | 50% |" in table


def test_the_grid_is_the_same_for_every_mode():
    a = retrieval._plan("passkey", [64, 128], [0.0, 1.0], 2, seed=3)
    assert a == retrieval._plan("passkey", [64, 128], [0.0, 1.0], 2, seed=3)
    assert len(set(a.values())) == 8 and all(len(k) == 5 for k in a.values())
    assert a != retrieval._plan("passkey", [64, 128], [0.0, 1.0], 2, seed=4)


# ---- the command line -----------------------------------------------------------------------------------------
def tiny_args(tiny_options) -> list[str]:
    return ["-m", tiny_options["model"], "--threads", "1", "--kv-cache-memory", "8MiB", "--no-progress"]


def test_cli_ppl_compare_writes_json_and_png(tiny_options, text, tmp_path, capsys):
    source = tmp_path / "text.txt"
    source.write_text(text)
    out_json, out_png = tmp_path / "ppl.json", tmp_path / "ppl.png"
    argv = ["eval", "ppl", str(source), "--window", "32", "--num-tokens", "80", "--chunk", "16"]
    argv += ["--compare", "full,weights=q8", "--output-json", str(out_json), "--plot", str(out_png)]
    assert main(argv + tiny_args(tiny_options)) == 0
    stdout = capsys.readouterr().out
    assert "| mode | perplexity |" in stdout and "| full |" in stdout and "| weights=q8 |" in stdout
    data = json.loads(out_json.read_text())
    assert data["task"] == "ppl" and [r["mode"] for r in data["results"]] == ["full", "weights=q8"]
    assert data["results"][0]["num_scored"] == 80 - 3  # disjoint windows of 32: 0-32, 32-64, 64-80
    assert out_png.read_bytes()[:8] == PNG


@pytest.mark.parametrize("task", ["passkey", "needle"])
def test_cli_retrieval_writes_json_and_png(task, tiny_options, tmp_path, capsys):
    out_json, out_png = tmp_path / f"{task}.json", tmp_path / f"{task}.png"
    argv = ["eval", task, "--lengths", "96,128", "--depths", "0,1", "--samples", "2", "--max-new-tokens", "4"]
    argv += ["--output-json", str(out_json), "--plot", str(out_png)]
    assert main(argv + tiny_args(tiny_options)) == 0
    stdout = capsys.readouterr().out
    assert f"{task} retrieval" in stdout and "| tokens \\ depth | 0 | 1 | mean |" in stdout
    result = json.loads(out_json.read_text())["results"][0]
    assert result["mode"] == "full" and result["lengths"] == [96, 128]
    assert [(c["length"], c["depth"], c["total"]) for c in result["cells"]] == [
        (96, 0.0, 2),
        (96, 1.0, 2),
        (128, 0.0, 2),
        (128, 1.0, 2),
    ]
    assert len(result["samples"]) == 8 and all(96 - 8 <= s["prompt_tokens"] <= 128 for s in result["samples"])
    assert out_png.read_bytes()[:8] == PNG


def test_cli_bad_mode_exits_2_with_the_reason(tiny_options, capsys):
    assert main(["eval", "passkey", "--compare", "full,bogus", *tiny_args(tiny_options)]) == 2
    assert "unknown KV mode 'bogus'" in capsys.readouterr().err


def test_cli_lengths_are_capped_at_the_context(tiny_options, capsys):
    results = retrieval.evaluate_retrieval(
        "passkey", ["full"], lengths=[96, 5000], depths=[0.5], max_new_tokens=4, engine_options=tiny_options
    )
    assert results[0].lengths == [96, 1024 - 4]  # the tiny model's context is 1024
    assert "capped" in capsys.readouterr().err
    assert evals.engine_summary({"model": "x", "weights": "auto"}) == "model=x"


# ---- the real model: the engine's perplexity is transformers' ---------------------------------------------------
@pytest.mark.integration
def test_ppl_equals_transformers(default_gguf, hf_oracle):
    from tokenmill.bench.quality import reference_text

    text = reference_text()[:4000]
    options = {
        "model": str(default_gguf),
        "dtype": "float32",
        "weights": "dense",
        "kv_cache_memory": "256MiB",
    }
    # The prompt path; the decode path (--chunk 1) equals it, as the tiny-model test shows.
    result = ppl.evaluate_ppl(text, ["full"], window=128, num_tokens=256, engine_options=options)[0]
    from tokenmill.models.gguf import GGUFModel
    from tokenmill.models.tokenizer import Tokenizer

    ids = Tokenizer.from_gguf_metadata(GGUFModel(default_gguf).metadata).encode(text)[:256]
    windows = make_windows(len(ids), 128)
    assert len(windows) == 2
    nll = []
    with torch.no_grad():
        for w in windows:
            logits = hf_oracle(torch.tensor([ids[w.begin : w.end]])).logits[0].double()
            rows = torch.arange(w.first_target - w.begin - 1, w.end - w.begin - 1)
            targets = torch.tensor(ids[w.first_target : w.end])
            nll.append(-torch.log_softmax(logits[rows], -1).gather(1, targets.unsqueeze(1)).squeeze(1))
    expected = math.exp(torch.cat(nll).mean().item())
    assert result.num_scored == 254 and result.num_windows == 2
    assert result.perplexity == pytest.approx(expected, rel=0.005)
