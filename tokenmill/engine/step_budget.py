"""How many tokens one step may carry, from a latency target (Sarathi-Serve's rule).

A step's wall time grows with the tokens it carries; every running decode waits for the whole step, so the
step time *is* their time per output token. Given a TPOT target, the budget is the largest token count whose
predicted step time stays inside it. The prediction is a line, seconds = fixed + per_token * tokens, fitted by
least squares over the recent steps this engine actually ran (so it follows the machine, the model and the
context lengths as they change). The budget never exceeds the configured maximum and never falls below the
running decodes plus a minimum prompt chunk, so a waiting prompt always makes progress.

A TTFT target can raise the budget above the TPOT one: for the prompts still waiting for their first token,
first come first served, the step must carry enough prompt tokens that each finishes its prefill before its
deadline (arrival + target). With steps of B tokens, d of them decodes, the first i prompts (R tokens in
all) need R / (B - d) steps of fixed + per_token * B seconds, which fits a slack of s seconds when
B >= (R * fixed + s * d) / (s - R * per_token). Prompts that no budget up to the maximum can save any more are
left to the TPOT budget: sacrificing the running decodes' TPOT for a request that misses anyway only loses
goodput.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

MIN_OBSERVATIONS = 8  # steps seen before the fit is trusted; until then the configured maximum applies


@dataclass
class StepTimeFit:
    """seconds = fixed + per_token * tokens, fitted by least squares over the last `window` steps observed."""

    window: int = 128
    _samples: deque[tuple[int, float]] = field(default_factory=deque, repr=False)

    def observe(self, num_tokens: int, seconds: float) -> None:
        """Record a step that ran num_tokens tokens in `seconds` of wall time."""
        if num_tokens <= 0 or seconds <= 0:
            return
        self._samples.append((num_tokens, seconds))
        while len(self._samples) > self.window:
            self._samples.popleft()

    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per token) of the recent steps, or None while too few or too alike."""
        if len(self._samples) < MIN_OBSERVATIONS:
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
    times: StepTimeFit = field(default_factory=StepTimeFit)  # the recent steps' time line

    def observe(self, num_tokens: int, seconds: float) -> None:
        """Record a step that ran num_tokens tokens in `seconds` of wall time."""
        self.times.observe(num_tokens, seconds)

    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per token) of the recent steps, or None while too few or too alike."""
        return self.times.fit()

    def budget(self, num_decodes: int, pending: Iterable[tuple[float, int]] = ()) -> int:
        """Tokens the next step may carry when num_decodes sequences are decoding in it. `pending`: for the
        prompts without a first token, first come first served, (seconds left to their TTFT deadline,
        prompt tokens still to compute)."""
        if self.slo_tpot_s is None or num_decodes == 0:
            return self.max_tokens  # nobody waits on this step's latency: take the throughput-best budget
        floor = min(self.max_tokens, num_decodes + self.min_chunk)
        fitted = self.fit()
        if fitted is None:
            return self.max_tokens
        fixed, per_token = fitted
        fits = int((self.slo_tpot_s * self.headroom - fixed) / per_token)
        tpot_budget = max(floor, min(self.max_tokens, fits))
        if self.slo_ttft_s is None:
            return tpot_budget
        return max(tpot_budget, self.ttft_budget(num_decodes, pending, fixed, per_token))

    def ttft_budget(
        self, num_decodes: int, pending: Iterable[tuple[float, int]], fixed: float, per_token: float
    ) -> int:
        """The smallest budget that lets every still-savable pending prompt meet its TTFT (0: none needs more)."""
        need, total = 0, 0
        for slack, remaining in pending:
            total += remaining
            slack *= self.headroom
            if slack <= total * per_token:
                continue  # even an endless budget misses this deadline
            b = math.ceil((total * fixed + slack * num_decodes) / (slack - total * per_token))
            if b <= self.max_tokens:
                need = max(need, b)
        return need
