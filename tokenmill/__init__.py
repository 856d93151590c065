"""tokenmill: an LLM inference and serving engine on PyTorch."""

from tokenmill.config import EngineConfig
from tokenmill.entrypoints.llm import LLM
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
