"""How many tokens one step may carry, from a latency target (Sarathi-Serve's rule).

A step's wall time grows with the tokens it carries; every running decode waits for the whole step, so the
step time *is* their time per output token. Given a TPOT target, the budget is the largest token count whose
predicted step time stays inside it. The prediction is a line, seconds = fixed + per_token * tokens, fitted by
least squares over the recent steps this engine actually ran (so it follows the machine, the model and the
context lengths as they change); with packed weights, steps below and past the GEMM threshold get a line each
(`split_tokens`), and prompt tokens go only into steps past it, where a prompt row costs least. TPOT is a mean
over a request's tokens, so the target holds on average over the last few decode steps: cheap decode-only
steps bank time for a larger, cheaper-per-token prompt chunk (`tpot_allowance`). The budget never exceeds the configured maximum; when less than a minimum prompt chunk
fits, the step decodes alone, but never more than `tpot_window` steps in a row, so a waiting prompt always
makes progress.

A TTFT target can raise the budget above that: every prompt a step completes gets its first token when the
step ends, so the step carries the running decodes and as many pending prompts, first come first served, as
can all still finish inside their deadlines in that one step (`on_time_budget`). A burst of 16 prompts is then
served a group at a time instead of in one step that makes every one of them late, and a prompt arriving
among running decodes is taken whole in one step instead of in small chunks that each pay the step's fixed
cost. Prompts that no step can save any more are left to the TPOT budget: sacrificing the running decodes'
TPOT for a request that misses anyway only loses goodput.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

MIN_OBSERVATIONS = 8  # steps seen before the fit is trusted; until then the configured maximum applies
# the same for a line on one side of split_tokens (until then the line over all steps stands in)
SIDE_MIN_OBSERVATIONS = 4


@dataclass
class StepTimeFit:
    """seconds = fixed + per_token * tokens, fitted by least squares over the last `window` steps observed."""

    window: int = 128
    min_observations: int = MIN_OBSERVATIONS
    _samples: deque[tuple[int, float]] = field(default_factory=deque, repr=False)
    # the fit of the samples as they stand (None: not computed since the last change): the step budget asks
    # for it once per pending prompt per step, and each fit is a pass over the whole window
    _fitted: tuple[tuple[float, float] | None] | None = field(default=None, repr=False)

    def observe(self, num_tokens: int, seconds: float) -> None:
        """Record a step that ran num_tokens tokens in `seconds` of wall time."""
        if num_tokens <= 0 or seconds <= 0:
            return
        self._samples.append((num_tokens, seconds))
        while len(self._samples) > self.window:
            self._samples.popleft()
        self._fitted = None

    def clear(self) -> None:
        self._samples.clear()
        self._fitted = None

    def largest(self) -> int:
        """The most tokens a recent step carried: how far the line has been seen to hold."""
        return max((x for x, _ in self._samples), default=0)

    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per token) of the recent steps, or None while too few or too alike."""
        if self._fitted is None:
            self._fitted = (self._least_squares(),)
        return self._fitted[0]

    def _least_squares(self) -> tuple[float, float] | None:
        if len(self._samples) < self.min_observations:
            return None
        n = len(self._samples)
        mean_x = sum(x for x, _ in self._samples) / n
        mean_y = sum(y for _, y in self._samples) / n
        var = sum((x - mean_x) ** 2 for x, _ in self._samples)
        if var == 0:
            return None
        slope = sum((x - mean_x) * (y - mean_y) for x, y in self._samples) / var
        slope = max(slope, 1e-7)
        return max(mean_y - slope * mean_x, 0.0), slope


