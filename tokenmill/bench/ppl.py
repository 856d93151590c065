"""Perplexity of a text through the engine, per KV mode (`tokenmill eval ppl`).

The text is cut into windows (disjoint, or sliding with a stride as in Hugging Face's perplexity guide:
each window scores only the tokens the previous one did not, so every token is scored once). Every window
is one request of an engine built with the mode's options, driven by the engine's own step loop, so the
mode's KV cache format, eviction policy, scheduler and kernels are what is measured. Two paths:

- `chunk > 1`: the window (less its last token) is the prompt, prefilled `chunk` tokens per forward; the
  logits of every prompt token are kept. Eviction policies act at prefill end, after the scoring, so this
  measures the cache format on the prompt path only.
- `chunk == 1`: the window's first token is the prompt and the rest is teacher-forced as decodes, one token
  per step, so every prediction reads the cache as generation does: after eviction, from quantized blocks.

Teacher forcing hooks the runner without changing the engine: its `execute` is asked for the logits of
every query token of the eval's sequences, and its sampler returns the text's next token.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from tokenmill.bench.modes import kv_mode_overrides, load_llm, mode_options
from tokenmill.engine.model_runner import StepLogits
from tokenmill.engine.scheduler import ScheduledBatch, ScheduledSeq
from tokenmill.layers.sampler import SampleResult
from tokenmill.sampling_params import SamplingParams


@dataclass(frozen=True)
class Window:
    """Tokens `[begin, end)` of the text; it scores the targets `[first_target, end)`."""

    begin: int
    end: int
    first_target: int

    @property
    def num_targets(self) -> int:
        return self.end - self.first_target


def make_windows(num_tokens: int, window: int, stride: int | None = None) -> list[Window]:
    """Windows of `window` tokens, one every `stride` (default: `window`, disjoint). A token is scored by
    the first window that holds it with some context before it: each token but the text's first is scored
    exactly once when sliding; disjoint windows also skip each window's first token (no context)."""
    stride = window if stride is None else stride
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, max(num_tokens, 0), stride):
        end = min(begin + window, num_tokens)
        first = max(prev_end, begin + 1)
        if end > first:
            windows.append(Window(begin, end, first))
        prev_end = end
        if end >= num_tokens:
            break
    return windows


class _AllLogits(ScheduledSeq):
    """A scheduled row that asks the runner for the logits of all its query tokens."""

    @property
    def num_logits(self) -> int:
        return self.num_new_tokens


