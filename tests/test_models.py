"""Model loading: GGUF (written here with gguf-py, in every supported tensor type) and HF folders (Llama,
Qwen2 with QKV bias, Llama-3 rope scaling), checked against transformers on the same files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize

from tests.conftest import TINY_CONFIG, random_llama_weights, write_tiny_model
from tokenmill import LLM, SamplingParams
from tokenmill.models.gguf import GGUFModel

Q = GGMLQuantizationType
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": list(range(300, 300 + n))} for n in (4, 37)]

_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_K_QUANT_BLOCKS = {  # bytes per 256-value block, and where its fp16 scale fields sit
    Q.Q4_K: (144, [0, 2]),
    Q.Q5_K: (176, [0, 2]),
    Q.Q6_K: (210, [208]),
}


def permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def k_quant_bytes(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks with sane fp16 scales (gguf-py can only dequantize these types)."""
    block_bytes, scale_offsets = _K_QUANT_BLOCKS[qtype]
    data = rng.integers(0, 256, size=(rows, cols // 256, block_bytes), dtype=np.uint8)
    for off in scale_offsets:
        data[:, :, off : off + 2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    return data.reshape(rows, -1)


def real_tokenizer_fields(real_gguf) -> list[tuple[str, object, GGUFValueType, GGUFValueType | None]]:
    fields = []
    for key, field in GGUFReader(str(real_gguf)).fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            fields.append((key, field.contents(), field.types[0], sub))
    return fields


def small_tokenizer_fields() -> list[tuple[str, object, GGUFValueType, GGUFValueType | None]]:
    """A byte-level BPE vocabulary of 259 tokens: reading it back is fast, unlike the real 49k one."""
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = sorted(ByteLevel.alphabet()) + ["\u0120t", "<|im_start|>", "<|im_end|>"]
    arr, s, u32 = GGUFValueType.ARRAY, GGUFValueType.STRING, GGUFValueType.INT32
    return [
        ("tokenizer.ggml.model", "gpt2", s, None),
        ("tokenizer.ggml.pre", "default", s, None),
        ("tokenizer.ggml.tokens", tokens, arr, s),
        ("tokenizer.ggml.token_type", [1] * 257 + [3, 3], arr, u32),
        ("tokenizer.ggml.merges", ["\u0120 t"], arr, s),
        ("tokenizer.ggml.bos_token_id", 257, GGUFValueType.UINT32, None),
        ("tokenizer.ggml.eos_token_id", 258, GGUFValueType.UINT32, None),
    ]


SMALL_CONFIG = {**TINY_CONFIG, "vocab_size": 259}


def write_gguf(
    path,
    config: dict,
    weights: dict[str, torch.Tensor],
    tokenizer_fields,
    qtype: Q = Q.F32,
    arch: str = "llama",
):
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_vocab_size(config["vocab_size"])
    for key, value, vtype, sub in tokenizer_fields:
        writer.add_key_value(key, value, vtype, sub_type=sub)
    rng = np.random.default_rng(0)
    for name, tensor in weights.items():
        w = tensor.numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            layer, rest = name.split(".")[2], ".".join(name.split(".")[3:])
            gname = f"blk.{layer}.{_GGUF_LAYER[rest]}"
            if rest == "self_attn.q_proj.weight":
                w = permute_like_llama_cpp(w, config["num_attention_heads"])
            elif rest == "self_attn.k_proj.weight":
                w = permute_like_llama_cpp(w, config["num_key_value_heads"])
        block = 256 if qtype in _K_QUANT_BLOCKS else 32
        if w.ndim == 1 or qtype == Q.F32 or w.shape[1] % block:
            writer.add_tensor(gname, w)
        elif qtype in _K_QUANT_BLOCKS:
            writer.add_tensor(gname, k_quant_bytes(qtype, *w.shape, rng), raw_dtype=qtype)
        else:
            writer.add_tensor(gname, quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_weights():
    return random_llama_weights(TINY_CONFIG)


@pytest.fixture(scope="module")
def reference_tokens(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), kv_cache_memory="16MiB")
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def hf_generate(folder, prompts) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p["prompt_token_ids"]])
            gen = model.generate(
                ids, max_new_tokens=GREEDY.max_tokens, min_new_tokens=GREEDY.max_tokens, do_sample=False
            )
            outs.append(gen[0, ids.shape[1] :].tolist())
    return outs


def test_hf_folder_matches_transformers(tiny_model_dir, reference_tokens):
    assert reference_tokens == hf_generate(tiny_model_dir, PROMPTS)


@pytest.mark.parametrize(
    "changes",
    [
        {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "tie_word_embeddings": True},
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "rope_theta": 500000.0,
        },
    ],
    ids=["qwen2-bias-tied", "llama3-rope-scaling"],
)
def test_variants_match_transformers(tmp_path, real_tokenizer, changes):
    config = {**TINY_CONFIG, **changes}
    folder = write_tiny_model(tmp_path / "m", real_tokenizer, config, seed=1)
    if config["model_type"] == "qwen2":  # add q/k/v biases, drop the untied head
        from safetensors.torch import load_file, save_file

        weights = load_file(str(folder / "model.safetensors"))
        weights.pop("lm_head.weight")
        g = torch.Generator().manual_seed(2)
        for i in range(config["num_hidden_layers"]):
            for n, size in (("q", 64), ("k", 32), ("v", 32)):
                weights[f"model.layers.{i}.self_attn.{n}_proj.bias"] = torch.randn(size, generator=g) * 0.5
        save_file(weights, str(folder / "model.safetensors"))
    llm = LLM(str(folder), kv_cache_memory="16MiB")
    assert llm.engine.model_config.attention_bias == (config["model_type"] == "qwen2")
    ours = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert ours == hf_generate(folder, PROMPTS)


