"""Draft-model proposals: a smaller model with the target's tokenizer guesses k tokens greedily.

The draft runs through the engine's own pieces: a ModelRunner over its model and a paged KVCache, a
BlockManager for its blocks, and one shadow Sequence per target sequence (its tokens and block table in the
draft's cache). Every step the shadow catches up with the target: tokens the target rejected are rolled back
(`release_unused` frees their slots), the accepted ones and the target's own token are run through the draft
together with the first guess, then k - 1 one-token passes follow, all sequences batched in each pass.
Greedy drafts are point proposals, so the target's verification (Sampler.verify) stays lossless for greedy
and sampled requests alike. Layer skipping (spec/layerskip.py) reuses this class with the target's model and
a subset of its layers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.model_runner import ModelRunner
from tokenmill.engine.scheduler import ScheduledBatch, ScheduledSeq
from tokenmill.engine.sequence import Request, Sequence, SequenceStatus
from tokenmill.kv.cache import KVCache, KVCacheSpec
from tokenmill.layers.sampler import Sampler
from tokenmill.models.llama import LlamaModel
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec import DraftAsk

if TYPE_CHECKING:
    from tokenmill.config import EngineConfig
    from tokenmill.models.model_config import ModelConfig
    from tokenmill.models.tokenizer import Tokenizer
    from tokenmill.spec.config import SpeculativeConfig


@dataclass(eq=False)
class _Shadow:
    seq: Sequence  # the draft's copy: target tokens + guesses, and the draft cache's block table
    base_len: int  # target tokens at the last proposal: the draft's tokens before this never change


class DraftProposer:
    """Greedy k-token drafts from `model` over its own paged cache (running the model layers that cache
    holds: all, or a subset for layer skipping)."""

    def __init__(
        self,
        model: LlamaModel,
        kv_cache: KVCache,
        block_manager: BlockManager,
        prior_cost: float = 0.2,
    ):
        self.runner = ModelRunner(model, kv_cache, Sampler(set()))  # only its forward pass is used
        self.block_manager = block_manager
        self.prior_cost = prior_cost
        self._shadows: dict[int, _Shadow] = {}
        self._request = Request("draft", None, [], SamplingParams())  # shadows need one; nothing reads it
        self.num_passes = 0
        self.seconds = 0.0  # time in draft forward passes, for benchmarks

    def _shadow(self, seq_id: int) -> _Shadow:
        shadow = self._shadows.get(seq_id)
        if shadow is None:
            seq = Sequence(seq_id, self._request, 0, [], torch.Generator(), None, 0)  # type: ignore[arg-type]
            seq.status = SequenceStatus.RUNNING
            shadow = self._shadows[seq_id] = _Shadow(seq, 0)
        return shadow

    def release(self, seq_id: int) -> None:
        shadow = self._shadows.pop(seq_id, None)
        if shadow is not None:
            self.block_manager.free(shadow.seq)

    def _sync(self, shadow: _Shadow, tokens: list[int]) -> None:
        """Make the shadow's tokens the target's, keeping computed K/V only for the common prefix (and never
        the last token's: its logits give the first guess)."""
        seq = shadow.seq
        common = shadow.base_len
        limit = min(len(seq.token_ids), len(tokens))
        while common < limit and seq.token_ids[common] == tokens[common]:
            common += 1
        keep = min(seq.num_computed_tokens, common, len(tokens) - 1)
        if keep < seq.num_computed_tokens:
            seq.num_computed_tokens = keep
            self.block_manager.release_unused(seq)  # the rejected guesses' slots
        seq.token_ids = list(tokens)
        shadow.base_len = len(tokens)

    def propose(self, asks: list[DraftAsk]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in asks]
        live: list[tuple[int, _Shadow]] = []
        for i, ask in enumerate(asks):
            if ask.k > 0:
                shadow = self._shadow(ask.seq_id)
                self._sync(shadow, ask.token_ids)
                live.append((i, shadow))
        bm = self.block_manager
        started = time.perf_counter()
        while live:
            batch = ScheduledBatch()
            index: dict[int, int] = {}
            for i, shadow in live:
                seq = shadow.seq
                n = seq.num_tokens - seq.num_computed_tokens
                if not bm.can_append(seq, n):
                    self.release(seq.seq_id)  # the draft cache is full: no guess for it this step
                    continue
                batch.copies += bm.append_slots(seq, n)
                batch.seqs.append(ScheduledSeq(seq, n))
                index[seq.seq_id] = i
            if not batch:
                break
            step = self.runner.execute(batch)
            guesses = step.logits.argmax(dim=-1).tolist()
            self.num_passes += 1
            for (scheduled, _), token in zip(step.rows, guesses, strict=True):
                seq = scheduled.seq
                seq.num_computed_tokens += scheduled.num_new_tokens
                seq.token_ids.append(token)
                drafts[index[seq.seq_id]].append(token)
            live = [(i, sh) for i, sh in live if sh.seq.seq_id in index and len(drafts[i]) < asks[i].k]
        self.seconds += time.perf_counter() - started
        return drafts


def check_same_vocabulary(
    target: Tokenizer, target_vocab: int, draft: Tokenizer, draft_vocab: int, name: str
):
    """A draft must speak the target's token ids: same tokenizer vocabulary, no id past the target's."""
    if draft_vocab > target_vocab:
        raise ValueError(
            f"speculative_config.model {name!r} has a vocabulary of {draft_vocab} ids, more than the target's "
            f"{target_vocab}: it needs the target's tokenizer"
        )
    if draft.vocab_size != target.vocab_size or draft.backend.get_vocab() != target.backend.get_vocab():
        raise ValueError(
            f"speculative_config.model {name!r} has a different tokenizer ({draft.vocab_size} tokens) from the "
            f"target's ({target.vocab_size} tokens): a draft model must share the target's tokenizer"
        )


def draft_num_blocks(target_blocks: int, target_block_size: int, max_num_seqs: int, k: int) -> int:
    """The draft cache holds what the target's does plus each sequence's guesses: one block more per
    sequence and k, so a sequence the target can run never starves the draft."""
    return target_blocks + max_num_seqs * (1 + -(-k // target_block_size))


def load_draft_proposer(
    config: EngineConfig,
    spec: SpeculativeConfig,
    target_config: ModelConfig,
    target_tokenizer: Tokenizer,
    max_model_len: int,
    target_blocks: int,
) -> DraftProposer:
    """Load the draft model with the engine's device, dtype and kernels, its weights and activations as
    `spec` asks (the engine's by default), and size its cache."""
    from tokenmill.models.registry import load_model
    from tokenmill.models.source import resolve_model

    path, num_speculative_tokens = spec.model, spec.num_speculative_tokens
    assert path is not None  # SpeculativeConfig requires it for draft_model
    source = resolve_model(path)
    try:
        loaded = load_model(
            source,
            config.torch_device,
            config.torch_dtype,
            max_model_len,
            spec.draft_weights or config.weights,
            kernels=config.kernels,
            cpu_isa=config.cpu_isa,
            activations=spec.draft_activations or config.activations,
        )
    except ValueError as exc:
        raise ValueError(f"speculative_config draft model {path!r}: {exc}") from None
    check_same_vocabulary(
        target_tokenizer, target_config.vocab_size, loaded.tokenizer, loaded.config.vocab_size, path
    )
    c = loaded.config
    spec = KVCacheSpec(
        c.num_layers, c.num_kv_heads, c.head_dim, config.block_size, config.torch_dtype, config.kv_cache_dtype
    )
    blocks = draft_num_blocks(target_blocks, config.block_size, config.max_num_seqs, num_speculative_tokens)
    kv = KVCache(
        spec,
        blocks,
        config.torch_device,
        zero=loaded.model.kernels is None,
        residual_blocks=config.max_num_seqs,
    )  # a KIVI draft cache: a residual block per shadow sequence
    cost = decode_weights(loaded.config) / decode_weights(target_config)
    bm = BlockManager(blocks, config.block_size, False, on_free=kv.release_block)
    return DraftProposer(loaded.model, kv, bm, prior_cost=cost)


def decode_weights(c: ModelConfig, num_layers: int | None = None) -> int:
    """Weight elements a decode step reads (the layers run and the LM head): a CPU decode step's time is
    about proportional to it, so it gives a proposer's prior cost relative to the target."""
    h = c.hidden_size
    attn = h * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * h * c.intermediate_size
    layers = c.num_layers if num_layers is None else num_layers
    return layers * (attn + mlp) + c.vocab_size * h
