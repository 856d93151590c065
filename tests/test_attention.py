"""Attention backends: the C++ paged decode kernel and the torch path agree with plain attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill import LLM, SamplingParams
from tokenmill.layers.attention import AttentionMetadata, TorchAttention
from tokenmill.layers.cpu_kernels import load_cpu_kernels


def reference_decode(q, k_cache, v_cache, tables, lens, group):
    outs = []
    for i in range(q.shape[0]):
        n = int(lens[i])
        k = k_cache[tables[i]].transpose(0, 1).flatten(1, 2)[:, :n].repeat_interleave(group, 0)
        v = v_cache[tables[i]].transpose(0, 1).flatten(1, 2)[:, :n].repeat_interleave(group, 0)
        outs.append(F.scaled_dot_product_attention(q[i].unsqueeze(1), k, v).squeeze(1))
    return torch.stack(outs)


@pytest.fixture
def decode_case():
    g = torch.Generator().manual_seed(0)
    num_blocks, bs, hkv, group, d, b = 40, 16, 2, 3, 32, 5
    k_cache = torch.randn(num_blocks, hkv, bs, d, generator=g)  # the cache layout: heads, then tokens
    v_cache = torch.randn(num_blocks, hkv, bs, d, generator=g)
    lens = torch.tensor([1, 16, 17, 70, 33])
    tables = torch.randperm(num_blocks, generator=g)[: b * 5].view(b, 5)
    q = torch.randn(b, hkv * group, d, generator=g)
    return q, k_cache, v_cache, tables, lens, group


def test_cpu_kernel_builds_and_matches_reference(decode_case):
    kernels = load_cpu_kernels()
    assert kernels is not None, "the C++ decode kernel failed to build"
    q, k_cache, v_cache, tables, lens, group = decode_case
    out = kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, q.shape[-1] ** -0.5)
    torch.testing.assert_close(
        out, reference_decode(q, k_cache, v_cache, tables, lens, group), atol=1e-5, rtol=1e-5
    )


def test_torch_decode_path_matches_reference(decode_case):
    q, k_cache, v_cache, tables, lens, group = decode_case
    b, h, d = q.shape
    attn = TorchAttention(h, h // group, d, decode_kernel=None)
    empty = torch.empty(0, dtype=torch.long)
    meta = AttentionMetadata(empty, empty, b, tables, lens, [])
    out = attn._decode(q, k_cache, v_cache, meta)
    torch.testing.assert_close(
        out, reference_decode(q, k_cache, v_cache, tables, lens, group), atol=1e-5, rtol=1e-5
    )


def test_engine_outputs_equal_with_and_without_kernel(tiny_model_dir):
    prompts = [{"prompt_token_ids": list(range(50, 50 + n))} for n in (3, 40, 90)]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    llm = LLM(str(tiny_model_dir), kv_cache_memory="32MiB")
    assert llm.engine.runner.model.attention.decode_kernel is not None
    with_kernel = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    llm.engine.runner.model.attention.decode_kernel = None
    without = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert with_kernel == without
