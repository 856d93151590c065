"""Grammar compilation (cached by constraint) and per-sequence matchers, on llguidance.

The compiler is thread-safe: the server compiles a request's constraint in a worker thread before it submits
the request (an invalid one is a 400 there), so that the engine thread only finds it in the cache and copies
the compiled matcher. A matcher follows one sequence's accepted tokens; each step it fills the packed
next-token bitmask (int32 words, bit i of word w allows token 32 * w + i) that the sampler applies, and for a
sequence with speculative drafts it fills one mask per verified position, advancing through the drafts and
rolling back afterwards (the engine then advances it by the tokens actually accepted).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence

import llguidance
import torch

from tokenmill.errors import INVALID_VALUE, AdmissionError
from tokenmill.models.tokenizer import Tokenizer
from tokenmill.structured.params import StructuredOutputs

_COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_text(spec: StructuredOutputs) -> str:
    """The llguidance grammar of a constraint (not yet checked: LLMatcher does that)."""
    kind = spec.kind
    if kind in ("json", "json_object"):
        schema = spec.json if kind == "json" else {"type": "object"}
        if isinstance(schema, str):
            schema = json.loads(schema)
        options = {"whitespace_flexible": True} if spec.whitespace_flexible else _COMPACT_JSON
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if kind == "choice":
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in spec.choice)
        )
    try:
        return llguidance.grammar_from("grammar", spec.grammar)  # Lark, or GBNF converted to Lark
    except ValueError as exc:
        raise AdmissionError("structured", INVALID_VALUE, f"invalid grammar: {exc}") from None


class StructuredBackend:
    """Compiles constraints against one tokenizer; keeps the last `cache_size` compiled ones."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = 256):
        self.vocab_size = vocab_size
        self.num_words = (vocab_size + 31) // 32
        self.eos_token_ids = sorted(tokenizer.eos_token_ids)
        self.ll_tokenizer = llguidance.LLTokenizer(
            tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=self.eos_token_ids or None
        )
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.num_compiled = 0

    def compile(self, spec: StructuredOutputs) -> llguidance.LLMatcher:
        """The compiled (unstarted) matcher of `spec`, from the cache or compiled now. Raises AdmissionError
        (param "structured") naming what is wrong with a schema, regex or grammar."""
        key = spec.cache_key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        try:
            text = grammar_text(spec)
        except AdmissionError:
            raise
        except ValueError as exc:  # llguidance's own check of the schema's JSON
            raise AdmissionError("structured", INVALID_VALUE, f"invalid {spec.kind}: {exc}") from None
        matcher = llguidance.LLMatcher(self.ll_tokenizer, text, log_level=0)  # drops the GIL while compiling
        if matcher.is_error():
            raise AdmissionError(
                "structured", INVALID_VALUE, f"invalid {_NAMES[spec.kind]}: {matcher.get_error()}"
            )
        with self._lock:
            self._cache[key] = matcher
            self.num_compiled += 1
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return matcher

    def matcher(self, spec: StructuredOutputs) -> GrammarMatcher:
        return GrammarMatcher(self.compile(spec).deep_copy(), self)


_NAMES = {
    "json": "JSON schema",
    "json_object": "JSON object grammar",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
}


class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, backend: StructuredBackend):
        self._m = matcher
        self._backend = backend

    def _fill(self, out: torch.Tensor) -> None:
        self._m.unsafe_compute_mask_ptr(out.data_ptr(), out.numel() * out.element_size())

    def next_bitmask(self) -> torch.Tensor:
        """[1, words] int32: the tokens the grammar allows next."""
        out = torch.empty((1, self._backend.num_words), dtype=torch.int32)
        self._fill(out[0])
        return out

    def draft_bitmasks(self, drafts: Sequence[int]) -> torch.Tensor:
        """[m, words]: the mask before the first draft, and after each draft the grammar accepts (m <= k + 1).
        The mask of a position after a draft the grammar refuses is never needed: that draft has probability 0
        under its own mask, so verification stops there. The matcher is left where it was."""
        masks = torch.empty((len(drafts) + 1, self._backend.num_words), dtype=torch.int32)
        consumed = 0
        try:
            self._fill(masks[0])
            for token in drafts:
                if token in self._backend.eos_token_ids or not _allows(masks[consumed], token):
                    break  # verification ends at this draft at the latest
                if not self._m.consume_token(token):
                    break
                consumed += 1
                self._fill(masks[consumed])
        finally:
            if consumed:
                self._m.rollback(consumed)
        return masks[: consumed + 1]

    def accept(self, token: int) -> bool:
        """Advance by an emitted token; False if the grammar refuses it (then the matcher is in error)."""
        return self._m.consume_token(token)

    @property
    def is_stopped(self) -> bool:
        """Nothing but the end of the output can follow (the grammar is complete)."""
        return self._m.is_stopped()

    @property
    def is_error(self) -> bool:
        return self._m.is_error()

    @property
    def error(self) -> str:
        return self._m.get_error()


def _allows(mask: torch.Tensor, token: int) -> bool:
    return bool((int(mask[token // 32]) >> (token % 32)) & 1)
