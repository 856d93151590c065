"""Tokenizer: HF `tokenizers` for BPE, jinja2 for chat templates.

Built either from GGUF metadata (vocab, merges, token types stored as llama.cpp keys) or from an HF
model dir (tokenizer.json + tokenizer_config.json). Output matches transformers' tokenizers for the
same files; transformers itself is never imported here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> split regex applied before byte-level mapping (names as llama.cpp writes them).
_PRE_SPLITS = {
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "dbrx", "smaug-bpe", "lfm2"],
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez"], _QWEN2_SPLIT),
}
# Pre-tokenizers that are GPT-2's regex with every digit split off first (HF: Digits + ByteLevel).
_DIGIT_PRES = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}


@cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable char table that byte-level BPE vocabularies are spelled in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


def _sentencepiece_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Recover BPE merges from sentencepiece scores: every split of a token into two vocab pieces,
    best score first (same ordering as transformers' `generate_merges`)."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))]
        local = [m for m in local if m[0] in vocab and m[1] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _byte_level_backend(tokens: list[str], types: list[int], merges: list, pre: str) -> HFTokenizer:
    """GPT-2 style byte-level BPE; `pre` (tokenizer.ggml.pre) picks the split regex. Like llama.cpp
    and transformers, add_space_prefix is ignored for byte-level vocabs."""
    # Normal tokens must be spelled in the byte alphabet; control/user tokens stay raw since they are
    # matched whole as added tokens (and the ByteLevel decoder passes unknown chars through as UTF-8).
    table = _bytes_to_unicode()
    alphabet = set(table.values())
    vocab = {
        t
        if ty in (_CONTROL, _USER_DEFINED) or set(t) <= alphabet
        else "".join(table[b] for b in t.encode()): i
        for i, (t, ty) in enumerate(zip(tokens, types, strict=True))
    }
    backend = HFTokenizer(BPE(vocab, merges, dropout=None, fuse_unk=False))
    if pre in _PRE_SPLITS:
        split = pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated")
        steps = [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    else:  # GPT-2's own regex, for some vocabs with every digit split off first
        digits = [pre_tokenizers.Digits(individual_digits=True)] if pre in _DIGIT_PRES else []
        steps = [*digits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(
    tokens: list[str], scores: list[float], merges: list, unk: str | None, prefix: bool
) -> HFTokenizer:
    """Sentencepiece BPE as transformers' LlamaTokenizer: byte fallback, "▁" for spaces."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = merges or _sentencepiece_merges(vocab, dict(zip(tokens, scores, strict=True)))
    backend = HFTokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    scheme = "first" if prefix else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + [decoders.Strip(content=" ", left=1)] * prefix)
    return backend


