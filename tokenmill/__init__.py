"""tokenmill: an LLM inference and serving engine on PyTorch.

The names below load on first use, so that importing one submodule (tokenmill.sampling_params,
tokenmill.config, ...) does not load the engine, the model code or the server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "tokenmill.entrypoints.llm",
    "SamplingParams": "tokenmill.sampling_params",
    "EngineConfig": "tokenmill.config",
    "EngineArgs": "tokenmill.engine_args",
    "WeightFormat": "tokenmill.formats",
    "AdmissionError": "tokenmill.errors",
    "RequestOutput": "tokenmill.outputs",
    "CompletionOutput": "tokenmill.outputs",
}
__all__ = [
    "LLM",
    "SamplingParams",
    "EngineConfig",
    "EngineArgs",
    "WeightFormat",
    "AdmissionError",
    "RequestOutput",
    "CompletionOutput",
]

if TYPE_CHECKING:
    from tokenmill.config import EngineConfig
    from tokenmill.engine_args import EngineArgs
    from tokenmill.entrypoints.llm import LLM
    from tokenmill.errors import AdmissionError
    from tokenmill.formats import WeightFormat
    from tokenmill.outputs import CompletionOutput, RequestOutput
    from tokenmill.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup does not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
