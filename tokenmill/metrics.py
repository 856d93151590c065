"""Prometheus collectors of one server, in their own CollectorRegistry (never the global default one)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from tokenmill.engine.async_engine import EngineStats
from tokenmill.outputs import RequestOutput

OUTCOMES = ("finished_stop", "finished_length", "abort", "error", "rejected")

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class Metrics:
    """Request outcomes, latencies and token counts, plus gauges read from the engine's stats snapshot."""

    def __init__(self, stats: Callable[[], EngineStats] | None = None, prefix: str = "tokenmill"):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{prefix}_requests", "Requests by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.time_to_first_token = Histogram(
            f"{prefix}_time_to_first_token_seconds",
            "Time from arrival to the first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            f"{prefix}_time_per_output_token_seconds",
            "Mean time between generated tokens after the first, per request",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            f"{prefix}_e2e_request_latency_seconds",
            "Time from arrival to the end of the request",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(f"{prefix}_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter(f"{prefix}_generation_tokens", "Tokens generated", registry=r)

        stats = stats or EngineStats
        gauges = {
            "num_requests_running": ("Requests with sequences running", lambda: stats().num_requests_running),
            "num_requests_waiting": (
                "Requests waiting to be scheduled",
                lambda: stats().num_requests_waiting,
            ),
            "kv_blocks_used": ("KV cache blocks in use", lambda: stats().kv_blocks_used),
            "kv_blocks_total": ("KV cache blocks in all", lambda: stats().kv_blocks_total),
            "kv_cache_usage_bytes": ("KV cache bytes in use, in its format", lambda: stats().kv_bytes_used),
            "kv_tokens_held": ("KV slots held by running sequences", lambda: stats().kv_tokens_held),
            "prefix_cache_hit_rate": (
                "Fraction of looked-up prompt tokens found in the prefix cache",
                lambda: stats().prefix_cache_hit_rate,
            ),
            "num_preemptions": ("Sequences preempted so far", lambda: stats().num_preemptions),
            "kv_evictions": ("KV compactions done by eviction policies", lambda: stats().kv_evictions),
            "kv_evicted_tokens": (
                "KV slots freed by eviction policies (per sequence)",
                lambda: stats().kv_evicted_tokens,
            ),
            "spec_decode_num_draft_tokens": (
                "Speculative tokens proposed",
                lambda: stats().spec_draft_tokens,
            ),
            "spec_decode_num_accepted_tokens": (
                "Speculative tokens accepted",
                lambda: stats().spec_accepted_tokens,
            ),
            "spec_decode_mean_acceptance_length": (
                "Tokens emitted per speculative verification (accepted + 1)",
                lambda: stats().spec_mean_acceptance_length,
            ),
        }
        for name, (doc, fn) in gauges.items():
            Gauge(f"{prefix}_{name}", doc, registry=r).set_function(fn)
        kv_format = stats().kv_format
        if kv_format:  # the cache's element format and default policy, as labels (an info-style gauge)
            Gauge(f"{prefix}_kv_cache_info", "KV cache format", ["format", "policy"], registry=r).labels(
                kv_format, stats().kv_policy
            ).set(1)

    def record_rejected(self) -> None:
        self.requests.labels("rejected").inc()

    def record_error(self) -> None:
        self.requests.labels("error").inc()

    def record_request(self, output: RequestOutput | None, outcome: str | None = None) -> None:
        """Account one engine request from its last output. The outcome defaults to its finish reasons:
        finished_length if any completion hit the length limit, else finished_stop; abort if aborted."""
        if output is None:
            self.requests.labels(outcome or "error").inc()
            return
        reasons = {c.finish_reason for c in output.outputs}
        if outcome is None:
            if None in reasons or "abort" in reasons:
                outcome = "abort"
            elif "length" in reasons:
                outcome = "finished_length"
            else:
                outcome = "finished_stop"
        self.requests.labels(outcome).inc()
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        num_generated = [len(c.token_ids) for c in output.outputs]
        self.generation_tokens.inc(sum(num_generated))
        m = output.metrics
        if m.first_token_time is not None:
            self.time_to_first_token.observe(max(m.first_token_time - m.arrival_time, 0.0))
        if outcome.startswith("finished"):
            if m.finish_time is not None:
                self.e2e_latency.observe(max(m.finish_time - m.arrival_time, 0.0))
                longest = max(num_generated, default=0)
                if m.first_token_time is not None and longest > 1:
                    self.time_per_output_token.observe(
                        max(m.finish_time - m.first_token_time, 0.0) / (longest - 1)
                    )

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
