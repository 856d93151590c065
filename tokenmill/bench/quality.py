"""Quality of a weight format against the fp32 path: teacher-forced top-1 agreement and perplexity.

Both come from one teacher-forced pass over a fixed text: at every position the model sees the true
prefix, and we record the log-probability of the true next token (perplexity) and its own top choice
(compared with the reference's top choice at the same position). The text is CPython's own
`pydoc_data/topics.py` prose, present wherever Python is, so anyone can rerun the figures.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass

import torch

from tokenmill.engine.model_runner import ModelRunner
from tokenmill.engine.scheduler import ScheduledBatch, ScheduledSeq
from tokenmill.engine.sequence import Sequence
from tokenmill.kv.cache import KVCache, KVCacheSpec
from tokenmill.layers.quantization import PackedWeight
from tokenmill.models.llama import LlamaModel
from tokenmill.models.registry import load_model
from tokenmill.models.source import resolve_model

DEFAULT_TOKENS = 2048
BLOCK = 16


def reference_text() -> str:
    """The pydoc topics, in a fixed (sorted) order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@dataclass
class TeacherForced:
    nll: torch.Tensor  # [T - 1] -log p(token t+1 | tokens <= t)
    top1: torch.Tensor  # [T - 1] the model's argmax at each position


@torch.inference_mode()
def teacher_forced(model: LlamaModel, ids: list[int], chunk: int = 256) -> TeacherForced:
    """Run `ids` through the engine's model runner as one sequence, `chunk` query tokens per step, over a
    private paged KV cache sized for it; logits of every query token are kept."""
    c = model.config
    n_tokens = len(ids)
    spec = KVCacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, BLOCK, model.dtype)
    num_blocks = -(-n_tokens // BLOCK)
    runner = ModelRunner(
        model, KVCache(spec, num_blocks, model.device, zero=model.kernels is None), sampler=None
    )
    seq = Sequence(0, None, 0, [], None, None, max_tokens=0, block_table=list(range(num_blocks)))
    tokens = torch.tensor(ids, dtype=torch.long)
    nll, top1 = [], []
    for start in range(0, n_tokens - 1, chunk):
        n = min(chunk, n_tokens - 1 - start)  # the last token is only ever a target
        seq.token_ids = ids[: start + n]
        seq.num_computed_tokens = start
        step = runner.execute(ScheduledBatch([ScheduledSeq(seq, n, extra_logits=n - 1)]))
        logits = step.logits.float().cpu()
        targets = tokens[start + 1 : start + n + 1]
        nll.append(-torch.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1))
        top1.append(logits.argmax(dim=-1))
    return TeacherForced(torch.cat(nll), torch.cat(top1))


@dataclass
class FormatQuality:
    weights: str
    weight_bytes: int  # bytes of the linear and embedding weights as stored
    perplexity: float
    perplexity_delta: float  # relative to the reference: 0.01 means 1% higher
    top1_agreement: float  # fraction of positions whose argmax equals the reference's
    seconds: float


def weight_bytes(model: LlamaModel) -> int:
    """Bytes of every linear weight as stored (a tied embedding/lm_head counted once)."""
    seen: set[int] = set()
    total = 0
    for part in [model.embed, *model.linear_parts()]:
        if id(part) in seen:
            continue
        seen.add(id(part))
        w = part.weight
        total += w.nbytes() if isinstance(w, PackedWeight) else w.numel() * w.element_size()
    return total


def evaluate_formats(
    model: str | None = None,
    formats: list[str] | None = None,
    num_tokens: int = DEFAULT_TOKENS,
    chunk: int = 1,
) -> list[FormatQuality]:
    """Score each weight format against the fp32 dense path on the first `num_tokens` of the text.

    The reference runs in 256-token chunks (fp32 is exact either way); the formats run `chunk` tokens per
    forward. The default, 1, scores every position through the single-token decode kernels, the path that
    generates text; 256 scores the prompt (GEMM) path instead."""
    formats = formats or ["auto", "q8", "q4"]
    source = resolve_model(model)
    results: list[FormatQuality] = []
    reference: TeacherForced | None = None
    ids: list[int] = []
    for fmt in ["dense", *[f for f in formats if f != "dense"]]:
        loaded = load_model(source, torch.device("cpu"), torch.float32, weights=fmt)
        if not ids:
            ids = loaded.tokenizer.encode(reference_text())[:num_tokens]
            if len(ids) < num_tokens:
                raise ValueError(f"the reference text has only {len(ids)} tokens, {num_tokens} asked")
        start = time.perf_counter()
        scored = teacher_forced(loaded.model, ids, chunk=256 if fmt == "dense" else chunk)
        seconds = time.perf_counter() - start
        if reference is None:
            reference = scored
        ppl = math.exp(scored.nll.mean().item())
        ref_ppl = math.exp(reference.nll.mean().item())
        results.append(
            FormatQuality(
                weights=fmt,
                weight_bytes=weight_bytes(loaded.model),
                perplexity=ppl,
                perplexity_delta=ppl / ref_ppl - 1,
                top1_agreement=(scored.top1 == reference.top1).float().mean().item(),
                seconds=seconds,
            )
        )
    return results


def format_table(results: list[FormatQuality], num_tokens: int, chunk: int = 1) -> str:
    lines = [
        f"teacher-forced over {num_tokens} tokens of pydoc_data.topics, {chunk} token(s) per forward; "
        "reference: dense fp32",
        "| weights | weight MB | perplexity | vs fp32 | top-1 agreement | eval s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.weights} | {r.weight_bytes / 1e6:.1f} | {r.perplexity:.4f} | {r.perplexity_delta * 100:+.2f}% "
            f"| {r.top1_agreement * 100:.2f}% | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def to_json(results: list[FormatQuality]) -> str:
    return json.dumps([asdict(r) for r in results], indent=2)
