"""KV eviction policies: parsing, which tokens each keeps, the kernels' attention scores, compaction, and the
engine against a slow reference decoder that applies the same rule in plain torch."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_CONFIG, random_llama_weights

from tokenmill import LLM, AdmissionError, SamplingParams
from tokenmill.kv.cache import LayerKV
from tokenmill.kv.eviction import SeqKVState, apply_moves_to_state, hole_fill_moves, select_keep
from tokenmill.kv.policy import parse_kv_policy
from tokenmill.layers.attention import AttentionRow, PagedAttention, build_attention_metadata
from tokenmill.layers.cpu_kernels import load_cpu_kernels


# ---- parsing -------------------------------------------------------------------------------------------------
def test_policy_strings_round_trip_and_defaults():
    p = parse_kv_policy("snapkv:budget=0.25")
    assert (p.kind, p.budget, p.window, p.kernel, p.pool, p.sinks) == ("snapkv", 0.25, 32, 9, "max", 4)
    assert (
        str(parse_kv_policy("snapkv:budget=64,pool=AVG"))
        == "snapkv:budget=64,window=32,kernel=9,pool=avg,sinks=4"
    )
    assert parse_kv_policy(str(p)) == p
    assert parse_kv_policy("h2o:budget=64,recent=8").budget_tokens(1000) == 64
    assert parse_kv_policy("h2o:budget=0.1").budget_tokens(1000) == 100
    assert parse_kv_policy("streaming:sinks=2,window=30").budget_tokens(5) == 32
    assert parse_kv_policy("streaming:budget=0.5").budget_tokens(100) == 50
    assert str(parse_kv_policy("streaming:budget=0.5")) == "streaming:sinks=4,budget=0.5"
    assert not parse_kv_policy(None).evicts and not parse_kv_policy("full").evicts


@pytest.mark.parametrize(
    "text, words",
    [
        ("lru:budget=3", "unknown KV policy"),
        ("h2o", "needs budget="),
        ("h2o:budget=1.5", "budget"),
        ("h2o:budget=0", "budget"),
        ("h2o:budget=4", "must exceed sinks"),
        ("snapkv:budget=64,kernel=4", "odd"),
        ("snapkv:budget=64,pool=median", "pool must be one of max, avg"),
        ("streaming:window=abc", "must be a number"),
        ("streaming:window=8,foo=1", "takes"),
        ("streaming:sinks=4", "needs window="),
        ("streaming:window=8,budget=0.5", "one of them"),
        ("streaming:window=2.5", "integer"),
    ],
)
def test_bad_policies_fail_clearly(text, words):
    with pytest.raises(ValueError, match=words):
        parse_kv_policy(text)
    with pytest.raises(AdmissionError) as exc:
        SamplingParams(kv_policy=text)
    assert exc.value.param == "kv_policy"


# ---- which tokens are kept -----------------------------------------------------------------------------------
def _state(scores: torch.Tensor) -> SeqKVState:
    layers, heads, n = scores.shape
    state = SeqKVState.empty(layers, heads, torch.device("cpu"))
    state.append(0, n)
    state.scores[:, :, :n] = scores
    return state


def test_streaming_keeps_sinks_and_window_exactly():
    state = _state(torch.rand(2, 3, 50))
    mask = select_keep(parse_kv_policy("streaming:sinks=4,window=10"), state, 14, 50, 49)
    expected = torch.zeros(50, dtype=torch.bool)
    expected[:4] = expected[40:] = True
    assert torch.equal(mask, expected.expand(2, 3, 50))


def test_h2o_keeps_heavy_hitters_recent_and_sinks_per_head():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(2, 3, 60, generator=g)
    policy = parse_kv_policy("h2o:budget=20,recent=6,sinks=2")
    mask = select_keep(policy, _state(scores), 20, 40, 59)
    for layer in range(2):
        for head in range(3):  # slow reference: the rule written out
            forced = set(range(2)) | set(range(54, 60))
            rest = sorted(set(range(60)) - forced, key=lambda t: -float(scores[layer, head, t]))
            keep = forced | set(rest[: 20 - len(forced)])
            assert set(torch.nonzero(mask[layer, head]).flatten().tolist()) == keep
    assert not torch.equal(mask[0, 0], mask[0, 1])  # heads choose differently


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_snapkv_pools_scores_and_keeps_the_window(pool):
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(1, 2, 40, generator=g)
    policy = parse_kv_policy(f"snapkv:budget=16,window=5,kernel=3,pool={pool},sinks=0")
    mask = select_keep(policy, _state(scores), 16, 40, 39)
    combine = max if pool == "max" else (lambda xs: sum(xs) / len(xs))
    for head in range(2):
        s = scores[0, head].tolist()
        pooled = [combine(s[max(0, t - 1) : t + 2]) for t in range(40)]
        kept = set(torch.nonzero(mask[0, head]).flatten().tolist())
        chosen, dropped = kept - set(range(35, 40)), set(range(35)) - kept
        # the window, then the 11 best pooled scores (max pooling ties neighbours: any of equals may win)
        assert set(range(35, 40)) <= kept and len(chosen) == 11
        assert min(pooled[t] for t in chosen) >= max(pooled[t] for t in dropped)


def test_hole_fill_compacts_kept_tokens_below_the_budget():
    g = torch.Generator().manual_seed(3)
    state = _state(torch.rand(2, 3, 37, generator=g))
    mask = select_keep(parse_kv_policy("h2o:budget=12,recent=3"), state, 12, 37, 36)
    before = state.positions[:, :, :37].clone()
    moves = hole_fill_moves(mask, 12)
    assert bool((moves[2] >= 12).all()) and bool((moves[3] < 12).all())
    apply_moves_to_state(state, moves, 12)
    for layer in range(2):
        for head in range(3):
            kept = set(before[layer, head][mask[layer, head]].tolist())
            assert set(state.positions[layer, head, :12].tolist()) == kept


# ---- the kernels report attention weights --------------------------------------------------------------------
def _dense_scores(q, keys, visible_first, group, scale, first_query):
    """Weights each key receives from queries j >= first_query; query j sees keys [0, visible_first + j]."""
    n, hkv = q.shape[0], keys.shape[0]
    out = torch.zeros(hkv, keys.shape[1])
    for j in range(first_query, n):
        for h in range(hkv * group):
            kv_h = h // group
            logits = (keys[kv_h, : visible_first + j + 1] @ q[j, h]) * scale
            out[kv_h, : visible_first + j + 1] += torch.softmax(logits, dim=0)
    return out


@pytest.mark.parametrize("kernels", ["cpp", "torch"])
def test_attention_scores_match_dense_softmax(kernels):
    g = torch.Generator().manual_seed(0)
    nb, hkv, bs, d, group = 24, 2, 8, 16, 3
    kv = LayerKV(torch.zeros(nb, hkv, bs, d), torch.zeros(nb, hkv, bs, d))
    rows = [
        AttentionRow(1, 13, [3, 7], 0),
        AttentionRow(4, 20, [1, 2, 4], 2),
        AttentionRow(25, 40, [5, 6, 8, 9, 10], 7),
    ]
    meta = build_attention_metadata(rows, bs, torch.device("cpu"))
    t = meta.query_start_host[-1]
    # fill each row's cached part, then the step's own keys go in through write()
    for r in rows:
        cached = r.seq_len - r.query_len
        slots = torch.tensor([r.block_table[i // bs] * bs + i % bs for i in range(cached)], dtype=torch.long)
        kv.write(torch.randn(cached, hkv, d, generator=g), torch.randn(cached, hkv, d, generator=g), slots)
    q, k, v = (
        torch.randn(t, hkv * group, d, generator=g),
        torch.randn(t, hkv, d, generator=g),
        torch.randn(t, hkv, d, generator=g),
    )
    kv.write(k, v, meta.slot_mapping)
    kernel = load_cpu_kernels().paged_attention if kernels == "cpp" else None
    attn = PagedAttention(hkv * group, hkv, d, kernel=kernel)
    scores = torch.zeros(3, hkv, 40)
    attn(q, k, v, kv, meta, scores=scores)
    for b, r in enumerate(rows):
        s = meta.query_start_host[b]
        table = torch.tensor(r.block_table)
        keys = kv.k[table].transpose(0, 1).reshape(hkv, -1, d)[:, : r.seq_len]
        ref = _dense_scores(
            q[s : s + r.query_len], keys, r.seq_len - r.query_len, group, d**-0.5, r.score_from
        )
        torch.testing.assert_close(scores[b, :, : r.seq_len], ref, atol=1e-4, rtol=1e-4)
        assert math.isclose(float(scores[b].sum()), (r.query_len - r.score_from) * group * hkv, rel_tol=1e-4)


# ---- the engine against a reference decoder ------------------------------------------------------------------
class ReferenceDecoder:
    """The tiny Llama in plain torch with a dense per-layer KV cache, applying an eviction rule exactly as the
    engine schedules it (at the prompt's end, then a block's worth at a time), by masking what is evicted."""

    def __init__(self, config: dict, policy: str, block_size: int):
        self.c = config
        self.w = random_llama_weights(config)
        self.policy = parse_kv_policy(policy)
        self.block_size = block_size
        self.hkv, self.h, self.d = (
            config["num_key_value_heads"],
            config["num_attention_heads"],
            config["head_dim"],
        )
        inv = 1.0 / (config["rope_theta"] ** (torch.arange(0, self.d, 2).float() / self.d))
        self.inv_freq = inv

    def _rope(self, x, pos):
        freqs = pos.float()[:, None] * self.inv_freq[None]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[:, None], emb.sin()[:, None]
        x1, x2 = x[..., : self.d // 2], x[..., self.d // 2 :]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    @staticmethod
    def _norm(x, w, eps=1e-5):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def generate(self, prompt: list[int], max_tokens: int) -> list[int]:
        w, layers = self.w, self.c["num_hidden_layers"]
        keys = [torch.empty(self.hkv, 0, self.d) for _ in range(layers)]
        values = [torch.empty(self.hkv, 0, self.d) for _ in range(layers)]
        alive = [torch.empty(self.hkv, 0, dtype=torch.bool) for _ in range(layers)]  # per (head, position)
        scores = [torch.zeros(self.hkv, 0) for _ in range(layers)]
        tokens, out = list(prompt), []
        n_prompt, pol = len(prompt), self.policy
        keep = pol.budget_tokens(n_prompt)
        new_ids, start = list(prompt), 0
        while len(out) < max_tokens:
            pos = torch.arange(start, start + len(new_ids))
            x = w["model.embed_tokens.weight"][torch.tensor(new_ids)]
            for i in range(layers):
                p = f"model.layers.{i}."
                h = self._norm(x, w[p + "input_layernorm.weight"])
                q = self._rope((h @ w[p + "self_attn.q_proj.weight"].T).view(-1, self.h, self.d), pos)
                k = self._rope((h @ w[p + "self_attn.k_proj.weight"].T).view(-1, self.hkv, self.d), pos)
                v = (h @ w[p + "self_attn.v_proj.weight"].T).view(-1, self.hkv, self.d)
                keys[i] = torch.cat([keys[i], k.transpose(0, 1)], dim=1)
                values[i] = torch.cat([values[i], v.transpose(0, 1)], dim=1)
                alive[i] = torch.cat([alive[i], torch.ones(self.hkv, len(new_ids), dtype=torch.bool)], dim=1)
                scores[i] = torch.cat([scores[i], torch.zeros(self.hkv, len(new_ids))], dim=1)
                group = self.h // self.hkv
                att_out = torch.empty(len(new_ids), self.h, self.d)
                for j in range(len(new_ids)):
                    t = start + j
                    for head in range(self.h):
                        kv_h = head // group
                        visible = alive[i][kv_h, : t + 1].clone()
                        logits = (keys[i][kv_h, : t + 1] @ q[j, head]) * self.d**-0.5
                        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=0)
                        att_out[j, head] = probs @ values[i][kv_h, : t + 1]
                        if (
                            t >= pol.scored_from(n_prompt)
                            and pol.needs_scores
                            and (pol.kind == "h2o" or t < n_prompt)
                        ):
                            scores[i][kv_h, : t + 1] += probs
                x = x + att_out.reshape(len(new_ids), -1) @ w[p + "self_attn.o_proj.weight"].T
                h = self._norm(x, w[p + "post_attention_layernorm.weight"])
                gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
                x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
            logits = self._norm(x[-1], w["model.norm.weight"]) @ w["lm_head.weight"].T
            start += len(new_ids)
            held = int(alive[0][0].sum())
            prompt_end = start == n_prompt
            due = held > keep and (prompt_end or (pol.during_decode and held - keep >= self.block_size))
            if due:
                for i in range(layers):
                    self._evict(alive[i], scores[i], keep, n_prompt, start - 1)
            nxt = int(logits.argmax())
            out.append(nxt)
            tokens.append(nxt)
            new_ids = [nxt]
        return out

    def _evict(self, alive, scores, keep, n_prompt, newest):
        for head in range(self.hkv):
            held = torch.nonzero(alive[head]).flatten()
            state = SeqKVState.empty(1, 1, torch.device("cpu"))
            state.append(0, len(held))
            state.positions[0, 0, : len(held)] = held
            state.scores[0, 0, : len(held)] = scores[head, held]
            mask = select_keep(self.policy, state, keep, n_prompt, newest)[0, 0]
            alive[head, held[~mask]] = False


PROMPT = [(11 * i) % 800 + 7 for i in range(90)]


@pytest.mark.parametrize(
    "policy",
    ["streaming:sinks=4,window=20", "h2o:budget=0.25,recent=6", "snapkv:budget=30,window=8,kernel=3"],
)
def test_engine_matches_reference_decoder(tiny_model_dir, policy):
    llm = LLM(str(tiny_model_dir), kv_cache_memory="8MiB", block_size=8)
    out = llm.generate(
        [{"prompt_token_ids": PROMPT}],
        SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, kv_policy=policy),
        use_tqdm=False,
    )
    ref = ReferenceDecoder(TINY_CONFIG, policy, block_size=8).generate(PROMPT, 40)
    assert out[0].outputs[0].token_ids == ref
    stats = llm.engine.kv_compressor.stats
    assert stats.evictions >= (1 if policy.startswith("snapkv") else 3)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # nothing leaked
    full = llm.generate(
        [{"prompt_token_ids": PROMPT}],
        SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
        use_tqdm=False,
    )
    assert full[0].outputs[0].token_ids != ref  # eviction did change what the model saw


def test_compressed_requests_leave_batch_mates_exact(tiny_model_dir):
    prompts = [{"prompt_token_ids": [(13 * i + n) % 700 + 3 for i in range(n)]} for n in (40, 75, 120)]
    plain = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    alone = LLM(str(tiny_model_dir), kv_cache_memory="8MiB", block_size=8)
    expected = [o.outputs[0].token_ids for o in alone.generate(prompts, plain, use_tqdm=False)]
    llm = LLM(str(tiny_model_dir), kv_cache_memory="8MiB", block_size=8, max_num_batched_tokens=64)
    squeezed = [
        SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, kv_policy=p)
        for p in ("h2o:budget=16,recent=4", "snapkv:budget=0.3,window=8", "streaming:sinks=2,window=12")
    ]
    mixed = prompts + prompts
    outs = llm.generate(mixed, [plain] * 3 + squeezed, use_tqdm=False)  # chunked prefill: 64-token steps
    assert [o.outputs[0].token_ids for o in outs[:3]] == expected
    assert llm.engine.kv_compressor.stats.evictions >= 3
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_compressed_blocks_never_enter_the_prefix_cache(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), kv_cache_memory="8MiB", block_size=8)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, kv_policy="h2o:budget=24,recent=4")
    llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)
    assert not llm.engine.block_manager.cached  # nothing registered
    plain = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    first = llm.generate([{"prompt_token_ids": PROMPT}], plain, use_tqdm=False)
    assert first[0].num_cached_tokens == 0
    again = llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)  # does not read the cache
    assert llm.engine.block_manager.cached and again[0].num_cached_tokens == 0


def test_eviction_with_n_int8_and_chunked_prefill(tiny_model_dir):
    """n > 1 siblings each compute and compress their prompt, in 48-token chunks, over an int8 cache: greedy
    siblings stay identical (what is kept does not depend on how the prompt was chunked) and no block leaks."""
    llm = LLM(str(tiny_model_dir), kv_cache_dtype="int8", block_size=8, max_num_batched_tokens=48)
    params = SamplingParams(
        n=2, max_tokens=40, temperature=0, ignore_eos=True, kv_policy="h2o:budget=40,recent=8"
    )
    prompts = [{"prompt_token_ids": [(17 * i + n) % 600 + 9 for i in range(n)]} for n in (100, 130)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for o in outs:
        assert len(o.outputs) == 2 and o.outputs[0].token_ids == o.outputs[1].token_ids
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    assert llm.engine.kv_compressor.stats.evictions >= 4


def test_eviction_survives_preemption_and_keeps_memory_flat(tiny_model_dir):
    """A cache too small for the requests' full contexts: evicting requests are preempted, recomputed and
    finish; H2O holds at most budget + a block per sequence while generating."""
    bytes_per_token = 2 * 2 * 2 * 16 * 4
    llm = LLM(
        str(tiny_model_dir), kv_cache_memory=160 * bytes_per_token, block_size=8, max_num_batched_tokens=48
    )
    params = SamplingParams(
        max_tokens=120, temperature=0, ignore_eos=True, kv_policy="h2o:budget=32,recent=8"
    )
    prompts = [{"prompt_token_ids": [(17 * i + n) % 600 + 9 for i in range(n)]} for n in (100, 130, 90)]
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(p, params, request_id=f"r{i}")
    most = 0
    while engine.has_unfinished_requests():
        engine.step()
        for seq in engine.scheduler.running:
            if seq.num_computed_tokens > seq.num_prompt_tokens + 8:
                most = max(most, seq.num_kv_slots)
    assert most <= 32 + 8  # budget + one block while decoding (230-token contexts at the end)
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
