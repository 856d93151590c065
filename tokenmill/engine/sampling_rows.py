"""The sampler's per-row view of the engine's sequences."""

from __future__ import annotations

from collections.abc import Iterable

from tokenmill.engine.sequence import Sequence
from tokenmill.layers.sampler import SamplingRow


def rows_from_seqs(seqs: Iterable[Sequence]) -> list[SamplingRow]:
    """One SamplingRow per sequence, in order. The rows share the sequences' token lists (no copy): use them
    before the sequences change. A sequence with a grammar gets the bitmask of its next token, or with
    speculative drafts one per verified position."""
    return [SamplingRow(s.params, s.generator, s.token_ids, s.num_prompt_tokens, _bitmask(s)) for s in seqs]


def _bitmask(seq: Sequence):
    if seq.grammar is None:
        return None
    if seq.draft_token_ids:
        return seq.grammar.draft_bitmasks(seq.draft_token_ids)
    return seq.grammar.next_bitmask()
