"""Self-speculative drafts (SWIFT, LayerSkip, Draft & Verify): the target model with some layers skipped.

The draft shares the target's weights and keeps its own paged K/V for the layers it runs (a KVCache of
len(kept) layers addressed by the target's layer indices: `model_layers`). Reusing the target's K/V for the kept
layers would save that memory and the catch-up of accepted tokens, but the draft's writes for its guesses
would have to go into target slots the scheduler has not allocated yet, and the kept layers' K/V would mix
two different models' values; a cache of its own is simply the draft-model path (spec/draft.py) again, with
the same rollback, preemption and release handling, so that is what runs.

`search_skip_layers` picks the subset: on a calibration text, the draft's teacher-forced greedy agreement
with the full model is its acceptance rate, a skipped layer saves its share of the weights read per token,
and spec/adaptive.py's speedup model scores a subset at batch 1. A greedy search adds, round by round, the
layer whose skipping scores best and keeps the best subset on that path; random swaps then refine it (SWIFT
uses a similar cheap search instead of training).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.model_runner import ModelRunner
from tokenmill.engine.scheduler import ScheduledBatch, ScheduledSeq
from tokenmill.engine.sequence import Request, Sequence
from tokenmill.kv.cache import KVCache, KVCacheSpec
from tokenmill.layers.sampler import Sampler
from tokenmill.models.llama import LlamaModel
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec.adaptive import PRIOR_TOKENS_PER_FIXED, speedup
from tokenmill.spec.config import kept_layers
from tokenmill.spec.draft import DraftProposer, decode_weights, draft_num_blocks

if TYPE_CHECKING:
    from tokenmill.models.model_config import ModelConfig


def layerskip_cost(config: ModelConfig, num_kept: int) -> float:
    """A draft pass relative to a full decode step: the share of the weights it reads."""
    return decode_weights(config, num_kept) / decode_weights(config)


def layerskip_proposer(
    model: LlamaModel,
    target_spec: KVCacheSpec,
    skip: tuple[int, ...] | list[int],
    target_blocks: int,
    max_num_seqs: int,
    k: int,
    device: torch.device,
) -> DraftProposer:
    """The target model as its own draft, running all layers but `skip`, with a cache for the kept ones."""
    kept = kept_layers(model.config.num_layers, skip)
    spec = KVCacheSpec(
        len(kept), target_spec.num_kv_heads, target_spec.head_dim, target_spec.block_size, target_spec.dtype,
        target_spec.cache_dtype,
    )  # fmt: skip
    blocks = draft_num_blocks(target_blocks, target_spec.block_size, max_num_seqs, k)
    cache = KVCache(
        spec, blocks, device, zero=model.kernels is None, residual_blocks=max_num_seqs, model_layers=kept
    )
    bm = BlockManager(blocks, target_spec.block_size, False, on_free=cache.release_block)
    return DraftProposer(model, cache, bm, prior_cost=layerskip_cost(model.config, len(kept)))


# ---- calibration --------------------------------------------------------------------------------------------
def teacher_forced_argmax(
    model: LlamaModel, spec: KVCacheSpec, tokens: list[int], layers: list[int] | None, device: torch.device
) -> torch.Tensor:
    """The model's greedy next token after every prefix of `tokens` (running `layers`), in one pass."""
    bm = BlockManager(-(-len(tokens) // spec.block_size), spec.block_size, False)
    kv = KVCache(dataclasses.replace(spec, num_layers=model.config.num_layers), bm.num_blocks, device)
    seq = Sequence(
        0, Request("calibration", None, [], SamplingParams()), 0, list(tokens), torch.Generator(), None, 0
    )  # type: ignore[arg-type]
    bm.append_slots(seq, len(tokens))
    batch = ScheduledBatch([ScheduledSeq(seq, len(tokens), extra_logits=len(tokens) - 1)])
    step = ModelRunner(model, kv, Sampler(set())).execute(batch, layers)
    return step.logits.argmax(dim=-1)


MIN_AGREEMENT = 0.1  # the greedy path stops once the draft agrees with the model this rarely


@dataclass
class SkipSearchResult:
    skip_layers: list[int]
    num_layers: int
    acceptance: float  # teacher-forced greedy agreement with the full model on the calibration text
    draft_cost: float  # one draft pass / one full decode step (weights read)
    best_k: int
    predicted_speedup: float  # at batch 1, by spec/adaptive.py's model
    evaluations: int
    seconds: float
    trials: list[dict] = field(default_factory=list)  # every subset scored: skip_layers, acceptance, score
    # the greedy path: round n's subset skips n layers, the best n-th layer to add to round n - 1's (the
    # candidates for lossy layer skipping, `--skip-layers`, at each depth)
    path: list[list[int]] = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")


def search_skip_layers(
    model: LlamaModel,
    spec: KVCacheSpec,
    tokens: list[int],
    device: torch.device,
    max_k: int = 8,
    max_evals: int = 200,
    random_swaps: int = 20,
    seed: int = 0,
) -> SkipSearchResult:
    """Which layers to skip for the best predicted speedup at batch 1 (see the module docstring)."""
    started = time.perf_counter()
    c = model.config
    n = c.num_layers
    if len(tokens) < 8:
        raise ValueError(f"the calibration text has {len(tokens)} tokens; give at least 8")
    reference = teacher_forced_argmax(model, spec, tokens, None, device)
    scores: dict[tuple[int, ...], tuple[float, float, int]] = {}
    trials: list[dict] = []

    def score(skip: tuple[int, ...]) -> float:
        if skip in scores:
            return scores[skip][0]
        kept = [i for i in range(n) if i not in skip]
        agree = float((teacher_forced_argmax(model, spec, tokens, kept, device) == reference).float().mean())
        cost = layerskip_cost(c, len(kept))
        best = max(
            ((speedup(agree, k, 1, 1.0, 1.0 / PRIOR_TOKENS_PER_FIXED, cost), k) for k in range(1, max_k + 1)),
        )
        scores[skip] = (best[0], agree, best[1])
        trials.append({"skip_layers": list(skip), "acceptance": agree, "score": best[0], "k": best[1]})
        return best[0]

    # Greedy path: each round skips the one more layer that scores best, even when that round scores below
    # the last (a cheaper draft several layers on can win again); the best subset on the path is kept.
    path: tuple[int, ...] = ()
    rounds: list[list[int]] = []
    current: tuple[int, ...] = ()
    current_score = 0.0
    while len(scores) < max_evals:
        options = [tuple(sorted((*path, i))) for i in range(n) if i not in path]
        options = [o for o in options if len(o) < n][: max(1, max_evals - len(scores))]
        if not options:
            break
        path = max(options, key=score)
        rounds.append(list(path))
        if scores[path][0] > current_score:
            current, current_score = path, scores[path][0]
        if scores[path][1] < MIN_AGREEMENT:
            break  # drafts this poor cannot pay at any cost
    rng = random.Random(seed)
    for _ in range(random_swaps):
        if not current or len(current) >= n or len(scores) >= max_evals:
            break
        out = rng.choice(current)
        into = rng.choice([i for i in range(n) if i not in current])
        candidate = tuple(sorted((*[i for i in current if i != out], into)))
        if score(candidate) > current_score:
            current, current_score = candidate, scores[candidate][0]
    if not current:
        raise ValueError(f"the model has {n} layer(s); layer skipping needs at least 2")
    _, agree, k = scores[current]
    return SkipSearchResult(
        list(current), n, agree, layerskip_cost(c, n - len(current)), k, current_score, len(scores),
        time.perf_counter() - started, trials, rounds,
    )  # fmt: skip
