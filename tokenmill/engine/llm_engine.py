"""The synchronous engine: admission checks, the step loop, detokenization, stop checks, outputs."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

import torch

from tokenmill.config import EngineConfig, physical_cores
from tokenmill.engine.block_manager import BlockManager, PrefixCacheStats
from tokenmill.engine.kv_compressor import KVCompressor
from tokenmill.engine.model_runner import ModelRunner
from tokenmill.engine.scheduler import ScheduledBatch, ScheduledSeq, Scheduler
from tokenmill.engine.sequence import Request, Sequence, SequenceStatus
from tokenmill.engine.step_budget import StepBudget, StepTimeFit
from tokenmill.errors import (
    CONTEXT_LENGTH_EXCEEDED,
    DUPLICATE_REQUEST_ID,
    INVALID_VALUE,
    AdmissionError,
    NonFiniteLogitsError,
)
from tokenmill.kv.cache import KIVI_RESIDUAL_SHARE, KVCache, KVCacheSpec
from tokenmill.kv.policy import KVPolicy
from tokenmill.layers.sampler import Sampler, SampleResult
from tokenmill.models.registry import load_model
from tokenmill.models.source import resolve_model
from tokenmill.models.tokenizer import IncrementalDetokenizer, Tokenizer
from tokenmill.outputs import CompletionOutput, Logprob, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec import DraftAsk, Proposer
from tokenmill.spec.adaptive import AdaptiveLength
from tokenmill.spec.config import SpeculativeConfig, kept_layers
from tokenmill.spec.ngram import NgramProposer
from tokenmill.spec.stats import SpecStats
from tokenmill.structured.grammar import StructuredBackend

logger = logging.getLogger(__name__)
# the TTFT target looks at this many prompts without a first token, oldest first (a step's worth and more)
MAX_PENDING_FOR_TTFT = 64

PromptInput = str | list[int] | dict[str, Any]


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.torch_device.type == "cpu":
            torch.set_num_threads(config.threads or physical_cores())
        self.source = resolve_model(config.model)
        loaded = load_model(
            self.source,
            config.torch_device,
            config.torch_dtype,
            config.max_model_len,
            config.weights,
            kernels=config.kernels,
            cpu_isa=config.cpu_isa,
            activations=config.activations,
        )
        self.model_config = loaded.config
        self.tokenizer: Tokenizer = loaded.tokenizer
        self.max_model_len = loaded.max_model_len
        c = self.model_config
        # lossy layer skipping: the model runs these layers only, and the cache holds K/V for them alone
        kept = kept_layers(c.num_layers, config.skip_layers) if config.skip_layers else None
        spec = KVCacheSpec(
            c.num_layers if kept is None else len(kept),
            c.num_kv_heads,
            c.head_dim,
            config.block_size,
            config.torch_dtype,
            config.kv_cache_dtype,
            config.kivi_window,
            config.kivi_sinks,
        )
        self.kv_spec = spec
        # KIVI keeps each running sequence's filling block and window in full precision: those residual blocks
        # come out of the byte budget, and no more sequences run at once than they can serve.
        residual = spec.residual_blocks_for(config.kv_cache_memory, config.max_num_seqs)
        per_seq = spec.kivi_window_blocks.blocks_per_seq
        self.max_num_seqs = residual // per_seq if spec.kivi_bits else config.max_num_seqs
        if self.max_num_seqs < config.max_num_seqs:
            logger.info(
                "kv_cache_dtype=%s: %d full-precision residual blocks (%d per sequence) fit in 1/%d of "
                "kv_cache_memory; running at most %d sequences at once (max_num_seqs=%d)",
                spec.cache_dtype, residual, per_seq, KIVI_RESIDUAL_SHARE, self.max_num_seqs, config.max_num_seqs,
            )  # fmt: skip
        num_blocks = spec.blocks_for_memory(config.kv_cache_memory, residual)
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory={config.kv_cache_memory} bytes holds no block of {config.block_size} tokens "
                f"({spec.bytes_per_block} bytes each"
                + (
                    f", after {residual} residual blocks of {spec.residual_block_bytes} bytes"
                    if residual
                    else ""
                )
                + ")"
            )
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching, extra_key=spec.format
        )
        self.scheduler = Scheduler(self.block_manager, config.max_num_batched_tokens, self.max_num_seqs)
        self.step_budget = StepBudget(
            config.max_num_batched_tokens,
            config.slo_tpot,
            config.slo_ttft,
            split_tokens=loaded.model.batched_rows_threshold(),
        )
        self.decode_times = StepTimeFit()  # steps without prompt tokens: what speculation's rows cost
        # The C++ attention kernel reads only written slots, so its cache may start uninitialized (no
        # multi-GiB memset at start-up); the torch path attends over whole blocks under a mask and needs zeros.
        kv_cache = KVCache(
            spec,
            num_blocks,
            config.torch_device,
            zero=loaded.model.kernels is None,
            residual_blocks=residual or None,
            model_layers=kept,
        )
        self.block_manager.on_free = kv_cache.release_block
        self.runner = ModelRunner(loaded.model, kv_cache, Sampler(self.tokenizer.eos_token_ids))
        self.kv_compressor = KVCompressor(kv_cache, self.block_manager)
        self.requests: dict[str, Request] = {}
        # Requests failed alone by a step (request id -> why): their final output has finish_reason "error";
        # the async engine takes these to end their streams with an error.
        self.failures: dict[str, str] = {}
        self._structured: StructuredBackend | None = None
        self._structured_lock = threading.Lock()
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self._seed_rng = torch.Generator().manual_seed(config.seed)
        self.speculative_config = spec_config = config.speculative_config
        self.proposer: Proposer | None = None
        self.adaptive: AdaptiveLength | None = None
        if spec_config is not None:
            self.proposer = self._build_proposer(spec_config, num_blocks)
            if spec_config.adaptive:
                self.adaptive = AdaptiveLength(spec_config.num_speculative_tokens, self.proposer.prior_cost)
        self.spec_stats = SpecStats()
        self._drafted: set[int] = set()  # sequences the proposer may hold state for

    def _build_proposer(self, spec: SpeculativeConfig, num_blocks: int) -> Proposer:
        if spec.method == "ngram":
            return NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
        c = self.config
        if spec.method == "draft_model":
            from tokenmill.spec.draft import load_draft_proposer

            return load_draft_proposer(
                c, spec, self.model_config, self.tokenizer, self.max_model_len, num_blocks,
            )  # fmt: skip
        from tokenmill.spec.layerskip import layerskip_proposer

        return layerskip_proposer(
            self.runner.model, self.kv_spec, spec.skip_layers or (), num_blocks, self.max_num_seqs,
            spec.num_speculative_tokens, c.torch_device,
        )  # fmt: skip

    @property
    def kept_layers(self) -> list[int] | None:
        """The layers every step runs when some are skipped (`skip_layers`); None: all of them."""
        return self.runner.kv_cache.model_layers

    # ---- capacity ------------------------------------------------------------------------------
    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_spec.bytes_per_token

    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.config.block_size

    @property
    def model_name(self) -> str:
        return self.source.name

    @property
    def structured(self) -> StructuredBackend:
        """The grammar compiler of this model's tokenizer, built on first use (about 0.5 s). Thread-safe:
        the server compiles constraints with it in worker threads before submitting requests."""
        with self._structured_lock:
            if self._structured is None:
                self._structured = StructuredBackend(self.tokenizer, self.model_config.vocab_size)
            return self._structured

    # ---- admission -----------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        """A prompt as text, as token ids, or as {"prompt": ...} / {"prompt_token_ids": [...]}.
        Raises AdmissionError(param="prompt") for a prompt it cannot take."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise AdmissionError(
                    "prompt", INVALID_VALUE, "a prompt dict needs 'prompt' or 'prompt_token_ids'"
                )
        if isinstance(prompt, str):
            if not prompt:
                raise AdmissionError("prompt", INVALID_VALUE, "prompt is empty")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            vocab = self.model_config.vocab_size
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
            if bad:
                raise AdmissionError(
                    "prompt",
                    INVALID_VALUE,
                    f"prompt token ids must be integers in [0, {vocab}), got {bad[:5]}",
                )
            return None, ids
        raise AdmissionError(
            "prompt",
            INVALID_VALUE,
            f"prompt must be a string or a list of token ids, got {type(prompt).__name__}",
        )

    def add_request(
        self,
        prompt: PromptInput,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> Request:
        """Queue a request; `arrival_time` (time.time()) is when it reached the server, default now. Raises
        AdmissionError (naming the parameter at fault) if it cannot run: an empty or invalid prompt, one that
        leaves no room in the context, max_tokens beyond the context or the KV cache, a request id in use."""
        params = params or SamplingParams()
        text, ids = self.tokenize_prompt(prompt)
        n_prompt = len(ids)
        if n_prompt == 0:
            raise AdmissionError("prompt", INVALID_VALUE, "prompt is empty (it has no tokens)")
        if n_prompt >= self.max_model_len:
            raise AdmissionError(
                "prompt",
                CONTEXT_LENGTH_EXCEEDED,
                f"prompt has {n_prompt} tokens, which leaves no room in the model's context of "
                f"{self.max_model_len} tokens",
            )
        if n_prompt >= self.kv_capacity_tokens:
            raise AdmissionError(
                "prompt",
                CONTEXT_LENGTH_EXCEEDED,
                f"prompt has {n_prompt} tokens, which leaves no room in the KV cache capacity of "
                f"{self.kv_capacity_tokens} tokens; raise kv_cache_memory",
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - n_prompt
        if n_prompt + max_tokens > self.max_model_len:
            raise AdmissionError(
                "max_tokens",
                CONTEXT_LENGTH_EXCEEDED,
                f"max_tokens={max_tokens} is too large: the prompt has {n_prompt} tokens and the context holds "
                f"{self.max_model_len}, so at most {self.max_model_len - n_prompt} new tokens fit",
            )
        policy = params.kv_policy if params.kv_policy is not None else self.config.kv_policy
        if n_prompt + max_tokens > self.kv_capacity_tokens and not policy.during_decode:
            raise AdmissionError(
                "max_tokens",
                CONTEXT_LENGTH_EXCEEDED,
                f"prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) exceeds the KV cache capacity of "
                f"{self.kv_capacity_tokens} tokens; raise kv_cache_memory or lower max_tokens",
            )
        if request_id is None:
            request_id = f"req-{next(self._request_ids)}"
        if request_id in self.requests:
            raise AdmissionError(
                "request_id", DUPLICATE_REQUEST_ID, f"request id {request_id!r} is already in use"
            )
        if params.structured is not None:
            self.structured.compile(params.structured)  # raises AdmissionError; a cache hit if precompiled
        request = Request(request_id, text, ids, params)
        if arrival_time is not None:  # its TTFT deadline counts from here (step_budget.py)
            request.metrics.arrival_time = arrival_time
        for index in range(params.n):
            seq = self._new_sequence(request, index, max_tokens, policy)
            if index > 0 and not policy.evicts:  # an evicting sibling scores and compresses its own prompt
                seq.fork_parent = request.seqs[0]
            request.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = request
        return request

    def _new_sequence(self, request: Request, index: int, max_tokens: int, policy: KVPolicy) -> Sequence:
        params = request.params
        if params.seed is not None:
            seed = params.seed + index
        else:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_rng))
        generator = torch.Generator(device=self.config.torch_device).manual_seed(seed)
        return Sequence(
            seq_id=next(self._seq_ids),
            request=request,
            index=index,
            token_ids=list(request.prompt_token_ids),
            generator=generator,
            detokenizer=IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids, params.skip_special_tokens
            ),
            max_tokens=max_tokens,
            logprobs=[] if params.logprobs is not None else None,
            kv_policy=policy,
            grammar=self.structured.matcher(params.structured) if params.structured is not None else None,
            prompt_scores=[] if params.prompt_logprobs is not None and index == 0 else None,
        )

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks. Unknown or finished ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.remove(seq)
                self._finish(seq, "abort")
        return self._make_output(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def calibrate_step_time(
        self, prompt_lens: Iterable[int] = (16, 48, 64, 96, 128), new_tokens: int = 3
    ) -> None:
        """Measure the step-time line the SLO budget plans with (step_budget.py) before the first request.

        Until it has seen MIN_OBSERVATIONS steps the budget falls back to the configured maximum, so a burst
        that meets a fresh server would be prefilled in one step and every prompt of it would miss its TTFT.
        A few short synthetic requests, one at a time, give prefill steps of several sizes and decode steps;
        a first tiny one takes the kernels' first-call costs, and its steps are dropped from the fit. Call it
        on an idle engine (a server's, before it serves)."""
        if self.requests:
            raise RuntimeError("calibrate_step_time needs an idle engine")
        vocab = self.model_config.vocab_size
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        limit = min(
            self.max_model_len - new_tokens - 1,
            self.kv_capacity_tokens - new_tokens - 1,
            self.config.max_num_batched_tokens,
        )
        if limit < 1:
            return  # too small a context or cache for even one: the budget then learns from real steps
        for i, n in enumerate((4, *prompt_lens)):
            ids = [(7919 * (i + 1) * (j + 1)) % vocab for j in range(min(n, limit))]
            self.add_request({"prompt_token_ids": ids}, params, request_id=f"tokenmill-calibration-{i}")
            while self.has_unfinished_requests():
                self.step()
            if i == 0:
                self.step_budget.forget()  # the warm-up's steps are not typical ones
        self.block_manager.stats = PrefixCacheStats()  # no user traffic was looked up yet

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward pass, and return outputs of the requests that advanced."""
        if self.speculative_config is not None:
            self._propose_drafts()
        batch = self.scheduler.schedule(self._step_budget())
        if not batch:
            return []
        for scheduled in batch.seqs:
            self.kv_compressor.mark(scheduled)
        computed_before = [s.seq.num_computed_tokens for s in batch.seqs]
        decode_tokens = sum(s.num_new_tokens for s in batch.seqs if s.seq.num_output_tokens > 0)
        started = time.perf_counter()
        results, failed = self._run_isolated(batch)
        seconds = time.perf_counter() - started
        self.step_budget.observe(batch.num_tokens, seconds, decode_tokens)
        if self.adaptive is not None and all(
            s.num_new_tokens == 1 + len(s.seq.draft_token_ids) for s in batch.seqs
        ):
            self.decode_times.observe(batch.num_tokens, seconds)  # decode and verification rows only
        now = time.time()
        touched: dict[str, Request] = {}
        for scheduled in batch.seqs:
            seq = scheduled.seq
            if seq.request.request_id in failed:
                continue
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = now
            drafts = seq.draft_token_ids
            seq.draft_token_ids = []
            seq.num_computed_tokens += scheduled.num_new_tokens - len(drafts)
            self.block_manager.commit(seq)
            emitted = results.get(seq.seq_id)
            if emitted is None:
                continue
            touched[seq.request.request_id] = seq.request
            if drafts:
                self.spec_stats.record(len(drafts), len(emitted) - 1)
                if self.adaptive is not None:
                    self.adaptive.observe(len(drafts), len(emitted) - 1)
            for i, result in enumerate(emitted):
                self._append_token(seq, result, now)
                if seq.is_finished:
                    break
                if i < len(emitted) - 1:  # an accepted draft: its K/V was computed in this step
                    seq.num_computed_tokens += 1
            if drafts and not seq.is_finished:
                self.block_manager.release_unused(seq)  # the rejected drafts' slots
        for scheduled, before in zip(batch.seqs, computed_before, strict=True):
            self.kv_compressor.update(scheduled, before)
        outputs = []
        for request in touched.values():
            outputs.append(self._make_output(request))
            if request.finished:
                self.requests.pop(request.request_id, None)
        for request_id, reason in failed.items():
            output = self.fail_request(request_id, reason)
            if output is not None:
                outputs.append(output)
        return outputs

    def _run_isolated(self, batch: ScheduledBatch) -> tuple[dict[int, list[SampleResult]], dict[str, str]]:
        """`runner.run(batch)`, where a failure costs only the requests that cause it: rows with non-finite
        logits fail at once, and a batch that raises is split in halves and each half retried (the K/V
        writes repeat into the same slots; generators are rewound) until the raising rows are alone.
        Returns the results and the failed requests (id -> reason); a healthy step runs once."""
        # Generator states before the run (a few microseconds per row): a retried row draws what it would have.
        states = {s.seq.seq_id: s.seq.generator.get_state() for s in batch.seqs}
        try:
            return self.runner.run(batch), {}
        except Exception as exc:
            first = exc
        results: dict[int, list[SampleResult]] = {}
        failed: dict[str, str] = {}
        pending: list[tuple[list[ScheduledSeq], Exception | None]] = [(batch.seqs, first)]
        while pending:
            seqs, error = pending.pop()
            seqs = [s for s in seqs if s.seq.request.request_id not in failed]
            if not seqs:
                continue
            if error is None:
                for s in seqs:
                    s.seq.generator.set_state(states[s.seq.seq_id])
                try:
                    results.update(self.runner.run(_sub_batch(batch, seqs)))
                    continue
                except Exception as exc:
                    error = exc
            if isinstance(error, NonFiniteLogitsError):
                bad = set(error.seq_ids)
                for s in seqs:
                    if s.seq.seq_id in bad:
                        rid = s.seq.request.request_id
                        failed[rid] = (
                            f"request {rid} failed: the model produced non-finite logits (NaN or inf)"
                        )
                        logger.error("%s", failed[rid])
                pending.append((seqs, None))
            elif len({s.seq.request.request_id for s in seqs}) == 1:
                rid = seqs[0].seq.request.request_id
                failed[rid] = f"request {rid} failed: the engine raised {type(error).__name__} on it"
                logger.error("step failed on request %s alone; failing it", rid, exc_info=error)
            else:
                half = len(seqs) // 2
                pending += [(seqs[half:], None), (seqs[:half], None)]
        return results, failed

    def fail_request(self, request_id: str, reason: str) -> RequestOutput | None:
        """End a request with finish_reason "error" and free its blocks; `reason` goes to `failures`."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.remove(seq)
                self._finish(seq, "error")
        self.failures[request_id] = reason
        return self._make_output(request)

    def _step_budget(self) -> int:
        """The next step's token budget: the TPOT target's, raised where a TTFT target needs it (step_budget.py)."""
        sched, budget = self.scheduler, self.step_budget
        if budget.slo_ttft_s is None:
            return budget.budget(len(sched.running))
        now = time.time()
        pending = [
            (
                seq.request.metrics.arrival_time + budget.slo_ttft_s - now,
                seq.num_tokens - seq.num_computed_tokens,
            )
            for seq in itertools.islice(itertools.chain(sched.running, sched.waiting), MAX_PENDING_FOR_TTFT)
            if seq.num_output_tokens == 0
        ]
        return budget.budget(len(sched.running), pending)

    def _decode_fit(self) -> tuple[float, float] | None:
        """The step-time line adaptive k prices verification with: fitted on decode and verification steps
        alone once they vary in size (a few rows cost per row what a prompt chunk's many rows do not:
        below the GEMM threshold the packed kernels decode the weights for every row), else on all steps."""
        return self.decode_times.fit() or self.step_budget.fit()

    def _propose_drafts(self) -> None:
        """Give every decoding sequence up to k draft tokens, never past its max_tokens or the context: the
        next step verifies them together with the sequence's next token. k is fixed, or chosen per step by
        spec/adaptive.py from the acceptance so far, the batch size and the measured costs (0: no drafts)."""
        spec = self.speculative_config
        running = {s.seq_id for s in self.scheduler.running}
        for seq_id in self._drafted - running:  # preempted since (finished ones were released by _finish)
            self.proposer.release(seq_id)
        self._drafted &= running
        decoding = [s for s in self.scheduler.running if s.num_computed_tokens == s.num_tokens - 1]
        k = spec.num_speculative_tokens
        probe = 0
        if self.adaptive is not None:
            k = self.adaptive.choose(len(decoding), self._decode_fit())
            probe = self.adaptive.probe() if k == 0 else 0
        asks = []
        for seq in decoding:
            room = min(seq.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens) - 1
            seq.draft_token_ids = []
            want = min(k or probe, room)
            if want > 0:
                asks.append(DraftAsk(seq.seq_id, seq.token_ids, want))
                probe = 0  # a probe is one sequence
        if not asks:
            return
        self._drafted.update(a.seq_id for a in asks)
        started = time.perf_counter()
        drafts = self.proposer.propose(asks)
        seconds = time.perf_counter() - started
        by_id = {seq.seq_id: seq for seq in decoding}
        for ask, tokens in zip(asks, drafts, strict=True):
            by_id[ask.seq_id].draft_token_ids = list(tokens[: ask.k])
        fit = self._decode_fit()
        if self.adaptive is not None and fit is not None:
            passes = max(len(t) for t in drafts) or 1
            self.adaptive.observe_draft_cost(seconds / passes, fit[0] + fit[1] * len(asks))

    def _append_token(self, seq: Sequence, result: SampleResult, now: float) -> None:
        params = seq.params
        token = result.token_id
        seq.token_ids.append(token)
        metrics = seq.request.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        if seq.logprobs is not None and result.logprob is not None:
            seq.logprobs.append(self._logprob_entry(result))
            seq.cumulative_logprob += result.logprob
        delta = seq.detokenizer.step([token])
        seq.output_text += delta
        n_out = seq.num_output_tokens
        grammar_done = False
        if seq.grammar is not None and token not in self.tokenizer.eos_token_ids:
            if not seq.grammar.accept(token):  # the mask made this impossible; never continue off-grammar
                logger.error(
                    "request %s: token %d refused by its grammar: %s",
                    seq.request.request_id,
                    token,
                    seq.grammar.error,
                )
            grammar_done = seq.grammar.is_stopped
        if n_out >= params.min_tokens:
            if not params.ignore_eos and token in self.tokenizer.eos_token_ids:
                return self._finish_and_free(seq, "stop")
            if token in params.stop_token_ids:
                seq.stop_reason = token
                return self._finish_and_free(seq, "stop")
            if params.stop and delta:
                hit = self._find_stop(seq.output_text, len(delta), params.stop)
                if hit is not None:
                    cut, stop = hit
                    seq.output_text = seq.output_text[:cut]
                    seq.stop_reason = stop
                    return self._finish_and_free(seq, "stop")
        if grammar_done:  # the grammar is complete: only the end of sequence could follow
            return self._finish_and_free(seq, "stop")
        if n_out >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            return self._finish_and_free(seq, "length")

    @staticmethod
    def _find_stop(text: str, delta_len: int, stops: Iterable[str]) -> tuple[int, str] | None:
        """Earliest stop string that ends inside the new text (it may start in earlier tokens)."""
        best: tuple[int, str] | None = None
        for stop in stops:
            start = max(0, len(text) - delta_len - len(stop) + 1)
            idx = text.find(stop, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        return best

    def _logprob_entry(self, result: SampleResult) -> dict[int, Logprob]:
        decode = self.tokenizer.decode
        entry = {result.token_id: Logprob(result.logprob, result.rank, decode([result.token_id], False))}
        for rank, (token_id, lp) in enumerate(result.top or [], start=1):
            if token_id not in entry:
                entry[token_id] = Logprob(lp, rank, decode([token_id], False))
        return entry

    def _finish_and_free(self, seq: Sequence, reason: str) -> None:
        self.scheduler.remove(seq)
        self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if self.proposer is not None:
            self.proposer.release(seq.seq_id)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq.request.finished:
            seq.request.metrics.finish_time = time.time()

    # ---- outputs -------------------------------------------------------------------------------
    def _visible_text(self, seq: Sequence) -> str:
        """Hold back the tail that could still become a stop string, so it is never shown."""
        if seq.is_finished or not seq.params.stop:
            return seq.output_text
        hold = max(len(s) for s in seq.params.stop) - 1
        return seq.output_text[: len(seq.output_text) - hold] if hold else seq.output_text

    def _make_output(self, request: Request) -> RequestOutput:
        outputs = [
            CompletionOutput(
                index=seq.index,
                text=self._visible_text(seq),
                token_ids=list(seq.output_token_ids),
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
            )
            for seq in request.seqs
        ]
        first = request.seqs[0]
        prompt_logprobs = None
        if first.prompt_scores is not None:  # entry 0 (the first prompt token) has nothing before it: None
            for result in first.prompt_scores[len(first.prompt_logprobs) :]:
                first.prompt_logprobs.append(self._logprob_entry(result))
            prompt_logprobs = [None, *first.prompt_logprobs]
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=list(request.prompt_token_ids),
            outputs=outputs,
            finished=request.finished,
            metrics=request.metrics,
            num_cached_tokens=first.num_cached_tokens,
            prompt_logprobs=prompt_logprobs,
        )


def _sub_batch(batch: ScheduledBatch, seqs: list[ScheduledSeq]) -> ScheduledBatch:
    """The part of `batch` for `seqs`: their rows and the copy-on-write copies into their blocks."""
    blocks = {b for s in seqs for b in s.seq.block_table}
    return ScheduledBatch(seqs=list(seqs), copies=[c for c in batch.copies if c[1] in blocks])
