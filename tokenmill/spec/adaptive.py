"""Adaptive speculation length: pick k per step so that speculation pays, and 0 when it does not.

The rule is SmartSpec's goodput test with SpecDec++'s acceptance model. With a per-token acceptance rate a,
k drafts yield E(k) = (1 - a^(k+1)) / (1 - a) tokens per sequence and verification. A step of B decoding
sequences costs T(B) plain, and T(B(k+1)) + k * c * T(B) with k drafts, where T(n) = fixed + per_token * n
is the target's step time for n query tokens (fitted on the decode and verification steps the engine ran,
StepTimeFit, so few-row steps are priced as they run, not as a prompt chunk's rows) and c is
one draft pass relative to a plain step (measured on the proposer's calls; prompt lookup: about 0). The
chosen k maximises E(k) T(B) / (T(B(k+1)) + k c T(B)); when no k beats plain decoding by `min_gain`, k = 0.
At large batch T grows with the tokens, the (k + 1)-fold verify dominates, and speculation switches off.

The acceptance rate is a decayed count (accepted drafts vs rejections, the maximum-likelihood estimate
under the geometric model) pulled towards a prior. While speculation is off, one sequence still speculates
every `probe_every` steps (`probe`), so a pessimistic prior or an old bad stretch cannot switch it off for
good; at large batch that probe costs a few rows in one step of many. A model-based draft's probe is not
cheap (its cache catches up with every token since the last one, then k passes: measured on the 1.5B Qwen's
layer skip, 2 plain steps a pass), so while the rule stays off such probes back off, doubling their interval
up to `max_probe_every`; a step that speculates again restores it.
"""

from __future__ import annotations

from dataclasses import dataclass

# Until the engine has fitted its step time: a step of n tokens costs 1 + n / PRIOR_TOKENS_PER_FIXED (a CPU
# decode reads all weights once; the compute of ~32 tokens costs about as much as that read).
PRIOR_TOKENS_PER_FIXED = 32.0


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens emitted per verification of k drafts when each is accepted with probability `acceptance`."""
    if acceptance >= 1.0:
        return k + 1.0
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


def speedup(
    acceptance: float, k: int, batch: int, fixed: float, per_token: float, draft_cost: float
) -> float:
    """Tokens per second with k drafts relative to plain decoding, for `batch` decoding sequences."""
    plain = fixed + per_token * batch
    spec = fixed + per_token * batch * (k + 1) + k * draft_cost * plain
    return expected_tokens(acceptance, k) * plain / spec


@dataclass
class AdaptiveLength:
    max_k: int
    draft_cost: float  # one draft pass / one plain target step; starts at the proposer's prior, then measured
    min_gain: float = 1.05  # speculate only for at least this predicted speedup
    prior_acceptance: float = 0.5
    prior_weight: float = 4.0  # pseudo-verifications behind the prior
    decay: float = 0.98  # per step: old evidence fades
    cost_smoothing: float = 0.2  # weight of a new draft-cost measurement
    probe_every: int = 8  # while off: one sequence speculates on every this-many-th step
    probe_k: int = 4
    max_probe_every: int = 128  # expensive drafts' probes back off to at most this interval
    expensive_draft: float = 0.25  # a draft pass costing this share of a plain step or more backs off
    accepted: float = 0.0
    rejected: float = 0.0
    _off_steps: int = 0  # steps since speculation went off, or since the last probe
    _probe_interval: int = 0  # 0: probe_every

    @property
    def acceptance(self) -> float:
        a = self.accepted + self.prior_acceptance * self.prior_weight
        r = self.rejected + (1.0 - self.prior_acceptance) * self.prior_weight
        return a / (a + r)

    def observe(self, num_drafts: int, num_accepted: int) -> None:
        """One verification: num_accepted of num_drafts were kept (the first miss ends it)."""
        self.accepted += num_accepted
        self.rejected += 1.0 if num_accepted < num_drafts else 0.0

    def observe_draft_cost(self, seconds_per_pass: float, plain_step_seconds: float) -> None:
        if seconds_per_pass >= 0 and plain_step_seconds > 0:
            ratio = seconds_per_pass / plain_step_seconds
            self.draft_cost += self.cost_smoothing * (ratio - self.draft_cost)

    def choose(self, batch: int, step_fit: tuple[float, float] | None) -> int:
        """k for the next step of `batch` decoding sequences; `step_fit` is (fixed, per_token) seconds."""
        self.accepted *= self.decay
        self.rejected *= self.decay
        if batch <= 0:
            return 0
        fixed, per_token = step_fit if step_fit is not None else (1.0, 1.0 / PRIOR_TOKENS_PER_FIXED)
        a = self.acceptance
        best_k, best = 0, self.min_gain
        for k in range(1, self.max_k + 1):
            gain = speedup(a, k, batch, fixed, per_token, self.draft_cost)
            if gain > best:
                best_k, best = k, gain
        self._off_steps = self._off_steps + 1 if best_k == 0 else 0
        if best_k:
            self._probe_interval = 0
        return best_k

    def probe(self) -> int:
        """After choose() returned 0: drafts for one sequence of this step, to keep measuring acceptance."""
        interval = self._probe_interval or self.probe_every
        if self._off_steps < interval:
            return 0
        self._off_steps = 0
        if self.draft_cost >= self.expensive_draft:
            self._probe_interval = min(2 * interval, self.max_probe_every)
        return min(self.probe_k, self.max_k)