class TeacherForcing:
    """Scores windows of `tokens` through `engine`'s step loop (see the module docstring)."""

    def __init__(self, engine, tokens: Sequence[int], windows: Sequence[Window], chunk: int, bar=None):
        self.engine = engine
        self.tokens = list(tokens)
        self.windows = list(windows)
        self.decode = chunk == 1
        self.bar = bar
        self.nll = [torch.full((w.num_targets,), math.nan, dtype=torch.float64) for w in self.windows]
        self._by_seq: dict[int, int] = {}  # seq_id -> window index
        self._by_tokens: dict[int, int] = {}  # id(seq.token_ids) -> window index (the sampler's view)
        self._seqs: list[Any] = []  # keeps the token lists alive, so their ids stay theirs

    def run(self) -> list[torch.Tensor]:
        """Per window, -log p(target | the tokens before it in the window), in target order."""
        engine = self.engine
        runner = engine.runner
        saved_execute = runner.__dict__.get("execute")
        inner_execute, inner_sampler = runner.execute, runner.sampler
        runner.execute = lambda batch, *args, **kwargs: self._execute(inner_execute, batch, *args, **kwargs)
        runner.sampler = lambda logits, rows: self._sample(inner_sampler, logits, rows)
        request_ids = []
        try:
            for i, w in enumerate(self.windows):
                ids = self.tokens[w.begin : w.end]
                n_prompt = 1 if self.decode else len(ids) - 1
                params = SamplingParams(
                    max_tokens=len(ids) - n_prompt,
                    temperature=0.0,
                    ignore_eos=True,
                    skip_special_tokens=False,
                )
                request = engine.add_request({"prompt_token_ids": ids[:n_prompt]}, params)
                request_ids.append(request.request_id)
                seq = request.seqs[0]
                self._by_seq[seq.seq_id] = i
                self._by_tokens[id(seq.token_ids)] = i
                self._seqs.append(seq)
            while engine.has_unfinished_requests():
                engine.step()
        finally:
            for rid in request_ids:
                engine.abort_request(rid)  # no-op for finished ones
            if saved_execute is None:
                runner.__dict__.pop("execute", None)
            else:
                runner.execute = saved_execute
            runner.sampler = inner_sampler
        for w, nll in zip(self.windows, self.nll, strict=True):
            missing = int(torch.isnan(nll).sum())
            if missing:
                raise RuntimeError(f"window [{w.begin}, {w.end}) left {missing} targets unscored")
        return self.nll

    def _execute(self, inner, batch: ScheduledBatch, *args, **kwargs) -> StepLogits:
        if not any(s.seq.seq_id in self._by_seq for s in batch.seqs):
            return inner(batch, *args, **kwargs)
        originals = {}
        swapped = []
        for s in batch.seqs:
            if s.seq.seq_id in self._by_seq:
                mine = _AllLogits(**{f.name: getattr(s, f.name) for f in dataclasses.fields(s)})
                originals[id(mine)] = s
                swapped.append(mine)
            else:
                swapped.append(s)
        step = inner(dataclasses.replace(batch, seqs=swapped), *args, **kwargs)
        keep, rows, score_rows, windows, targets, slots = [], [], [], [], [], []
        for r, (s, j) in enumerate(step.rows):
            orig = originals.get(id(s))
            if orig is None:
                keep.append(r)
                rows.append((s, j))
                continue
            if j >= s.num_new_tokens - orig.num_logits:  # a row the engine itself asked for
                keep.append(r)
                rows.append((orig, j))
            wi = self._by_seq[s.seq.seq_id]
            w = self.windows[wi]
            target = w.begin + s.seq.num_computed_tokens + j + 1  # the text index this row predicts
            if w.first_target <= target < w.end:
                score_rows.append(r)
                windows.append(wi)
                targets.append(self.tokens[target])
                slots.append(target - w.first_target)
        if score_rows:
            logits = step.logits[
                torch.tensor(score_rows, dtype=torch.long, device=step.logits.device)
            ].float()
            want = torch.tensor(targets, device=logits.device).unsqueeze(1)
            nll = -(torch.log_softmax(logits, dim=-1).gather(1, want).squeeze(1)).double().cpu()
            new = 0
            for wi, slot, value in zip(windows, slots, nll.tolist(), strict=True):
                new += bool(math.isnan(self.nll[wi][slot]))
                self.nll[wi][slot] = value
            if self.bar is not None and new:
                self.bar.update(new)
        if len(keep) == len(step.rows):
            return dataclasses.replace(step, rows=rows)
        kept = step.logits[torch.tensor(keep, dtype=torch.long, device=step.logits.device)]
        return dataclasses.replace(step, logits=kept, rows=rows)

    def _sample(self, inner, logits: torch.Tensor, rows) -> list[SampleResult]:
        """The text's next token for the eval's rows; the real sampler for any other."""
        results: list[SampleResult | None] = [None] * len(rows)
        others = []
        for i, row in enumerate(rows):
            wi = self._by_tokens.get(id(row.token_ids))
            if wi is None:
                others.append(i)
                continue
            w = self.windows[wi]
            results[i] = SampleResult(self.tokens[min(w.begin + len(row.token_ids), w.end - 1)])
        if others:
            sampled = inner(logits[others], [rows[i] for i in others])
            for i, r in zip(others, sampled, strict=True):
                results[i] = r
        return results  # type: ignore[return-value]


def score_windows(llm, tokens: Sequence[int], windows: Sequence[Window], chunk: int = 512, bar=None):
    """Per window, the nll of its targets, through `llm`'s engine (which must have no other requests)."""
    if llm.engine.has_unfinished_requests():
        raise RuntimeError("score_windows needs an idle engine")
    return TeacherForcing(llm.engine, tokens, windows, chunk, bar).run()


