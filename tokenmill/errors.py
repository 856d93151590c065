"""Typed errors that cross layers: the engine raises them, the server maps their types to HTTP answers.

This module imports nothing from tokenmill, so any layer may raise these errors without pulling in others.
"""

from __future__ import annotations

# Machine-readable codes of AdmissionError (the OpenAI error body's `code`).
INVALID_VALUE = "invalid_value"  # a parameter is out of range, of the wrong type, or empty
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # prompt + new tokens do not fit the context or KV cache
DUPLICATE_REQUEST_ID = "duplicate_request_id"  # the request id is already in use


class AdmissionError(ValueError):
    """A request the engine refuses before running it, naming the parameter at fault.

    `param`: the request field (a SamplingParams field, "prompt", "max_tokens", "request_id");
    `code`: one of the codes above; `message`: the sentence shown to the user. A ValueError, so that
    callers catching ValueError keep working.
    """

    def __init__(self, param: str, code: str, message: str):
        super().__init__(message)
        self.param = param
        self.code = code
        self.message = message

    def __reduce__(self):  # picklable with its three fields
        return type(self), (self.param, self.code, self.message)


class NonFiniteLogitsError(RuntimeError):
    """A step's logits hold NaN or inf on the rows of these sequences: their requests fail, not the batch."""

    def __init__(self, seq_ids: list[int]):
        super().__init__(f"non-finite logits for sequence(s) {seq_ids}")
        self.seq_ids = seq_ids
