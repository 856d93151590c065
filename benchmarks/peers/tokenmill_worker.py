"""tokenmill's offline workloads through `tokenmill.LLM` (run with the tokenmill venv's python; see
_common.py for the protocol and how each figure is measured)."""

from __future__ import annotations

import time
from typing import Any

from _common import load_spec, log, run_all, write_result


def main() -> None:
    spec, out_path = load_spec()
    from tokenmill import LLM, SamplingParams

    options: dict[str, Any] = {"threads": spec["threads"]}
    if spec.get("weights") is not None:
        options["weights"] = spec["weights"]
    start = time.perf_counter()
    llm = LLM(model=spec.get("model"), **options)
    load_s = time.perf_counter() - start
    log(f"tokenmill loaded in {load_s:.1f} s with {options}")

    def generate(prompts: list[list[int]], max_tokens: int) -> tuple[list[int], dict[str, Any]]:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        extra: dict[str, Any] = {}
        if len(outs) == 1 and max_tokens > 1:  # the engine's own first/last token times
            m = outs[0].metrics
            if m.first_token_time is not None and m.finish_time is not None:
                extra["decode_tok_s_internal"] = (max_tokens - 1) / (m.finish_time - m.first_token_time)
        return [len(o.token_ids) for o in outs], extra

    import torch

    info = {"load_s": load_s, "options": options, "torch_threads": torch.get_num_threads()}
    write_result(out_path, run_all(spec, generate, info=info))


if __name__ == "__main__":
    main()