@dataclass
class PplResult:
    mode: str
    overrides: dict[str, Any]  # the mode's EngineConfig overrides
    perplexity: float
    nll_mean: float  # mean -log p per scored token (nats)
    num_tokens: int  # tokens of text used
    num_scored: int  # tokens scored
    num_windows: int
    window: int
    stride: int
    chunk: int
    kv_cache_bytes_per_token: int
    seconds: float  # scoring time, model load excluded
    tokens_per_second: float


def evaluate_ppl(
    text: str,
    modes: Sequence[str] = ("full",),
    window: int = 1024,
    stride: int | None = None,
    num_tokens: int | None = None,
    chunk: int = 512,
    engine_options: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> list[PplResult]:
    """Perplexity of `text` under each mode (see evals.kv_mode_overrides), one engine per mode built from
    `engine_options` (EngineConfig keywords) plus the mode's overrides. `chunk` > 1 also sets the step's
    token budget (max_num_batched_tokens); prefix caching is off (every window token must run to be
    scored). Windows longer than the model's context are cut to it."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if num_tokens is not None and num_tokens < 2:
        raise ValueError(f"num_tokens must be >= 2, got {num_tokens}")
    make_windows(window, window, stride)  # validate window and stride before loading anything
    # Every window token must run through the model to be scored: no prefix-cache hits.
    extra: dict[str, Any] = {"enable_prefix_caching": False}
    if chunk > 1:
        extra["max_num_batched_tokens"] = chunk
    options = {m: {**mode_options(m, engine_options), **extra} for m in modes}
    results: list[PplResult] = []
    for mode in modes:
        llm = load_llm(mode, options[mode], progress)
        tokens = llm.get_tokenizer().encode(text)
        if num_tokens is not None:
            tokens = tokens[:num_tokens]
        if len(tokens) < 2:
            raise ValueError(f"the text has {len(tokens)} token(s); perplexity needs at least 2")
        win = min(window, llm.engine.max_model_len)
        if win < window:
            print(f"window capped at {win} tokens, the model's context", file=sys.stderr)
        step = min(stride, win) if stride is not None else win
        windows = make_windows(len(tokens), win, step)
        total = sum(w.num_targets for w in windows)
        with tqdm(total=total, desc=f"ppl {mode}", unit="tok", disable=not progress, file=sys.stderr) as bar:
            start = time.perf_counter()
            nll = torch.cat(score_windows(llm, tokens, windows, chunk, bar))
            seconds = time.perf_counter() - start
        mean = nll.mean().item()
        results.append(
            PplResult(
                mode=mode,
                overrides=kv_mode_overrides(mode),
                perplexity=math.exp(mean),
                nll_mean=mean,
                num_tokens=len(tokens),
                num_scored=total,
                num_windows=len(windows),
                window=win,
                stride=step,
                chunk=chunk,
                kv_cache_bytes_per_token=llm.engine.kv_bytes_per_token,
                seconds=seconds,
                tokens_per_second=total / seconds if seconds > 0 else math.inf,
            )
        )
        del llm
    return results


def format_table(results: Sequence[PplResult], source: str = "text", engine: str = "") -> str:
    if not results:
        return "(no results)"
    r0 = results[0]
    how = "disjoint" if r0.stride == r0.window else f"stride {r0.stride}"
    path = "decode path, 1 token per step" if r0.chunk == 1 else f"prompt path, {r0.chunk} tokens per forward"
    lines = [
        f"perplexity of {source}: {r0.num_tokens} tokens, windows of {r0.window} ({how}), {path}"
        + (f"; engine: {engine}" if engine else ""),
        "",
        "| mode | perplexity | vs first | tokens scored | windows | KV bytes/token | eval s | tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        delta = r.perplexity / r0.perplexity - 1
        lines.append(
            f"| {r.mode} | {r.perplexity:.4f} | {delta * 100:+.2f}% | {r.num_scored} | {r.num_windows} "
            f"| {r.kv_cache_bytes_per_token} | {r.seconds:.1f} | {r.tokens_per_second:.0f} |"
        )
    return "\n".join(lines)
