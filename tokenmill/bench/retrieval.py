"""Long-context retrieval through the engine, per KV mode: passkey and needle in a haystack
(`tokenmill eval passkey | needle`).

Every prompt hides one fact at a depth (the fraction of the filler placed before it) inside filler of a
given length in tokens, and ends with a question whose answer the model must copy from the fact:

- passkey: a random 5-digit key in repeated filler sentences (Mohtashami & Jaggi's landmark-attention
  test, as LongLoRA runs it); correct when the key's digits appear in the answer.
- needle: a sentence about San Francisco in real prose (CPython's pydoc topics, as `eval quality` uses);
  correct when the answer names a keyword (Dolores Park, sandwich).

Prompts are built from token ids (pieces split at spaces tokenize the same apart as together), so the
length and the fact's position are exact. All prompts of a mode go to the engine in one `generate` call,
greedy, so the mode's KV cache format and policy decide what the model can still see.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenmill.bench.modes import kv_mode_overrides, load_llm, mode_options

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
PASSKEY_FACT = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key?"
PASSKEY_ANSWER = "The pass key is"

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
NEEDLE_INTRO = "Read the document below, then answer the question after it.\n\n"
NEEDLE_QUESTION = "What is the best thing to do in San Francisco?"
NEEDLE_ANSWER = "The best thing to do in San Francisco is"
NEEDLE_KEYWORDS = ("dolores park", "sandwich")
NEEDLE_MAX_OFFSET = 20000  # tokens: later samples of a cell start the prose at a random offset below this
_BOUNDARY_SEARCH = 64  # tokens either side of the exact depth to look for a sentence end
_MARK = "\x00TOKENMILL-CONTENT\x00"

TASKS = ("passkey", "needle")


@dataclass
class RetrievalPrompt:
    ids: list[int]
    expected: str  # the key, or the needle sentence
    fact_start: int  # index in `ids` of the fact's first token
    fact_end: int  # one past its last token
    filler_tokens: int  # filler tokens around the fact
    depth: float  # filler before the fact / all filler: the depth actually built


# ---- prompt building ----------------------------------------------------------------------------------------
def _frame(tokenizer, intro: str, question: str, answer: str, chat: bool) -> tuple[list[int], list[int]]:
    """Token ids before the filler and after it (the question and the start of the answer)."""
    enc = tokenizer.encode
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], add_generation_prompt=True)
        before, after = text.split(_MARK)
        head = enc(before, add_special_tokens=False) + enc(intro, add_special_tokens=False)
        # The assistant's turn is left to the model: an instruct model forced to continue "The pass key is"
        # tends to explain the phrase instead of finishing it (SmolLM2-135M at 1k tokens: 0 of 3 keys, 3 of
        # 3 when it answers in its own words).
        return head, enc("\n\n" + question, add_special_tokens=False) + enc(after, add_special_tokens=False)
    head = enc("", add_special_tokens=True) + enc(
        intro, add_special_tokens=False
    )  # BOS if the model adds one
    return head, enc("\n\n" + question + " " + answer, add_special_tokens=False)


def _assemble(head, before, fact, after, tail, expected: str) -> RetrievalPrompt:
    ids = [*head, *before, *fact, *after, *tail]
    start = len(head) + len(before)
    n_filler = len(before) + len(after)
    return RetrievalPrompt(
        ids, expected, start, start + len(fact), n_filler, len(before) / n_filler if n_filler else 0.0
    )


def _check(length: int, depth: float, fixed: int) -> int:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    budget = length - fixed
    if budget < 0:
        raise ValueError(f"length {length} is too short: the prompt without filler has {fixed} tokens")
    return budget


def passkey_prompt(tokenizer, length: int, depth: float, key: str, chat: bool = False) -> RetrievalPrompt:
    """About `length` tokens (never more; under by less than one filler sentence): the intro, filler
    sentences with the key's sentence after `depth` of them, the question."""
    head, tail = _frame(tokenizer, PASSKEY_INTRO, PASSKEY_QUESTION, PASSKEY_ANSWER, chat)
    fact = tokenizer.encode(" " + PASSKEY_FACT.format(key=key), add_special_tokens=False)
    budget = _check(length, depth, len(head) + len(tail) + len(fact))
    pieces = [tokenizer.encode(" " + s, add_special_tokens=False) for s in PASSKEY_FILLER]
    sentences: list[list[int]] = []
    used = 0
    while used + len(pieces[len(sentences) % len(pieces)]) <= budget:
        piece = pieces[len(sentences) % len(pieces)]
        sentences.append(piece)
        used += len(piece)
    k = round(depth * len(sentences))
    before = [t for s in sentences[:k] for t in s]
    after = [t for s in sentences[k:] for t in s]
    return _assemble(head, before, fact, after, tail, key)


_HAYSTACKS: dict[int, tuple[Any, list[int]]] = {}


