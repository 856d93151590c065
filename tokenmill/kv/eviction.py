"""Eviction mechanics: per-sequence bookkeeping, which slots a policy keeps, and how kept tokens are compacted.

A sequence under an evicting policy holds `S` slots; per (layer, KV head) each slot holds one token, and after
the first eviction different heads hold different tokens in the same slot. `SeqKVState` records, per (layer,
head, slot), the position of the token held there (recency, sinks, SnapKV's observation window are defined on
positions) and the attention weight it has received (H2O's accumulated attention, SnapKV's window attention).

`select_keep` picks exactly `K` slots per (layer, head). `hole_fill_moves` then compacts them into slots
`[0, K)` by moving only the kept tokens that sit at or past `K` into the holes below `K`: at most the number
of evicted tokens move, instead of rewriting the whole cache. Slot order is free to change because keys are
stored after rotary (a token keeps its position wherever it sits) and a query sees every held slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.kv.policy import KVPolicy

_FORCED = 1e30  # priority of tokens a policy always keeps (sinks, recent window, observation window)


@dataclass
class SeqKVState:
    positions: torch.Tensor  # [L, Hkv, capacity] int64: position of the token held in each slot
    scores: torch.Tensor  # [L, Hkv, capacity] fp32: attention weight each held token has received
    length: int = 0  # slots in use
    prompt_compressed: bool = False  # the end-of-prompt eviction has happened

    @classmethod
    def empty(
        cls, num_layers: int, num_kv_heads: int, device: torch.device, capacity: int = 64
    ) -> SeqKVState:
        shape = (num_layers, num_kv_heads, capacity)
        return cls(
            torch.zeros(shape, dtype=torch.long, device=device),
            torch.zeros(shape, dtype=torch.float32, device=device),
        )

    def _reserve(self, n: int) -> None:
        cap = self.positions.shape[-1]
        if n <= cap:
            return
        new_cap = max(n, 2 * cap)
        pad = new_cap - cap
        self.positions = F.pad(self.positions, (0, pad))
        self.scores = F.pad(self.scores, (0, pad))

    def append(self, first_position: int, count: int) -> None:
        """New slots `[length, length + count)` hold positions `first_position ...` in every head."""
        if count <= 0:
            return
        self._reserve(self.length + count)
        new = torch.arange(first_position, first_position + count, device=self.positions.device)
        self.positions[:, :, self.length : self.length + count] = new
        self.scores[:, :, self.length : self.length + count] = 0
        self.length += count

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def add_scores(self, scores: torch.Tensor) -> None:
        """Add a step's attention weights `[L, Hkv, n]` over slots `[0, n)` (n <= length)."""
        n = min(scores.shape[-1], self.length)
        self.scores[:, :, :n] += scores[:, :, :n]

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.positions[:, :, : self.length], self.scores[:, :, : self.length]


def select_keep(
    policy: KVPolicy, state: SeqKVState, keep: int, prompt_len: int, newest_position: int
) -> torch.Tensor:
    """Boolean `[L, Hkv, S]` with exactly `keep` True per (layer, head): the slots the policy keeps."""
    positions, scores = state.view()
    s = positions.shape[-1]
    if keep >= s:
        return torch.ones_like(positions, dtype=torch.bool)
    forced = positions < policy.sinks
    if policy.kind == "streaming":
        priority = positions.float()  # newest first
    elif policy.kind == "h2o":
        priority = scores
        forced |= positions > newest_position - policy.recent
    elif policy.kind == "snapkv":
        priority = _pool(scores, positions, policy.kernel, policy.pool)
        forced |= positions >= prompt_len - policy.window
    else:
        raise ValueError(f"policy {policy.kind!r} does not evict")
    # forced tokens first (the newest of them if even those exceed the budget), then by priority
    priority = torch.where(forced, _FORCED + positions.float(), priority)
    chosen = priority.topk(keep, dim=-1).indices
    mask = torch.zeros_like(positions, dtype=torch.bool)
    mask.scatter_(-1, chosen, True)
    return mask


def _pool(scores: torch.Tensor, positions: torch.Tensor, kernel: int, how: str = "max") -> torch.Tensor:
    """SnapKV's clustering: each token scored by the max (or mean) of the `kernel` scores around it in position
    order, so a kept token brings its neighbours: a 5-digit key is 5 tokens, and a head that keeps only the
    digits it attends to most answers with a fragment of the key. Slots are put in position order, pooled and
    put back."""
    if kernel <= 1:
        return scores
    order = positions.argsort(dim=-1)
    ordered = scores.gather(-1, order)
    layers, heads, s = ordered.shape
    rows = ordered.reshape(layers * heads, 1, s)
    if how == "max":
        pooled = F.max_pool1d(rows, kernel, stride=1, padding=kernel // 2)
    else:
        pooled = F.avg_pool1d(rows, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    out = torch.empty_like(scores)
    out.scatter_(-1, order, pooled.view(layers, heads, s))
    return out


def hole_fill_moves(
    keep_mask: torch.Tensor, keep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(layer, head, src slot, dst slot) index tensors that move every kept slot at or past `keep` into a
    dropped slot below `keep`. Sources are all >= keep and destinations < keep, so no move overwrites a
    source."""
    head, tail = keep_mask[..., :keep], keep_mask[..., keep:]
    holes = torch.argsort(head.to(torch.uint8), dim=-1, stable=True)  # dropped slots first
    movers = torch.argsort((~tail).to(torch.uint8), dim=-1, stable=True) + keep  # kept slots first
    count = (~head).sum(-1)  # per (layer, head): holes below keep == kept slots past it
    most = int(count.max()) if count.numel() else 0
    if most == 0:
        empty = torch.empty(0, dtype=torch.long, device=keep_mask.device)
        return empty, empty, empty, empty
    valid = torch.arange(most, device=keep_mask.device) < count.unsqueeze(-1)  # [L, Hkv, most]
    n_layers, n_heads = keep_mask.shape[:2]
    dev = keep_mask.device
    layer = torch.arange(n_layers, device=dev).view(-1, 1, 1).expand(n_layers, n_heads, most)[valid]
    kv_head = torch.arange(n_heads, device=dev).view(1, -1, 1).expand(n_layers, n_heads, most)[valid]
    return layer, kv_head, movers[..., :most][valid], holes[..., :most][valid]


def apply_moves_to_state(
    state: SeqKVState, moves: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], keep: int
) -> None:
    layer, head, src, dst = moves
    state.positions[layer, head, dst] = state.positions[layer, head, src]
    state.scores[layer, head, dst] = state.scores[layer, head, src]
    state.length = keep
