"""Structured output: constraints (params.py, plain data) and their grammar matchers (grammar.py, llguidance).

Importing this package loads neither; `from tokenmill.structured import StructuredOutputs` is light."""

from tokenmill.structured.params import StructuredOutputs

__all__ = ["StructuredOutputs"]
