"""Paged attention over a flat (ragged) token batch: one backend interface, one metadata builder.

A step's tokens form rows, one per sequence: row b has `query_len` new tokens (a decode: 1; a speculative
verification: k + 1; a prompt chunk: many) whose K/V are written at their slots before attending, and it
attends over the first `seq_len` slots of its block table. Query j of a row sees slots
`[0, seq_len - query_len + j]`: everything cached before the row plus its own tokens up to itself.

Everything a layer needs about the batch is in `AttentionMetadata`, built once per step by
`build_attention_metadata` from plain per-row numbers (no engine objects). Rows with few queries come first
and run in one call of the paged kernel (C++ on the CPU, a batched torch reference elsewhere); longer prompt
chunks run through scaled-dot-product attention over their own keys (causal) and, when part of the prompt is
cached, over the cached prefix (no mask): the two partial results merge exactly through their log-sum-exp.

KV eviction policies rank cached tokens by the attention they receive. A row with `score_from >= 0` asks for
that: the attention weights of its queries from index `score_from` on (summed over the query heads of each KV
head) are added to the step's score buffer at `[row, kv_head, slot]`, by the paged kernel as it computes them
and, for long chunks, from the chunk's own query-key products.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.kv.cache import LayerKV

# Rows with at most this many queries go to the paged kernel: decodes, speculative verification rows, tiny
# prompt chunks. Longer chunks are compute-bound and run through SDPA (a GEMM-based flash attention).
MAX_PAGED_QUERY_LEN = 16
_KIVI_RESIDUAL = (torch.float32, torch.float16)  # residual dtypes the C++ KIVI kernel reads


@dataclass
class AttentionRow:
    """One sequence's part of a step, as plain numbers."""

    query_len: int  # new tokens of this row in the step
    seq_len: int  # slots the row attends over after writing its new tokens (held slots, not positions)
    block_table: list[int]  # physical blocks holding the row's slots, in order
    score_from: int = -1  # accumulate the attention weights of queries [score_from, query_len); -1: none


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] physical slot (block * block_size + offset) of each new token's K/V
    query_start_loc: torch.Tensor  # [B + 1] first token of each row in the flat batch
    seq_lens: torch.Tensor  # [B] slots each row attends over
    block_tables: torch.Tensor  # [B, max_blocks] (padded with 0)
    num_paged_rows: int  # rows [0, num_paged_rows) have <= MAX_PAGED_QUERY_LEN queries: the paged kernel
    query_start_host: list[int]  # query_start_loc and seq_lens as Python ints, for the per-chunk path
    seq_lens_host: list[int]
    score_from: torch.Tensor | None = None  # [B] per-row first scored query (-1: none); None: no row scores
    score_from_host: list[int] | None = None
    scores: torch.Tensor | None = (
        None  # [num_layers, B, Hkv, max seq_len] fp32, set by whoever asked for scores
    )

    @property
    def wants_scores(self) -> bool:
        return self.score_from is not None

    def layer_scores(self, layer: int) -> torch.Tensor | None:
        """Layer `layer`'s score buffer `[B, Hkv, max seq_len]`, or None when no row asked for scores."""
        return None if self.scores is None or self.score_from is None else self.scores[layer]

    @property
    def num_rows(self) -> int:
        return len(self.seq_lens_host)

    @property
    def num_paged_tokens(self) -> int:
        return self.query_start_host[self.num_paged_rows]


