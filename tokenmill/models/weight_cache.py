"""On-disk cache of a GGUF model converted for execution: config, tokenizer and packed weights.

Parsing a GGUF's metadata (the 49k-entry vocabulary is read token by token) and repacking its tensors
takes seconds; reading this cache takes a fraction of one, which is what makes a 5 s cold start possible.

An entry lives in `<root>/<sha256 of the GGUF>-v<FORMAT_VERSION>/`: `manifest.json` and `weights.pt`.
It is keyed by the file's content hash, so an edited or replaced file never meets a stale entry, and by
the format version, bumped whenever the packed layout or the manifest changes. The manifest records the
weight file's own sha256, checked on every read: a truncated or corrupt entry is deleted and rebuilt,
never used. Entries are written to a temporary folder and renamed into place, so a crash mid-write
leaves no half entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenmill.formats import WeightFormat
from tokenmill.layers.quantization import PackedWeight
from tokenmill.models.gguf import GGUFModel
from tokenmill.models.model_config import ModelConfig
from tokenmill.models.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_MANIFEST = "manifest.json"
_WEIGHTS = "weights.pt"


@dataclass
class ConvertedModel:
    """What the model loader needs from a GGUF, with quantized weights packed for the kernels."""

    config: ModelConfig
    tokenizer: Tokenizer
    tensors: dict[str, torch.Tensor | PackedWeight]


class CacheError(Exception):
    """An entry exists but cannot be trusted (wrong version, wrong source, bad checksum, unreadable)."""


def default_cache_root() -> Path | None:
    """`$TOKENMILL_CACHE_DIR`, else `$XDG_CACHE_HOME/tokenmill`, else `~/.cache/tokenmill`; the value `off`
    turns caching off."""
    value = os.environ.get("TOKENMILL_CACHE_DIR")
    if value is not None:
        return None if value.lower() in ("", "off", "0", "none") else Path(value)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tokenmill"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def entry_path(root: Path, source_sha256: str) -> Path:
    return root / f"{source_sha256}-v{FORMAT_VERSION}"


def load_converted_gguf(path: Path, root: Path | None) -> ConvertedModel:
    """The GGUF at `path`, converted: from the cache under `root` when a valid entry exists, else converted
    from the file and (when `root` is given) stored for next time."""
    if root is None:
        return convert_gguf(path)
    digest = file_sha256(path)
    entry = entry_path(root, digest)
    if entry.exists():
        try:
            return read_entry(entry, digest)
        except CacheError as exc:
            logger.warning("weight cache entry %s is unusable (%s); rebuilding it", entry, exc)
            shutil.rmtree(entry, ignore_errors=True)
    model = convert_gguf(path)
    try:
        write_entry(entry, model, digest)
    except OSError as exc:  # a read-only or full disk costs the next start its speed, not this one
        logger.warning("could not write the weight cache to %s: %s", entry, exc)
    return model


def convert_gguf(path: Path) -> ConvertedModel:
    checkpoint = GGUFModel(path)
    config = checkpoint.model_config()
    tokenizer = Tokenizer.from_gguf_metadata(checkpoint.metadata)
    return ConvertedModel(config, tokenizer, dict(checkpoint.tensors(config, packed=True)))


def write_entry(entry: Path, model: ConvertedModel, source_sha256: str) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        kinds: dict[str, str] = {}
        tensors: dict[str, list[torch.Tensor]] = {}
        for name, t in model.tensors.items():
            kinds[name] = (t.format if isinstance(t, PackedWeight) else WeightFormat.DENSE).value
            tensors[name] = [x.contiguous() for x in t.tensors()] if isinstance(t, PackedWeight) else [t]
        torch.save(tensors, tmp / _WEIGHTS)
        manifest = {
            "format_version": FORMAT_VERSION,
            "source_sha256": source_sha256,
            "weights_sha256": file_sha256(tmp / _WEIGHTS),
            "config": dataclasses.asdict(model.config),
            "tokenizer": model.tokenizer.to_dict(),
            "tensors": kinds,
        }
        (tmp / _MANIFEST).write_text(json.dumps(manifest))
        try:
            tmp.rename(entry)
        except OSError:
            if not entry.exists():  # not a lost race with another process writing the same entry
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_entry(entry: Path, source_sha256: str) -> ConvertedModel:
    try:
        manifest = json.loads((entry / _MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CacheError(f"manifest unreadable: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError("format version mismatch")
    if manifest.get("source_sha256") != source_sha256:
        raise CacheError("entry was built from a different file")
    weights = entry / _WEIGHTS
    try:
        if file_sha256(weights) != manifest.get("weights_sha256"):
            raise CacheError("weights checksum mismatch")
        stored = torch.load(weights, mmap=True, weights_only=True)
        tensors: dict[str, torch.Tensor | PackedWeight] = {}
        for name, kind in manifest["tensors"].items():
            parts = stored[name]
            tensors[name] = parts[0] if kind == WeightFormat.DENSE else PackedWeight(kind, *parts)
        config = ModelConfig(**manifest["config"])
        tokenizer = Tokenizer.from_dict(manifest["tokenizer"])
    except CacheError:
        raise
    except Exception as exc:  # torch.load, a missing key, a bad tokenizer: all mean the entry is broken
        raise CacheError(f"{type(exc).__name__}: {exc}") from exc
    return ConvertedModel(config, tokenizer, tensors)