def _set_post_processor(
    backend: HFTokenizer, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool
) -> tuple[bool, bool]:
    """BOS/EOS insertion for encode(add_special_tokens=True), as transformers' update_post_processor."""
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = f"{f'{bos}:0 ' if add_bos else ''}$A:0{f' {eos}:0' if add_eos else ''}"
    pair = f"{single}{f' {bos}:1' if add_bos else ''} $B:1{f' {eos}:1' if add_eos else ''}"
    special = [(t, backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    return add_bos, add_eos


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
) -> str:
    # Jinja's own tojson HTML-escapes; chat templates expect plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@cache
def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the same sandboxed environment transformers uses."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list | tuple) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': str, 'content': str} dicts")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {type(msg).__name__}")
        if not isinstance(msg.get("role"), str):
            raise ValueError(f"messages[{i}] needs a string 'role'")
        if not isinstance(msg.get("content"), str):
            raise ValueError(f"messages[{i}] needs a string 'content'")


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json spells special tokens as a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _pick_template(value: Any) -> str | None:
    """Chat templates may be a list of named templates; take 'default' (or the first)."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value}
        return named.get("default", next(iter(named.values()), None))
    return value


@dataclass(eq=False)
class Tokenizer:
    """Wraps a tokenizers.Tokenizer plus special-token info and chat template."""

    backend: HFTokenizer = field(repr=False)  # its repr dumps the whole vocab
    bos_token: str | None = None
    eos_token: str | None = None
    unk_token: str | None = None
    pad_token: str | None = None
    add_bos_token: bool = False
    add_eos_token: bool = False
    chat_template: str | None = field(default=None, repr=False)
    extra_eos_token_ids: Sequence[int] = ()
    bos_token_id: int | None = field(init=False)
    eos_token_id: int | None = field(init=False)
    pad_token_id: int | None = field(init=False)
    eos_token_ids: set[int] = field(init=False)
    vocab_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.bos_token_id, self.eos_token_id, self.pad_token_id = (
            self.token_to_id(t) for t in (self.bos_token, self.eos_token, self.pad_token)
        )
        self.eos_token_ids = {i for i in (self.eos_token_id, *self.extra_eos_token_ids) if i is not None}
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        added = self.backend.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, tok in added.items() if tok.special)

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        """Build from GGUF key/value metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`)."""
        kind = meta.get("tokenizer.ggml.model")
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        prefix = meta.get("tokenizer.ggml.add_space_prefix")

        def tok(key: str) -> str | None:
            idx = meta.get(f"tokenizer.ggml.{key}")
            return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

        if kind == "gpt2":
            pre = meta.get("tokenizer.ggml.pre", "default")
            backend = _byte_level_backend(tokens, types, merges, pre)
        elif kind == "llama":  # llama.cpp's sentencepiece vocab; it adds BOS unless told otherwise
            scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
            backend = _sentencepiece_backend(
                tokens, scores, merges, tok("unknown_token_id"), prefix is not False
            )
        else:
            raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (supported: 'gpt2', 'llama')")

        names = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")
        specials = {tok(k) for k in names} | {
            t for t, ty in zip(tokens, types, strict=True) if ty == _CONTROL
        }
        specials.discard(None)
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in sorted(specials)])
        user = [t for t, ty in zip(tokens, types, strict=True) if ty == _USER_DEFINED]
        backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

        bos, eos = tok("bos_token_id"), tok("eos_token_id")
        add_bos, add_eos = _set_post_processor(
            backend,
            bos,
            eos,
            bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")),
            bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        )
        extra_eos = [
            meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta
        ]
        return cls(
            backend,
            bos_token=bos,
            eos_token=eos,
            unk_token=tok("unknown_token_id"),
            pad_token=tok("padding_token_id"),
            add_bos_token=add_bos,
            add_eos_token=add_eos,
            chat_template=meta.get("tokenizer.chat_template"),
            extra_eos_token_ids=extra_eos,
        )

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this tokenizer, as JSON-able values (the weight cache stores it:
        rebuilding from GGUF metadata is the slow part of a cold start)."""
        return {
            "backend": self.backend.to_str(),
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "chat_template": self.chat_template,
            "extra_eos_token_ids": list(self.extra_eos_token_ids),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Tokenizer:
        fields = dict(data)
        backend = HFTokenizer.from_str(fields.pop("backend"))
        return cls(backend, **fields)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Build from an HF model dir: tokenizer.json, tokenizer_config.json, chat_template.jinja,
        generation_config.json (for the full eos list)."""
        path = Path(path)
        backend = HFTokenizer.from_file(str(path / "tokenizer.json"))

        def load(name: str) -> dict[str, Any]:
            f = path / name
            return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}

        cfg, gen = load("tokenizer_config.json"), load("generation_config.json")
        special_map = load("special_tokens_map.json")
        toks = {
            n: _token_str(cfg.get(n, special_map.get(n)))
            for n in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        if "add_bos_token" in cfg or "add_eos_token" in cfg or backend.post_processor is None:
            flags = bool(cfg.get("add_bos_token")), bool(cfg.get("add_eos_token"))
            add_bos, add_eos = _set_post_processor(backend, toks["bos_token"], toks["eos_token"], *flags)
        else:  # the tokenizer.json post-processor decides; read the flags back off it
            bos_id, eos_id = (
                backend.token_to_id(t) if t else None for t in (toks["bos_token"], toks["eos_token"])
            )
            probe = backend.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and probe[:1] == [bos_id]
            add_eos = eos_id is not None and len(probe) > 1 and probe[-1] == eos_id
        template_file = path / "chat_template.jinja"
        template = (
            template_file.read_text(encoding="utf-8") if template_file.is_file() else cfg.get("chat_template")
        )
        gen_eos = gen.get("eos_token_id", [])
        return cls(
            backend,
            **toks,
            add_bos_token=add_bos,
            add_eos_token=add_eos,
            chat_template=_pick_template(template),
            extra_eos_token_ids=[gen_eos] if isinstance(gen_eos, int) else list(gen_eos or []),
        )

    # ---- encode / decode ----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; special-token strings in it map to their ids. BOS/EOS are added
        per add_bos_token/add_eos_token only when add_special_tokens is set."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        """Raw vocab string of one id (byte-level/'▁' spelling); '' for ids past the vocab
        (models often pad their embedding beyond the tokenizer)."""
        return self.backend.id_to_token(int(token_id)) or ""

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self.id_to_token(ids)
        return [self.id_to_token(i) for i in ids]

    def token_to_id(self, token: str | None) -> int | None:
        return self.backend.token_to_id(token) if token is not None else None

    def is_special(self, token_id: int) -> bool:
        """True for special (control) tokens, the ones skip_special_tokens drops."""
        return int(token_id) in self._special_ids

    # ---- chat ---------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render messages with the model's jinja chat template, like transformers.

        With tokenize=True the text is encoded without adding BOS/EOS: the template writes those."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        _validate_messages(messages)
        context = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
            "tools": None,
            "documents": None,
            **kwargs,
        }
        try:
            text = _compile_template(self.chat_template).render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **context
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from e
        return self.encode(text, add_special_tokens=False) if tokenize else text


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without ever emitting half a UTF-8
    character (as vLLM/HF TextStreamer: decode a window prefix_offset..read_offset vs
    prefix_offset..end, hold back output that ends in U+FFFD)."""

    # Prompt tokens kept as left context so the first generated token decodes with its leading space.
    _PROMPT_CONTEXT = 5

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids = [int(i) for i in prompt_ids]
        self._num_prompt = len(self._ids)
        self._read_offset = len(self._ids)
        self._prefix_offset = max(len(self._ids) - self._PROMPT_CONTEXT, 0)
        self._text = ""

    @property
    def text(self) -> str:
        """All generated text emitted so far (excludes the prompt)."""
        return self._text

    @property
    def token_ids(self) -> list[int]:
        """Generated token ids so far (excludes the prompt)."""
        return self._ids[self._num_prompt :]

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self._ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def step(self, new_token_ids: Sequence[int]) -> str:
        """Append tokens; return the newly printable text (possibly '')."""
        self._ids.extend(int(i) for i in new_token_ids)
        prefix = self._decode(self._prefix_offset, self._read_offset)
        full = self._decode(self._prefix_offset)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # nothing new, or an incomplete UTF-8 sequence: wait for more bytes
        delta = full[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._text += delta
        return delta

    def flush(self) -> str:
        """At end of generation, emit whatever was held back (may include U+FFFD)."""
        if self._read_offset == len(self._ids):
            return ""
        delta = self._decode(self._prefix_offset)[len(self._decode(self._prefix_offset, self._read_offset)) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._text += delta
        return delta
