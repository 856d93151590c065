"""Exactness on the real default model: fp32 greedy output equals transformers' `generate` on the same
GGUF, token for token, with all prompts batched together in one engine."""

from __future__ import annotations

import pydoc_data.topics

import pytest
import torch

from tokenmill import SamplingParams

pytestmark = pytest.mark.integration
NEW_TOKENS = 32


def long_prompt(tokenizer, min_tokens: int = 420) -> str:
    text = pydoc_data.topics.topics["assert"] + pydoc_data.topics.topics["assignment"]
    ids = tokenizer.encode(text)
    assert len(ids) > min_tokens
    return tokenizer.decode(ids[:min_tokens]) + "\n\nIn short, the assert statement"


@pytest.fixture(scope="module")
def prompts(real_llm) -> list[list[int]]:
    tok = real_llm.get_tokenizer()
    texts = [
        "The capital of France is",
        "def fibonacci(n):\n    ",
        "Once upon a time, in a small village by the sea,",
        "List three colors: 1.",
        long_prompt(tok),
    ]
    ids = [tok.encode(t) for t in texts]
    chat = [{"role": "user", "content": "Name a fruit and say why you like it."}]
    ids.append(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True))
    return ids


def oracle_generate(hf_model, prompt_ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


def test_greedy_matches_transformers(real_llm, hf_oracle, prompts):
    assert max(len(p) for p in prompts) > 400
    outs = real_llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(max_tokens=NEW_TOKENS, temperature=0),
        use_tqdm=False,
    )
    for prompt, out in zip(prompts, outs, strict=True):
        expected = oracle_generate(hf_oracle, prompt)
        assert out.token_ids == expected, f"prompt of {len(prompt)} tokens diverged"
        assert len(expected) == NEW_TOKENS or expected[-1] in real_llm.get_tokenizer().eos_token_ids


def test_chat_api_matches_template_path(real_llm):
    messages = [{"role": "user", "content": "Name a fruit."}]
    params = SamplingParams(max_tokens=16, temperature=0)
    via_chat = real_llm.chat(messages, params, use_tqdm=False)[0]
    ids = real_llm.get_tokenizer().apply_chat_template(messages, tokenize=True)
    via_ids = real_llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
    assert via_chat.token_ids == via_ids.token_ids and via_chat.text.strip()
