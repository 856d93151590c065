"""Convert the GGUF to a plain safetensors Hugging Face folder that vLLM loads (run in the vLLM venv).

    /tmp/vllm-peer/bin/python benchmarks/peers/vllm_convert.py GGUF OUT_DIR

transformers dequantizes the GGUF (`gguf_file=`); that model refuses `save_pretrained`, so a plain
`LlamaForCausalLM` is built from its config, given its state dict, and saved with the tokenizer.
Idempotent: does nothing if OUT_DIR already holds a converted model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def converted(out: Path) -> bool:
    return (
        (out / "config.json").exists()
        and any(out.glob("*.safetensors"))
        and (out / "tokenizer.json").exists()
    )


def strip_quantization_config(out: Path) -> None:
    """The dequantized config still names the GGUF quantization; vLLM would try to use it."""
    path = out / "config.json"
    config = json.loads(path.read_text())
    if config.pop("quantization_config", None) is not None:
        path.write_text(json.dumps(config, indent=2) + "\n")


def main() -> int:
    gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
    if converted(out):
        strip_quantization_config(out)
        print(f"already converted: {out}")
        return 0
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = src.config
    config.dtype = torch.float32  # weights are stored as fp32; vLLM casts to --dtype on load
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    plain.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    strip_quantization_config(tmp)
    tmp.rename(out)
    print(f"converted {gguf} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