@dataclass
class StepBudget:
    max_tokens: int  # the configured --max-num-batched-tokens: never exceeded
    slo_tpot_s: float | None  # target time per output token; None: always the maximum (throughput first)
    slo_ttft_s: float | None = None  # target time to first token; None: TTFT does not raise the budget
    min_chunk: int = 32  # prompt tokens a step may always add, so waiting prompts are never starved
    headroom: float = 0.85  # plan for this fraction of the target: step times vary
    tpot_window: int = 4  # decode steps the TPOT target is kept on average over (see `tpot_allowance`)
    split_tokens: int = 0  # steps below / from this many tokens follow separate lines (0: one line)
    times: StepTimeFit = field(default_factory=StepTimeFit)  # the recent steps' time line
    _below: StepTimeFit = field(default_factory=lambda: StepTimeFit(min_observations=SIDE_MIN_OBSERVATIONS))
    _above: StepTimeFit = field(default_factory=lambda: StepTimeFit(min_observations=SIDE_MIN_OBSERVATIONS))
    _decode_steps: deque[float] = field(default_factory=deque, repr=False)  # the last tpot_window ones, s
    _held: int = 0  # steps in a row that carried only decodes

    def observe(self, num_tokens: int, seconds: float, num_decodes: int = 0) -> None:
        """Record a step that ran num_tokens tokens in `seconds` of wall time, num_decodes of them tokens of
        sequences past their first (whose TPOT the step counts towards)."""
        self.times.observe(num_tokens, seconds)
        if self.split_tokens:
            (self._below if num_tokens < self.split_tokens else self._above).observe(num_tokens, seconds)
        if num_decodes > 0:
            self._decode_steps.append(seconds)
            while len(self._decode_steps) > self.tpot_window:
                self._decode_steps.popleft()
        self._held = self._held + 1 if num_tokens == num_decodes else 0

    def forget(self) -> None:
        """Drop every step observed so far (e.g. a warm-up's, which pays one-off first-call costs)."""
        for fit in (self.times, self._below, self._above):
            fit.clear()
        self._decode_steps.clear()
        self._held = 0

    def tpot_allowance(self) -> float:
        """Seconds the next step may take so that the last tpot_window decode steps and it average inside the
        TPOT target (with headroom). A request's TPOT is its mean time per token (vLLM's benchmark and
        goodput), so decode steps that came in under the target bank time for a larger prompt chunk: one
        step of many prompt rows costs far less per token than the same rows spread thin over several steps
        (below the GEMM threshold every row pays for decoding the packed weights)."""
        target = self.slo_tpot_s * self.headroom
        return target * (len(self._decode_steps) + 1) - sum(self._decode_steps)

    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per token) of the recent steps, or None while too few or too alike."""
        return self.times.fit()

    def line(self, num_tokens: int) -> tuple[float, float] | None:
        """The (fixed, per_token) line for steps of num_tokens tokens: its side of split_tokens once fitted
        (packed weights: below it every activation row pays the weight decode in the GEMV, from it on the
        weights are decoded once for a GEMM), else the line over all steps."""
        if self.split_tokens:
            side = (self._below if num_tokens < self.split_tokens else self._above).fit()
            if side is not None:
                return side
        return self.times.fit()

    def budget(self, num_decodes: int, pending: Iterable[tuple[float, int]] = ()) -> int:
        """Tokens the next step may carry when num_decodes sequences are decoding in it. `pending`: for the
        prompts without a first token, first come first served, (seconds left to their TTFT deadline,
        prompt tokens still to compute)."""
        if self.slo_tpot_s is None or self.fit() is None:
            return self.max_tokens
        on_time = self.on_time_budget(num_decodes, pending) if self.slo_ttft_s is not None else 0
        if num_decodes == 0:  # no decode waits on this step: only the prompts' own first tokens do
            return on_time or self.max_tokens
        # the smallest step worth adding prompt tokens to: a minimum chunk, and past the split (fewer prompt
        # rows cost the most per token)
        chunk_start = min(self.max_tokens, max(num_decodes + self.min_chunk, self.split_tokens))
        fixed, per_token = self.line(chunk_start)
        fits = min(self.max_tokens, int((self.tpot_allowance() - fixed) / per_token))
        if fits >= chunk_start or self._held >= self.tpot_window:
            tpot_budget = max(chunk_start, fits)
        else:  # no worthwhile chunk fits: decode alone and bank the time (never tpot_window steps in a row)
            tpot_budget = num_decodes
        return max(tpot_budget, on_time)

    def on_time_budget(self, num_decodes: int, pending: Iterable[tuple[float, int]]) -> int:
        """A step that ends where the most pending prompts still get their first token on time (0: none can).

        Every prompt a step completes gets its first token when the step ends, so one step over a burst of
        prompts (16 arriving at once) makes all of them wait for all of them, and the same prompts spread
        thin over many small steps pay each step's fixed cost (the packed weights' decode) again and again.
        The step carries the decodes and the first k pending prompts, first come first served, for the
        largest k whose predicted end is inside the deadline of every prompt among them that can still make
        it; prompts past saving ride along only when they delay no one who can. When no pending prompt can
        be saved any more (not even alone in one step), the TPOT budget decides."""
        best, total, earliest = 0, num_decodes, math.inf
        trusted = 2 * self.times.largest()  # a line fitted on small steps is not trusted far beyond them
        for slack, remaining in pending:
            total += remaining
            if total > min(self.max_tokens, trusted):
                break
            fixed, per_token = self.line(total)
            end = fixed + per_token * total
            if end <= slack * self.headroom:  # this prompt makes it if the step ends with it
                earliest = min(earliest, slack * self.headroom)
            if end > earliest:
                break  # a savable prompt before would miss; later ends are later still
            if earliest < math.inf:
                best = total
        return max(best, min(num_decodes + self.min_chunk, self.max_tokens)) if best else 0