def test_gguf_f32_matches_hf_folder(tmp_path, tiny_weights, default_gguf, reference_tokens):
    path = write_gguf(tmp_path / "tiny.gguf", TINY_CONFIG, tiny_weights, real_tokenizer_fields(default_gguf))
    llm = LLM(str(path), kv_cache_memory="16MiB")
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == reference_tokens
    assert llm.get_tokenizer().encode("Hello world") == [19556, 905]


@pytest.mark.parametrize(
    "qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]
)
def test_gguf_quant_types_dequantize(tmp_path, qtype):
    config = SMALL_CONFIG
    if qtype in _K_QUANT_BLOCKS:  # K-quant rows hold 256-value blocks
        config = {**SMALL_CONFIG, "hidden_size": 256, "intermediate_size": 256, "head_dim": 64}
    weights = random_llama_weights(config)
    path = write_gguf(tmp_path / f"tiny-{qtype.name}.gguf", config, weights, small_tokenizer_fields(), qtype)
    model = GGUFModel(path)
    config = model.model_config()
    loaded = dict(model.tensors(config))
    up = loaded["model.layers.0.mlp.up_proj.weight"]
    raw = next(t for t in model.reader.tensors if t.name == "blk.0.ffn_up.weight")
    assert raw.tensor_type == qtype
    expected = dequantize(raw.data, qtype).reshape(up.shape)
    np.testing.assert_array_equal(up.numpy(), expected)
    if qtype not in _K_QUANT_BLOCKS:  # real quantization of known weights: close to the originals
        original = weights["model.layers.0.mlp.up_proj.weight"]
        assert (up - original).abs().mean() < 0.1 * original.abs().mean()
    llm = LLM(str(path), kv_cache_memory="16MiB")
    out = llm.generate({"prompt_token_ids": list(range(10, 30))}, GREEDY, use_tqdm=False)[0]
    assert len(out.token_ids) == GREEDY.max_tokens


def test_unsupported_quant_type_is_named(tmp_path):
    path = write_gguf(
        tmp_path / "iq.gguf",
        SMALL_CONFIG,
        random_llama_weights(SMALL_CONFIG),
        small_tokenizer_fields(),
        Q.Q4_0,
    )
    # Patch one tensor's type to IQ4_NL, whose blocks have Q4_0's size: tensor info is
    # name, n_dims (u32), dims (u64 each), type (u32).
    data = bytearray(path.read_bytes())
    name = b"blk.0.ffn_up.weight"
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at : at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at : type_at + 4], "little") == Q.Q4_0
    data[type_at : type_at + 4] = int(Q.IQ4_NL).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="IQ4_NL"):
        LLM(str(path))


def test_unsupported_architecture_is_named(tmp_path):
    path = write_gguf(tmp_path / "gemma.gguf", SMALL_CONFIG, {}, small_tokenizer_fields(), arch="gemma3")
    with pytest.raises(ValueError, match="gemma3"):
        LLM(str(path))


def test_hf_unsupported_architecture(tmp_path, real_tokenizer):
    folder = write_tiny_model(tmp_path / "m", real_tokenizer)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM"):
        LLM(str(folder))


def test_missing_model_path_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="neither"):
        LLM("/nonexistent/model.gguf")
