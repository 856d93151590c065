"""KV modes of the quality harness: a mode string -> EngineConfig overrides, checked before any model
loads, and the engine built for a mode. Shared by `eval ppl`, `eval passkey` and `eval needle`."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

KV_DTYPES = ("int8", "int4", "kivi2", "kivi4")
FULL_PRECISION_NAMES = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16", "f16")
KV_POLICIES = ("streaming", "h2o", "snapkv", "full")
AS_CONFIGURED = ("full", "auto")


class UnsupportedModeError(ValueError):
    """The mode names an engine option this build does not have."""


def _engine_fields() -> set[str]:
    from tokenmill.config import EngineConfig

    return {f.name for f in dataclasses.fields(EngineConfig)}


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def kv_mode_overrides(mode: str) -> dict[str, Any]:
    """EngineConfig keyword arguments of one mode (see the module docstring). ValueError if malformed."""
    text = mode.strip()
    if not text:
        raise ValueError("empty KV mode")
    if "+" in text:
        merged: dict[str, Any] = {}
        for part in text.split("+"):
            merged.update(kv_mode_overrides(part))
        return merged
    if text in AS_CONFIGURED:
        return {}
    if text in KV_DTYPES:
        return {"kv_cache_dtype": text}
    if text in FULL_PRECISION_NAMES:
        raise ValueError(
            f"KV mode {mode!r}: an unquantized cache stores the activations' dtype; name it `full` and set "
            "the dtype with --dtype (e.g. --dtype bfloat16), or compare dtypes as dtype=bfloat16"
        )
    if ":" in text:
        head = text.split(":", 1)[0].strip()
        if head in KV_POLICIES:
            return {"kv_policy": text}
        raise ValueError(f"unknown KV policy {head!r} in mode {mode!r}; policies: {', '.join(KV_POLICIES)}")
    if "=" in text:
        key, value = (s.strip() for s in text.split("=", 1))
        key = key.replace("-", "_")
        if not key.isidentifier() or not value:
            raise ValueError(f"bad mode {mode!r}: expected key=value, e.g. weights=q8")
        return {key: _parse_value(value)}
    hint = f" (a policy needs its parameters, e.g. {text}:...)" if text in KV_POLICIES else ""
    raise ValueError(
        f"unknown KV mode {mode!r}{hint}; expected full, one of {', '.join(KV_DTYPES)}, a policy such as "
        "streaming:sinks=4,window=256 or h2o:budget=256,recent=32, or an engine option as key=value "
        "(e.g. weights=q8)"
    )


def split_modes(spec: str | Iterable[str]) -> list[str]:
    """`full,streaming:sinks=4,window=256,weights=q8` -> ['full', 'streaming:sinks=4,window=256',
    'weights=q8']: a `k=v` piece continues the policy before it unless k is an EngineConfig option."""
    pieces = [spec] if isinstance(spec, str) else list(spec)
    fields = _engine_fields()
    modes: list[str] = []
    for chunk in pieces:
        for piece in (p.strip() for p in chunk.split(",")):
            if not piece:
                continue
            key = piece.split("=", 1)[0].strip().replace("-", "_")
            continues = ":" not in piece and "=" in piece and key not in fields
            if continues and modes and ":" in modes[-1].rsplit("+", 1)[-1]:
                modes[-1] += "," + piece
            else:
                modes.append(piece)
    if not modes:
        raise ValueError("no KV mode given")
    return modes


def mode_options(mode: str, engine_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The engine options of one mode, validated by EngineConfig (cheap: no model is loaded)."""
    from tokenmill.config import EngineConfig

    options = {**(engine_options or {}), **kv_mode_overrides(mode)}
    try:
        EngineConfig(**options)
    except TypeError as exc:
        raise UnsupportedModeError(f"KV mode {mode!r} is not supported by this build ({exc})") from None
    except ValueError as exc:
        raise ValueError(f"KV mode {mode!r}: {exc}") from None
    return options


def load_llm(mode: str, options: Mapping[str, Any], progress: bool = True):
    """An LLM built with `options` (from mode_options)."""
    from tokenmill.entrypoints.llm import LLM

    if progress:
        print(f"Loading model for mode {mode}...", file=sys.stderr, flush=True)
    try:
        return LLM(**options)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise UnsupportedModeError(f"KV mode {mode!r} is not supported by this build ({exc})") from None
        raise


def engine_summary(engine_options: Mapping[str, Any] | None) -> str:
    """The engine options that differ from the defaults, e.g. `weights=dense, kv_cache_dtype=int8`."""
    from tokenmill.engine_args import EngineArgs

    defaults = EngineArgs().config_kwargs()
    parts = [
        f"{k}={v}"
        for k, v in (engine_options or {}).items()
        if k not in ("cpu_isa", "threads") and (k not in defaults or defaults[k] != v)
    ]
    return ", ".join(parts) or "defaults"


def default_modes(engine_options: Mapping[str, Any] | None) -> list[str]:
    """Without --compare: one mode, the engine as configured; named `full` unless KV options are set."""
    options = engine_options or {}
    kv = [k for k in ("kv_cache_dtype", "kv_policy") if options.get(k) not in (None, "", "auto", "full")]
    return ["auto" if kv else "full"]


def write_json(path: str, task: str, settings: Mapping[str, Any], results: Sequence[Any]) -> None:
    with open(path, "w") as f:
        json.dump(
            {"task": task, "settings": dict(settings), "results": [dataclasses.asdict(r) for r in results]},
            f,
            indent=2,
        )
        f.write("\n")


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# ---- command line -------------------------------------------------------------------------------------------