def haystack_ids(tokenizer, num_tokens: int) -> list[int]:
    """At least `num_tokens` token ids of the pydoc topics prose (cached per tokenizer)."""
    from tokenmill.bench.quality import reference_text

    cached = _HAYSTACKS.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer and len(cached[1]) >= num_tokens:
        return cached[1]
    text = reference_text()
    chars = max(8 * num_tokens, 4096)
    while True:
        ids = tokenizer.encode(text[:chars], add_special_tokens=False)
        if len(ids) >= num_tokens or chars >= len(text):
            break
        chars *= 2
    if len(ids) < num_tokens:
        raise ValueError(f"the haystack text has only {len(ids)} tokens, {num_tokens} needed")
    _HAYSTACKS[id(tokenizer)] = (tokenizer, ids)
    return ids


def _sentence_boundary(tokenizer, hay: Sequence[int], k: int) -> int:
    """The cut nearest to `k` that follows a sentence end (a token ending in '.' or a newline)."""
    for d in range(_BOUNDARY_SEARCH + 1):
        for cut in (k - d, k + d):
            if cut <= 0 or cut >= len(hay):
                if cut in (0, len(hay)):
                    return cut
                continue
            if tokenizer.decode([hay[cut - 1]]).rstrip(" ").endswith((".", "\n")):
                return cut
    return k


def needle_prompt(
    tokenizer, length: int, depth: float, offset: int = 0, chat: bool = False
) -> RetrievalPrompt:
    """`length` tokens: the intro, pydoc prose from token `offset` with the needle at a sentence end near
    `depth` of it, the question."""
    head, tail = _frame(tokenizer, NEEDLE_INTRO, NEEDLE_QUESTION, NEEDLE_ANSWER, chat)
    fact = tokenizer.encode(" " + NEEDLE + "\n", add_special_tokens=False)
    budget = _check(length, depth, len(head) + len(tail) + len(fact))
    hay = haystack_ids(tokenizer, offset + budget)[offset : offset + budget]
    k = _sentence_boundary(tokenizer, hay, round(depth * len(hay)))
    return _assemble(head, hay[:k], fact, hay[k:], tail, NEEDLE)


def passkey_correct(output: str, key: str) -> bool:
    """The key's digits appear in the answer (other characters between digits are ignored)."""
    return key in "".join(ch for ch in output if ch.isdigit())


def needle_correct(output: str, keywords: Sequence[str] = NEEDLE_KEYWORDS) -> bool:
    text = output.lower()
    return any(k.lower() in text for k in keywords)


# ---- results ------------------------------------------------------------------------------------------------
@dataclass
class RetrievalSample:
    length: int  # asked length in tokens (after capping at the context)
    depth: float  # asked depth
    sample: int
    prompt_tokens: int
    fact_depth: float  # the depth built
    expected: str
    output: str
    correct: bool


@dataclass
class RetrievalCell:
    length: int
    depth: float
    prompt_tokens: float  # mean over the cell's samples
    correct: int
    total: int
    accuracy: float = field(init=False)

    def __post_init__(self) -> None:
        self.accuracy = self.correct / self.total if self.total else 0.0


@dataclass
class RetrievalResult:
    task: str  # passkey | needle
    mode: str
    overrides: dict[str, Any]
    lengths: list[int]
    depths: list[float]
    chat: bool
    max_new_tokens: int
    accuracy: float
    seconds: float  # generation time, model load excluded
    cells: list[RetrievalCell] = field(default_factory=list)
    samples: list[RetrievalSample] = field(default_factory=list)

    def grid(self) -> list[list[float]]:
        """Accuracy [length][depth]."""
        acc = {(c.length, c.depth): c.accuracy for c in self.cells}
        return [[acc[(n, d)] for d in self.depths] for n in self.lengths]


def _plan(task: str, lengths: Sequence[int], depths: Sequence[float], samples: int, seed: int):
    """What varies per prompt, fixed by the seed whatever the model: passkey keys, needle offsets."""
    rng = random.Random(seed)
    plan = {}
    for n in lengths:
        for d in depths:
            for s in range(samples):
                if task == "passkey":
                    plan[(n, d, s)] = str(rng.randint(10000, 99999))
                else:
                    plan[(n, d, s)] = 0 if s == 0 else rng.randrange(NEEDLE_MAX_OFFSET)
    return plan


