"""What a request constrains its output to: one of a JSON schema, any JSON object, a regex, a choice of strings,
or a Lark / GBNF grammar. Plain data, checked for shape on construction (the grammar itself is compiled and
checked by structured.grammar, off the engine thread); no torch or llguidance import here."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tokenmill.errors import INVALID_VALUE, AdmissionError

KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one field set (names follow vLLM's StructuredOutputsParams):

    json: a JSON schema (dict or its JSON text); json_object: any JSON object; regex: a regular expression
    the whole output matches; choice: the output is one of these strings; grammar: a Lark grammar (GBNF is
    accepted too and converted). `whitespace_flexible`: allow any JSON whitespace (off by default: small
    models otherwise tend to emit newlines forever, so JSON is written as json.dumps writes it)."""

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    whitespace_flexible: bool = False

    def __post_init__(self) -> None:
        if self.choice is not None and not isinstance(self.choice, tuple):
            if not isinstance(self.choice, list):
                raise AdmissionError("structured", INVALID_VALUE, "choice must be a list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        set_fields = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_fields) != 1:
            raise AdmissionError(
                "structured",
                INVALID_VALUE,
                f"structured output needs exactly one of {', '.join(KINDS)}; got {set_fields or 'none'}",
            )
        kind = set_fields[0]
        if kind == "json":
            value = self.json
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise AdmissionError(
                        "structured", INVALID_VALUE, f"json schema is not JSON: {exc}"
                    ) from None
            if not isinstance(value, dict | bool):
                raise AdmissionError(
                    "structured", INVALID_VALUE, f"json schema must be an object, got {type(value).__name__}"
                )
        elif kind in ("regex", "grammar"):
            value = getattr(self, kind)
            if not isinstance(value, str) or not value:
                raise AdmissionError("structured", INVALID_VALUE, f"{kind} must be a non-empty string")
        elif kind == "choice":
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise AdmissionError(
                    "structured", INVALID_VALUE, "choice must be a non-empty list of non-empty strings"
                )
        elif self.json_object is not True:
            raise AdmissionError("structured", INVALID_VALUE, "json_object must be true or unset")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def cache_key(self) -> str:
        """The same constraint gives the same key, however the schema's keys were ordered."""
        value: Any = getattr(self, self.kind)
        if self.kind == "json" and isinstance(value, str):
            value = json.loads(value)
        return json.dumps([self.kind, value, self.whitespace_flexible], sort_keys=True, separators=(",", ":"))

    @classmethod
    def coerce(cls, value: StructuredOutputs | dict[str, Any] | None) -> StructuredOutputs | None:
        """SamplingParams(structured=...) takes the dataclass or a dict of its fields."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {*KINDS, "whitespace_flexible"}
            if unknown:
                raise AdmissionError(
                    "structured", INVALID_VALUE, f"unknown structured output fields {sorted(unknown)}"
                )
            return cls(**value)
        raise AdmissionError(
            "structured",
            INVALID_VALUE,
            f"structured must be StructuredOutputs or a dict, got {type(value).__name__}",
        )