def build_attention_metadata(
    rows: Sequence[AttentionRow], block_size: int, device: torch.device
) -> AttentionMetadata:
    """Flatten rows (in the batch's token order) into the step's metadata; the slot of every new token
    comes from its row's block table and its index among the row's held slots, never from its position."""
    query_lens = [r.query_len for r in rows]
    seq_lens = [r.seq_len for r in rows]
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    num_paged = 0
    while num_paged < len(rows) and query_lens[num_paged] <= MAX_PAGED_QUERY_LEN:
        num_paged += 1
    max_blocks = max((len(r.block_table) for r in rows), default=0)
    tables = torch.tensor(
        [r.block_table + [0] * (max_blocks - len(r.block_table)) for r in rows], dtype=torch.long
    ).view(len(rows), max_blocks)
    qlens = torch.tensor(query_lens, dtype=torch.long)
    slens = torch.tensor(seq_lens, dtype=torch.long)
    # slot index within each row: seq_len - query_len + j for its j-th new token
    row_of_token = torch.repeat_interleave(torch.arange(len(rows)), qlens)
    start_t = torch.tensor(starts, dtype=torch.long)
    within = torch.arange(starts[-1]) - start_t[row_of_token] + (slens - qlens)[row_of_token]
    blocks = tables[row_of_token, within // block_size]
    slot_mapping = blocks * block_size + within % block_size
    score_from = [r.score_from for r in rows]
    scored = any(f >= 0 for f in score_from)
    return AttentionMetadata(
        slot_mapping=slot_mapping.to(device),
        query_start_loc=start_t.to(device),
        seq_lens=slens.to(device),
        block_tables=tables.to(device),
        num_paged_rows=num_paged,
        query_start_host=starts,
        seq_lens_host=seq_lens,
        score_from=torch.tensor(score_from, dtype=torch.long, device=device) if scored else None,
        score_from_host=score_from if scored else None,
    )


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets: outputs `[..., H, D]` and their log-sum-exps `[..., H]`.
    Equals attention over the union (a key set may be empty: lse = -inf)."""
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = wa + wb
    out = (out_a.float() * (wa / total).unsqueeze(-1) + out_b.float() * (wb / total).unsqueeze(-1)).to(
        out_a.dtype
    )
    return out, m + torch.log(total)


def sdpa_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention `[N, H, Lq, D]` x `[N, H, Lk, D]` returning (out, lse `[N, H, Lq]` fp32). On the CPU it is
    torch's flash-attention kernel, the same one F.scaled_dot_product_attention runs; elsewhere plain math.
    A causal mask is aligned top-left (query i sees keys 0..i), as SDPA's."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale
        )
        return out, lse.float()
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        lq, lk = scores.shape[-2:]
        scores = scores.masked_fill(
            torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1), float("-inf")
        )
    lse = torch.logsumexp(scores, dim=-1)
    out = (torch.exp(scores - lse.unsqueeze(-1)) @ v.float()).to(q.dtype)
    return out, lse


class PagedAttention:
    """The attention backend. `kernel` is the C++ `paged_attention` (CPU) or None for the torch reference.

    The query heads that share one KV head are handled as rows of that KV head, so grouped-query attention
    never repeats K/V of the cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, kernel=None, kivi_kernel=None):
        self.kernel = kernel
        self.kivi_kernel = kivi_kernel  # the C++ kivi_paged_attention, for KIVI caches (fp32)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group = num_heads // num_kv_heads
        self.scale = head_dim**-0.5

    def __call__(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D] this step's keys (already in the cache at their slots)
        v: torch.Tensor,
        kv: LayerKV,  # this layer's paged cache: [num_blocks, Hkv, block_size, D] K and V (+ scales)
        meta: AttentionMetadata,
        return_lse: bool = False,
        scores: torch.Tensor
        | None = None,  # [B, Hkv, >= max seq_len] fp32, accumulated into (see module doc)
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attention output `[T, H, D]` (and, if asked, its log-sum-exp `[T, H]` in fp32)."""
        if scores is not None and not meta.wants_scores:
            scores = None
        if 0 < meta.num_paged_rows == meta.num_rows and meta.num_paged_tokens == q.shape[0]:
            # every row is a decode/verification row (the common decode step): the kernel's output as is
            o, part_lse = self.paged(
                q,
                kv,
                meta.block_tables,
                meta.seq_lens,
                meta.query_start_loc,
                return_lse,
                scores,
                None if scores is None else meta.score_from,
            )
            return (o, part_lse) if return_lse else o
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if return_lse else None
        n_paged = meta.num_paged_tokens
        if meta.num_paged_rows:
            rows = slice(0, meta.num_paged_rows)
            o, part_lse = self.paged(
                q[:n_paged],
                kv,
                meta.block_tables[rows],
                meta.seq_lens[rows],
                meta.query_start_loc[: meta.num_paged_rows + 1],
                return_lse,
                None if scores is None else scores[rows],
                None if scores is None else meta.score_from[rows],
            )
            out[:n_paged] = o
            if lse is not None:
                lse[:n_paged] = part_lse
        for b in range(meta.num_paged_rows, meta.num_rows):
            s, e = meta.query_start_host[b], meta.query_start_host[b + 1]
            cached = meta.seq_lens_host[b] - (e - s)
            o, part_lse = self._chunk(q[s:e], k[s:e], v[s:e], kv, meta.block_tables[b], cached, return_lse)
            out[s:e] = o
            if scores is not None and meta.score_from_host[b] >= 0:
                self._chunk_scores(
                    q[s:e], k[s:e], kv, meta.block_tables[b], cached, meta.score_from_host[b], scores[b]
                )
            if lse is not None:
                lse[s:e] = part_lse
        return (out, lse) if return_lse else out

    # ---- rows with few queries: the paged kernel ------------------------------------------------
    def paged(
        self,
        q,
        kv: LayerKV,
        block_tables,
        seq_lens,
        query_start_loc,
        return_lse: bool = False,
        scores: torch.Tensor | None = None,
        score_from: torch.Tensor | None = None,
    ):
        """Rows of a few queries each, read from the cache in place (packed formats too). Returns
        (out, lse or None); adds the rows' attention weights into `scores` where `score_from` asks."""
        if kv.kivi:
            if self.kivi_kernel is not None and q.dtype == torch.float32 and kv.res_k.dtype in _KIVI_RESIDUAL:
                out, lse = self.kivi_kernel(
                    q, kv.k, kv.v, kv.k_scale, kv.v_scale, kv.res_k, kv.res_v, kv.open_slot, kv.kivi_bits,
                    block_tables, seq_lens, query_start_loc, self.scale, return_lse, scores, score_from,
                )  # fmt: skip
                return out, (lse if return_lse else None)
        elif self.kernel is not None:
            out, lse = self.kernel(
                q,
                kv.k,
                kv.v,
                kv.k_scale,
                kv.v_scale,
                block_tables,
                seq_lens,
                query_start_loc,
                self.scale,
                return_lse,
                scores,
                score_from,
            )
            return out, (lse if return_lse else None)
        return self._paged_torch(q, kv, block_tables, seq_lens, query_start_loc, scores, score_from)

    def _paged_torch(
        self, q, kv: LayerKV, block_tables, seq_lens, query_start_loc, score_sink=None, score_from=None
    ):
        """Batched reference: pad every row to the longest query count and context, mask what a query may
        not see, and compute softmax attention explicitly (the log-sum-exp comes with it)."""
        b = seq_lens.shape[0]
        hkv, g, d = self.num_kv_heads, self.group, self.head_dim
        qlens = query_start_loc[1:] - query_start_loc[:-1]
        max_q = int(qlens.max())
        keys, values = kv.blocks(block_tables, q.dtype)  # [B, max_blocks, Hkv, bs, D]
        keys = keys.transpose(1, 2).reshape(b, hkv, -1, d)  # [B, Hkv, L, D]
        values = values.transpose(1, 2).reshape(b, hkv, -1, d)
        j = torch.arange(max_q, device=q.device)
        valid = j.unsqueeze(0) < qlens.unsqueeze(1)  # [B, max_q]
        token = (query_start_loc[:-1].unsqueeze(1) + j).clamp(max=max(q.shape[0] - 1, 0))
        queries = q[token].view(b, max_q, hkv, g, d).permute(0, 2, 1, 3, 4).reshape(b, hkv, max_q * g, d)
        visible_to = (seq_lens - qlens).unsqueeze(1) + j + 1  # [B, max_q]: keys [0, visible_to)
        t = torch.arange(keys.shape[2], device=q.device)
        mask = t.view(1, 1, -1) < visible_to.unsqueeze(-1)  # [B, max_q, L]
        mask = mask.repeat_interleave(g, dim=1).unsqueeze(1)  # [B, 1, max_q * g, L]
        scores = (queries.float() @ keys.float().transpose(-1, -2)) * self.scale
        scores = scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, max_q * g]
        safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        probs = torch.exp(scores - safe.unsqueeze(-1))  # [B, Hkv, max_q * g, L]
        if score_sink is not None:
            counted = (j.unsqueeze(0) >= score_from.unsqueeze(1)) & (score_from.unsqueeze(1) >= 0) & valid
            weights = probs * counted.repeat_interleave(g, dim=1).view(b, 1, -1, 1)
            n_keys = min(weights.shape[-1], score_sink.shape[-1])
            score_sink[:, :, :n_keys] += weights.sum(dim=2)[:, :, :n_keys]
        o = probs @ values.float()  # [B, Hkv, max_q * g, D]
        o = o.view(b, hkv, max_q, g, d).permute(0, 2, 1, 3, 4).reshape(b, max_q, -1, d)
        lse = lse.view(b, hkv, max_q, g).permute(0, 2, 1, 3).reshape(b, max_q, -1)
        return o[valid].to(q.dtype), lse[valid]

    # ---- long prompt chunks: SDPA, merged with the cached prefix ---------------------------------
    def _chunk(self, q, k, v, kv: LayerKV, block_table, cached: int, return_lse: bool):
        """One chunk of n queries over `cached` earlier slots plus its own n keys (causal)."""
        n, g, hkv, d = q.shape[0], self.group, self.num_kv_heads, self.head_dim
        if cached == 0 and not return_lse:  # the common prompt case: exactly F.sdpa, as before
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0),
                k.transpose(0, 1).unsqueeze(0),
                v.transpose(0, 1).unsqueeze(0),
                is_causal=True,
                scale=self.scale,
                enable_gqa=g > 1,
            )
            return o.squeeze(0).transpose(0, 1), None
        own_k = k.repeat_interleave(g, dim=1) if g > 1 else k
        own_v = v.repeat_interleave(g, dim=1) if g > 1 else v
        o_own, l_own = sdpa_with_lse(
            q.transpose(0, 1).unsqueeze(0),
            own_k.transpose(0, 1).unsqueeze(0),
            own_v.transpose(0, 1).unsqueeze(0),
            causal=True,
            scale=self.scale,
        )
        o_own, l_own = o_own.squeeze(0).transpose(0, 1), l_own.squeeze(0).transpose(0, 1)  # [n, H, D], [n, H]
        if cached == 0:
            return o_own, l_own
        pk, pv = kv.blocks(block_table[: -(-cached // kv.block_size)], q.dtype)
        pk = pk.transpose(0, 1).reshape(hkv, -1, d)[:, :cached]
        pv = pv.transpose(0, 1).reshape(hkv, -1, d)[:, :cached]
        # every query sees the whole prefix: the G heads of a KV head are stacked as its query rows
        qp = q.view(n, hkv, g, d).permute(1, 0, 2, 3).reshape(1, hkv, n * g, d)
        o_pre, l_pre = sdpa_with_lse(qp, pk.unsqueeze(0), pv.unsqueeze(0), causal=False, scale=self.scale)
        o_pre = o_pre.view(hkv, n, g, d).permute(1, 0, 2, 3).reshape(n, -1, d)
        l_pre = l_pre.view(hkv, n, g).permute(1, 0, 2).reshape(n, -1)
        return merge_attention(o_pre, l_pre, o_own, l_own)

    def _chunk_scores(
        self, q, k, kv: LayerKV, block_table, cached: int, first: int, sink: torch.Tensor
    ) -> None:
        """Add the attention weights of a long chunk's queries [first, n) to `sink` `[Hkv, >= cached + n]`: their
        scores against the cached prefix and the chunk's own keys (causal), softmax-normalised over both.
        Done in slices of queries so the weight matrix stays small."""
        n, g, hkv, d = q.shape[0], self.group, self.num_kv_heads, self.head_dim
        if first >= n:
            return
        keys = k.transpose(0, 1).float()  # [Hkv, n, D]
        if cached:
            pk, _ = kv.blocks(block_table[: -(-cached // kv.block_size)], torch.float32)
            keys = torch.cat([pk.transpose(0, 1).reshape(hkv, -1, d)[:, :cached], keys], dim=1)
        total = cached + n
        for s in range(first, n, 256):
            e = min(n, s + 256)
            qs = q[s:e].float().view(e - s, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, (e - s) * g, d)
            logits = (qs @ keys.transpose(-1, -2)) * self.scale  # [Hkv, m * g, total]
            last_visible = (cached + torch.arange(s, e, device=q.device)).repeat_interleave(g)
            hidden = torch.arange(total, device=q.device).view(1, -1) > last_visible.view(-1, 1)
            probs = torch.softmax(logits.masked_fill(hidden, float("-inf")), dim=-1)
            sink[:, :total] += probs.sum(dim=1)