def build_prompts(
    task: str,
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    samples: int = 1,
    seed: int = 0,
    chat: bool = False,
) -> list[tuple[tuple[int, float, int], RetrievalPrompt]]:
    """((length, depth, sample), prompt) for the whole grid, in order."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    out = []
    for (n, d, s), value in _plan(task, lengths, depths, samples, seed).items():
        if task == "passkey":
            prompt = passkey_prompt(tokenizer, n, d, value, chat)
        else:
            prompt = needle_prompt(tokenizer, n, d, value, chat)
        out.append(((n, d, s), prompt))
    return out


def cap_lengths(lengths: Sequence[int], limit: int) -> list[int]:
    """Lengths capped at `limit`, duplicates dropped, order kept."""
    capped: list[int] = []
    for n in lengths:
        n = min(n, limit)
        if n not in capped:
            capped.append(n)
    return capped


def evaluate_retrieval(
    task: str,
    modes: Sequence[str] = ("full",),
    lengths: Sequence[int] = (512, 1024, 2048, 4096),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    samples: int = 1,
    seed: int = 0,
    chat: bool = False,
    max_new_tokens: int | None = None,
    engine_options: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> list[RetrievalResult]:
    """Accuracy of `task` (passkey | needle) by length x depth for each mode, one engine per mode."""
    from tokenmill.sampling_params import SamplingParams

    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not lengths or not depths:
        raise ValueError("give at least one length and one depth")
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {d}")
    if max_new_tokens is None:
        max_new_tokens = (16 if chat else 8) if task == "passkey" else 24
    options = {m: mode_options(m, engine_options) for m in modes}
    results = []
    for mode in modes:
        llm = load_llm(mode, options[mode], progress)
        engine = llm.engine
        limit = min(engine.max_model_len, engine.kv_capacity_tokens) - max_new_tokens
        grid = cap_lengths(lengths, limit)
        if grid != list(dict.fromkeys(lengths)):
            print(f"lengths capped at {limit} tokens (context less the answer): {grid}", file=sys.stderr)
        prompts = build_prompts(task, llm.get_tokenizer(), grid, depths, samples, seed, chat)
        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p.ids} for _, p in prompts], params, use_tqdm=progress)
        seconds = time.perf_counter() - start
        scored = []
        for ((n, d, s), p), out in zip(prompts, outputs, strict=True):
            text = out.outputs[0].text
            ok = passkey_correct(text, p.expected) if task == "passkey" else needle_correct(text)
            scored.append(RetrievalSample(n, d, s, len(p.ids), round(p.depth, 4), p.expected, text, ok))
        cells = []
        for n in grid:
            for d in depths:
                mine = [x for x in scored if x.length == n and x.depth == d]
                cells.append(
                    RetrievalCell(
                        n,
                        d,
                        sum(x.prompt_tokens for x in mine) / len(mine),
                        sum(x.correct for x in mine),
                        len(mine),
                    )
                )
        results.append(
            RetrievalResult(
                task=task,
                mode=mode,
                overrides=kv_mode_overrides(mode),
                lengths=grid,
                depths=list(depths),
                chat=chat,
                max_new_tokens=max_new_tokens,
                accuracy=sum(x.correct for x in scored) / len(scored),
                seconds=seconds,
                cells=cells,
                samples=scored,
            )
        )
        del llm, engine
    return results


def evaluate_passkey(modes: Sequence[str] = ("full",), **kwargs: Any) -> list[RetrievalResult]:
    return evaluate_retrieval("passkey", modes, **kwargs)


def evaluate_needle(modes: Sequence[str] = ("full",), **kwargs: Any) -> list[RetrievalResult]:
    return evaluate_retrieval("needle", modes, **kwargs)


# ---- report -------------------------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{x * 100:.0f}%"


def format_table(results: Sequence[RetrievalResult], engine: str = "") -> str:
    """One length x depth table per mode (rows: asked length and the mean prompt tokens), then a summary
    by length when several modes ran."""
    if not results:
        return "(no results)"
    r0 = results[0]
    per_cell = r0.cells[0].total if r0.cells else 0
    lines = [
        f"{r0.task} retrieval: {'chat template' if r0.chat else 'raw prompt'}, {per_cell} sample(s) per cell, "
        f"greedy {r0.max_new_tokens} tokens" + (f"; engine: {engine}" if engine else ""),
    ]
    for r in results:
        cells = {(c.length, c.depth): c for c in r.cells}
        total = sum(c.total for c in r.cells)
        right = sum(c.correct for c in r.cells)
        lines += [
            "",
            f"mode {r.mode}: {right}/{total} = {_pct(r.accuracy)} ({r.seconds:.1f} s)",
            "",
            "| tokens \\ depth | " + " | ".join(f"{d:g}" for d in r.depths) + " | mean |",
            "|---:|" + "---:|" * (len(r.depths) + 1),
        ]
        for n in r.lengths:
            row = [cells[(n, d)] for d in r.depths]
            tokens = sum(c.prompt_tokens for c in row) / len(row)
            mean = sum(c.correct for c in row) / sum(c.total for c in row)
            lines.append(
                f"| {n} ({tokens:.0f}) | " + " | ".join(_pct(c.accuracy) for c in row) + f" | {_pct(mean)} |"
            )
    if len(results) > 1:
        lengths = list(dict.fromkeys(n for r in results for n in r.lengths))
        lines += [
            "",
            "| mode | accuracy | " + " | ".join(str(n) for n in lengths) + " |",
            "|---|---:|" + "---:|" * len(lengths),
        ]
        for r in results:
            by_len = []
            for n in lengths:
                row = [c for c in r.cells if c.length == n]
                by_len.append(_pct(sum(c.correct for c in row) / sum(c.total for c in row)) if row else "-")
            lines.append(f"| {r.mode} | {_pct(r.accuracy)} | " + " | ".join(by_len) + " |")
    return "\n".join(lines)
