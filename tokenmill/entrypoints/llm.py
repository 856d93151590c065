"""The offline API: `LLM(...).generate(prompts)` and `.chat(messages)`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine, PromptInput
from tokenmill.models.tokenizer import Tokenizer
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

Message = dict[str, Any]


class LLM:
    """Load a model once, then generate for batches of prompts with continuous batching.

    `model` is None (the embedded default SmolLM2-135M-Instruct), an alias, a .gguf file, or a Hugging Face
    folder; every other keyword is an EngineConfig option (dtype, device, kv_cache_memory, ...).
    """

    def __init__(self, model: str | None = None, **engine_options: Any):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_options))

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Outputs in the order of `prompts`. A single prompt (a string, a token-id list, or a dict with
        'prompt' or 'prompt_token_ids') may be given without a list."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} SamplingParams for {len(prompts)} prompts; give one or one per prompt"
                )
        return self._run(prompts, params_list, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """One conversation (a list of {'role', 'content'} dicts) or a list of conversations."""
        if not messages:
            raise ValueError("messages is empty: give a conversation or a list of conversations")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        tok = self.get_tokenizer()
        prompts = [
            {
                "prompt_token_ids": tok.apply_chat_template(
                    conv, add_generation_prompt=add_generation_prompt, tokenize=True
                )
            }
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(
        self, prompts: list[PromptInput], params: list[SamplingParams], use_tqdm: bool
    ) -> list[RequestOutput]:
        engine = self.engine
        ids = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                ids.append(engine.add_request(prompt, p).request_id)
        except Exception:
            for rid in ids:  # leave the engine as it was
                engine.abort_request(rid)
            raise
        order = {rid: i for i, rid in enumerate(ids)}
        results: list[RequestOutput | None] = [None] * len(ids)
        with tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            while any(r is None for r in results):
                if not engine.has_unfinished_requests():
                    raise RuntimeError("the engine stopped with requests unfinished")  # never loop forever
                for out in engine.step():
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
                        bar.update(1)
        return results  # type: ignore[return-value]
