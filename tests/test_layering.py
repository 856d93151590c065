"""The core seams: typed admission errors (engine -> server), weight formats as an enum, EngineConfig's
kernel options, EngineArgs on the command line, the sampler's plain per-row input, and light imports."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import subprocess
import sys

import httpx
import pytest
import torch

from tokenmill import LLM, AdmissionError, EngineArgs, EngineConfig, SamplingParams, WeightFormat
from tokenmill.errors import CONTEXT_LENGTH_EXCEEDED, DUPLICATE_REQUEST_ID, INVALID_VALUE

TOKENS_PER_KV_BLOCK = 16
KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # tiny model: layers x (K, V) x kv heads x head_dim x fp32


# ---- imports stay light -------------------------------------------------------------------------------------
HEAVY = ("tokenmill.engine.llm_engine", "tokenmill.models.llama", "tokenmill.entrypoints.llm", "fastapi")


@pytest.mark.parametrize(
    "module, also_absent",
    [
        ("tokenmill", ("torch",)),
        ("tokenmill.sampling_params", ("torch",)),
        ("tokenmill.errors", ("torch",)),
        ("tokenmill.formats", ("torch",)),
        ("tokenmill.config", ("gguf", "tokenmill.layers.quantization")),
        ("tokenmill.engine_args", ("gguf",)),
        ("tokenmill.layers.sampler", ("tokenmill.engine.sequence",)),
        ("tokenmill.layers.quantization", ("gguf",)),
        ("tokenmill.entrypoints.openai.protocol", ("torch",)),
    ],
)
def test_importing_a_submodule_does_not_load_the_stack(module, also_absent):
    absent = (*HEAVY, *also_absent)
    code = f"import {module}, sys; loaded = [m for m in {absent!r} if m in sys.modules]; assert not loaded, loaded"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_package_names_load_on_first_use():
    import tokenmill

    assert tokenmill.LLM is LLM and tokenmill.SamplingParams is SamplingParams
    assert set(tokenmill.__all__) <= set(dir(tokenmill))
    with pytest.raises(AttributeError):
        tokenmill.NoSuchThing  # noqa: B018


# ---- AdmissionError ------------------------------------------------------------------------------------------
def test_sampling_params_errors_name_their_field():
    with pytest.raises(AdmissionError) as exc:
        SamplingParams(top_p=1.5)
    assert isinstance(exc.value, ValueError)
    assert (exc.value.param, exc.value.code) == ("top_p", INVALID_VALUE)
    assert "top_p" in exc.value.message and str(exc.value) == exc.value.message
    with pytest.raises(AdmissionError) as exc:
        SamplingParams(min_tokens=5, max_tokens=2)
    assert exc.value.param == "min_tokens"


def test_admission_error_pickles():
    import pickle

    err = pickle.loads(pickle.dumps(AdmissionError("prompt", CONTEXT_LENGTH_EXCEEDED, "too long")))
    assert (err.param, err.code, err.message) == ("prompt", CONTEXT_LENGTH_EXCEEDED, "too long")


@pytest.fixture(scope="module")
def small(tiny_model_dir):
    """Context 64 tokens; the KV cache holds 48 (3 blocks), fewer than the context."""
    return LLM(str(tiny_model_dir), max_model_len=64, kv_cache_memory=48 * KV_BYTES_PER_TOKEN)


@pytest.mark.parametrize(
    "prompt, params, param, code, words",
    [
        ("", None, "prompt", INVALID_VALUE, "empty"),
        ({"prompt_token_ids": []}, None, "prompt", INVALID_VALUE, "empty"),
        ({"prompt_token_ids": [1, 10**9]}, None, "prompt", INVALID_VALUE, "token ids"),
        ([1, True], None, "prompt", INVALID_VALUE, "token ids"),
        ({"nothing": 1}, None, "prompt", INVALID_VALUE, "prompt_token_ids"),
        (42, None, "prompt", INVALID_VALUE, "string or a list"),
        ([5] * 64, None, "prompt", CONTEXT_LENGTH_EXCEEDED, "context"),
        ([5] * 50, None, "prompt", CONTEXT_LENGTH_EXCEEDED, "KV cache"),
        ([5] * 10, SamplingParams(max_tokens=60), "max_tokens", CONTEXT_LENGTH_EXCEEDED, "context"),
        ([5] * 10, SamplingParams(max_tokens=40), "max_tokens", CONTEXT_LENGTH_EXCEEDED, "KV cache"),
    ],
)
def test_engine_admission_raises_typed_errors(small, prompt, params, param, code, words):
    with pytest.raises(AdmissionError, match=words) as exc:
        small.engine.add_request(prompt, params)
    assert (exc.value.param, exc.value.code) == (param, code)
    assert not small.engine.has_unfinished_requests()


def test_engine_admission_refuses_a_request_id_in_use(small):
    engine = small.engine
    engine.add_request([5] * 4, SamplingParams(max_tokens=2), request_id="same")
    try:
        with pytest.raises(AdmissionError) as exc:
            engine.add_request([6] * 4, SamplingParams(max_tokens=2), request_id="same")
        assert (exc.value.param, exc.value.code) == ("request_id", DUPLICATE_REQUEST_ID)
    finally:
        engine.abort_request("same")
    assert not engine.has_unfinished_requests()


# ---- the server maps error types to OpenAI bodies ------------------------------------------------------------
def test_invalid_request_renames_the_param_for_the_endpoint():
    from tokenmill.entrypoints.openai.serving import invalid_request

    err = invalid_request(AdmissionError("max_tokens", CONTEXT_LENGTH_EXCEEDED, "max_tokens=9 is too large"))
    assert err.body()["error"] == {
        "message": "max_tokens=9 is too large",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": CONTEXT_LENGTH_EXCEEDED,
    }
    err = invalid_request(
        AdmissionError("max_tokens", CONTEXT_LENGTH_EXCEEDED, "max_tokens=9 is too large"),
        {"max_tokens": "max_completion_tokens", "prompt": "messages"},
    )
    assert err.param == "max_completion_tokens" and err.message == "max_completion_tokens=9 is too large"


def test_server_answers_typed_errors_with_their_param_and_code(tiny_model_dir):
    from tokenmill.engine.async_engine import AsyncLLMEngine
    from tokenmill.entrypoints.openai import build_app

    engine = AsyncLLMEngine.from_config(
        EngineConfig(str(tiny_model_dir), kv_cache_memory="16MiB", max_model_len=64)
    )
    app = build_app(engine)
    chat = {"messages": [{"role": "user", "content": "hi"}]}

    async def main() -> None:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

            async def error(path: str, body: dict, status: int = 400) -> dict:
                r = await client.post(path, json=body)
                assert r.status_code == status, r.text
                return r.json()["error"]

            # Engine admission, through the real engine.
            err = await error("/v1/completions", {"prompt": "x", "max_tokens": 1000})
            assert (err["param"], err["code"]) == ("max_tokens", CONTEXT_LENGTH_EXCEEDED)
            err = await error("/v1/completions", {"prompt": [5] * 64, "max_tokens": 1})
            assert (err["param"], err["code"]) == ("prompt", CONTEXT_LENGTH_EXCEEDED)
            err = await error("/v1/chat/completions", {**chat, "max_completion_tokens": 1000})
            assert (err["param"], err["code"]) == ("max_completion_tokens", CONTEXT_LENGTH_EXCEEDED)
            assert "max_completion_tokens" in err["message"]
            err = await error("/v1/chat/completions", {**chat, "max_tokens": 1000})
            assert err["param"] == "max_tokens"
            long_chat = {"messages": [{"role": "user", "content": "word " * 100}]}
            err = await error("/v1/chat/completions", long_chat)
            assert (err["param"], err["code"]) == ("messages", CONTEXT_LENGTH_EXCEEDED)

            # The mapping goes by the error's type and fields, whatever its message says.
            real_add = engine.add_request

            async def refuse(*args, **kwargs):
                raise AdmissionError("top_p", "some_code", "prompt has nothing to do with this")

            engine.add_request = refuse
            err = await error("/v1/completions", {"prompt": "x", "max_tokens": 2})
            assert err == {
                "message": "prompt has nothing to do with this",
                "type": "invalid_request_error",
                "param": "top_p",
                "code": "some_code",
            }
            err = await error("/v1/chat/completions", chat)
            assert (err["param"], err["code"]) == ("top_p", "some_code")

            async def untyped(*args, **kwargs):
                raise ValueError("prompt has 5 tokens")  # not an admission error: a bug, not a bad request

            engine.add_request = untyped
            err = await error("/v1/completions", {"prompt": "x", "max_tokens": 2}, status=500)
            assert err["param"] is None and "prompt" not in err["message"]
            engine.add_request = real_add

            r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        await engine.shutdown(timeout=5)

    asyncio.run(main())


def test_async_engine_refuses_a_request_id_in_use(tiny_model_dir):
    from tokenmill.engine.async_engine import AsyncLLMEngine

    async def main() -> None:
        eng = AsyncLLMEngine.from_config(EngineConfig(str(tiny_model_dir), kv_cache_memory="16MiB"))
        stream = await eng.add_request("hello", SamplingParams(max_tokens=30, ignore_eos=True), "same")
        with pytest.raises(AdmissionError) as exc:
            await eng.add_request("hello", SamplingParams(max_tokens=3), "same")
        assert (exc.value.param, exc.value.code) == ("request_id", DUPLICATE_REQUEST_ID)
        stream.abort()
        await eng.shutdown(timeout=5)

    asyncio.run(main())


# ---- weight formats, kernels, CPU ISA ------------------------------------------------------------------------
def test_weight_formats_are_an_enum_that_takes_strings():
    assert EngineConfig(weights="q4").weights is WeightFormat.Q4
    assert EngineConfig().weights is WeightFormat.AUTO and EngineConfig().weights == "auto"
    assert EngineConfig(weights=WeightFormat.DENSE).weights is WeightFormat.DENSE
    with pytest.raises(ValueError, match="weights must be one of auto, dense, q4, q8"):
        EngineConfig(weights="q3")
    assert [f.packed for f in WeightFormat] == [False, False, True, True, True]

    from tokenmill.layers.quantization import PackedWeight, quantize

    packed = quantize(torch.randn(4, 64), "q8")
    assert packed.format is WeightFormat.Q8
    assert PackedWeight("q4", packed.codes, packed.scales, packed.scales).format is WeightFormat.Q4
    with pytest.raises(ValueError):
        PackedWeight("dense", packed.codes, packed.scales)


def test_gguf_packing_lives_with_the_gguf_loader():
    import tokenmill.layers.quantization as quantization
    import tokenmill.models.gguf as gguf

    assert callable(gguf.pack_gguf) and gguf.NATIVE_GGUF_FORMATS
    assert not hasattr(quantization, "pack_gguf") and not hasattr(quantization, "NATIVE_GGUF_FORMATS")


def test_kernels_and_cpu_isa_are_validated(monkeypatch):
    monkeypatch.delenv("TOKENMILL_CPU_ISA", raising=False)
    config = EngineConfig()
    assert (config.kernels, config.cpu_isa) == ("auto", "auto")
    for kernels in ("auto", "torch", "cpp"):
        assert EngineConfig(kernels=kernels).kernels == kernels
    for isa in ("auto", "portable", "avx2", "avx512"):
        assert EngineConfig(cpu_isa=isa).cpu_isa == isa
    with pytest.raises(ValueError, match="kernels must be one of auto, torch, cpp"):
        EngineConfig(kernels="cuda")
    with pytest.raises(ValueError, match="CPU only"):
        EngineConfig(kernels="cpp", device="cuda")
    with pytest.raises(ValueError, match="cpu_isa must be one of auto, portable, avx2, avx512"):
        EngineConfig(cpu_isa="sse2")
    monkeypatch.setenv("TOKENMILL_CPU_ISA", "avx2")
    assert EngineConfig().cpu_isa == "avx2"
    monkeypatch.setenv("TOKENMILL_CPU_ISA", "amx")
    with pytest.raises(ValueError, match="TOKENMILL_CPU_ISA"):
        EngineConfig()


# ---- EngineArgs ----------------------------------------------------------------------------------------------
def test_engine_args_defaults_are_engine_config_defaults(monkeypatch):
    monkeypatch.delenv("TOKENMILL_CPU_ISA", raising=False)
    config_fields = {f.name for f in dataclasses.fields(EngineConfig)}
    assert {f.name for f in dataclasses.fields(EngineArgs)} <= config_fields
    assert EngineArgs().to_engine_config() == EngineConfig()
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    assert EngineArgs.from_cli_args(parser.parse_args([])).to_engine_config() == EngineConfig()


def test_engine_args_from_the_command_line(monkeypatch):
    monkeypatch.delenv("TOKENMILL_CPU_ISA", raising=False)
    from tokenmill.entrypoints.cli import build_parser

    argv = [
        "serve", "some-model", "--weights", "q4", "--kernels", "torch", "--cpu-isa", "avx2", "--threads", "3",
        "--kv-cache-memory", "64MiB", "--max-model-len", "128", "--no-prefix-caching", "--port", "0",
    ]  # fmt: skip
    args = build_parser().parse_args(argv)
    engine_args = EngineArgs.from_cli_args(args)
    assert engine_args == EngineArgs(
        model="some-model",
        weights="q4",
        kernels="torch",
        cpu_isa="avx2",
        threads=3,
        kv_cache_memory="64MiB",
        max_model_len=128,
        enable_prefix_caching=False,
        slo_tpot=0.2,  # serve keeps a TPOT and a TTFT target by default
        slo_ttft=2.0,
    )
    config = engine_args.to_engine_config()
    assert config.weights is WeightFormat.Q4 and config.kv_cache_memory == 64 * 2**20
    args = build_parser().parse_args(["generate", "hi", "-m", "x", "--seed", "7"])
    assert EngineArgs.from_cli_args(args) == EngineArgs(model="x")  # --seed is the sampling seed
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "hi", "--kernels", "cuda"])


def test_cli_and_server_do_not_import_each_other():
    import ast
    from pathlib import Path

    import tokenmill.entrypoints.openai.api_server as api_server

    tree = ast.parse(Path(api_server.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "tokenmill.entrypoints.cli" not in imported


# ---- the sampler takes plain rows ----------------------------------------------------------------------------
def test_rows_from_seqs_carry_what_the_sampler_reads():
    from tokenmill.engine.sampling_rows import rows_from_seqs
    from tokenmill.engine.sequence import Request, Sequence
    from tokenmill.layers.sampler import Sampler

    params = SamplingParams(temperature=0.8, repetition_penalty=1.3, frequency_penalty=0.5, min_tokens=5)
    request = Request("r", None, [3, 4, 5], params)
    seqs = [
        Sequence(i, request, i, [3, 4, 5, 7, 7][: 3 + i], torch.Generator().manual_seed(i), None, 100)
        for i in range(3)
    ]
    rows = rows_from_seqs(seqs)
    for seq, row in zip(seqs, rows, strict=True):
        assert row.params is params and row.generator is seq.generator
        assert row.token_ids == seq.token_ids and row.output_token_ids == seq.output_token_ids
        assert row.num_output_tokens == seq.num_output_tokens
    logits = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    tokens = [r.token_id for r in Sampler({2})(logits, rows)]
    again = [r.token_id for r in Sampler({2})(logits, rows_from_seqs(
        Sequence(i, request, i, list(s.token_ids), torch.Generator().manual_seed(i), None, 100)
        for i, s in enumerate(seqs)
    ))]  # fmt: skip
    assert tokens == again
