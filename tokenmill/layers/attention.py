"""Paged attention over a flat (ragged) token batch.

The batch puts single-token decodes first (one per sequence) and then prompt chunks. New K/V are written
into the paged cache at their slots (block id, offset in block); queries then attend over their sequence's blocks. Everything a
layer needs about the batch travels in `AttentionMetadata`, built once per step by the model runner.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillSpan:
    """One sequence with several query tokens: queries [start, start+length) see `context_len` cached keys."""

    query_start: int
    query_len: int
    context_len: int  # keys visible to the last query (cached prefix + this chunk)
    block_table: torch.Tensor  # [num_blocks] block ids covering context_len
    mask: torch.Tensor | None  # [query_len, context_len] bool, None when the chunk is the whole context


@dataclass
class AttentionMetadata:
    slot_blocks: torch.Tensor  # [T] block each new token's K/V goes to (slot = block * block_size + offset)
    slot_offsets: torch.Tensor  # [T] its offset inside that block
    num_decode_tokens: int  # the first tokens of the batch: one query per decoding sequence
    decode_block_tables: torch.Tensor  # [B, max_blocks]
    decode_context_lens: torch.Tensor  # [B] keys visible to each decode query (including its own)
    prefills: list[PrefillSpan]


class TorchAttention:
    """Reference backend: gather blocks by table, then `scaled_dot_product_attention`. On the CPU, decodes
    go to a C++ kernel that reads the blocks in place when it could be built.

    Decode queries of the G heads that share one KV head are stacked as G "query rows" of that KV head,
    so grouped-query attention needs no repeat of K/V.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, decode_kernel=None):
        self.decode_kernel = decode_kernel  # the C++ paged decode kernel (CPU), or None for pure torch
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group = num_heads // num_kv_heads
        self.scale = head_dim**-0.5

    def __call__(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, D]: each head's tokens contiguous in a block
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        kv_written: bool = False,  # the caller already wrote k/v to their slots (fused rotary + write)
    ) -> torch.Tensor:
        if not kv_written:
            k_cache[meta.slot_blocks, :, meta.slot_offsets] = k
            v_cache[meta.slot_blocks, :, meta.slot_offsets] = v
        out = torch.empty_like(q)
        nd = meta.num_decode_tokens
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta)
        for span in meta.prefills:
            s, e = span.query_start, span.query_start + span.query_len
            out[s:e] = self._prefill(q[s:e], k[s:e], v[s:e], k_cache, v_cache, span)
        return out

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata):
        if self.decode_kernel is not None:
            return self.decode_kernel(
                q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, self.scale
            )
        b = q.shape[0]
        hkv, d = self.num_kv_heads, self.head_dim
        keys = k_cache[meta.decode_block_tables].transpose(1, 2).reshape(b, hkv, -1, d)  # [B, Hkv, L, D]
        values = v_cache[meta.decode_block_tables].transpose(1, 2).reshape(b, hkv, -1, d)
        visible = torch.arange(keys.shape[2], device=q.device) < meta.decode_context_lens.unsqueeze(1)
        queries = q.view(b, hkv, self.group, d)  # heads of one KV group as query rows
        o = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=visible.view(b, 1, 1, -1), scale=self.scale
        )
        return o.reshape(b, self.num_heads, d)

    def _prefill(self, q, k, v, k_cache, v_cache, span: PrefillSpan) -> torch.Tensor:
        hkv, d = self.num_kv_heads, self.head_dim
        if span.mask is None:  # no cached prefix: attend to this chunk's own keys
            keys, values = k.transpose(0, 1), v.transpose(0, 1)
        else:  # [blocks, Hkv, bs, D] -> [Hkv, context, D]
            keys = k_cache[span.block_table].transpose(0, 1).reshape(hkv, -1, d)[:, : span.context_len]
            values = v_cache[span.block_table].transpose(0, 1).reshape(hkv, -1, d)[:, : span.context_len]
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            keys.unsqueeze(0),
            values.unsqueeze(0),
            attn_mask=span.mask,
            is_causal=span.mask is None,
            scale=self.scale,
            enable_gqa=self.group > 1,
        )
        return o.squeeze(0).transpose(0, 1)
