"""Builds and loads tokenmill's small C++ CPU kernels, once per instruction-set level.

Levels, each a separate build (`tokenmill_cpu_kernels_<level>`) with fixed compiler flags, never
`-march=native`, so a build cached on one CPU is never loaded on a CPU without those instructions:

  portable  the x86-64 baseline (scalar code paths; also any non-x86 CPU)
  avx2      -mavx2 -mfma -mf16c
  avx512    avx2 + AVX-512 F/BW/VL/DQ/VNNI/BF16

"auto" picks the highest level this CPU runs (`detect_isa`). A level the CPU lacks is refused with an
error; a failed build (no compiler, no ninja, ...) logs a warning and returns None, and callers fall back
to the pure-torch path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from collections.abc import Collection
from pathlib import Path
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)
_SOURCES = sorted(str(p) for p in (Path(__file__).parent / "csrc").glob("*.cpp"))

ISA_LEVELS = ("portable", "avx2", "avx512")  # lowest first
BUILD_NAME_PREFIX = "tokenmill_cpu_kernels"
# compiler flags of each level, and the /proc/cpuinfo flags a CPU needs to run it
_AVX2_CFLAGS = ("-mavx2", "-mfma", "-mf16c")
_AVX512_CFLAGS = (
    "-mprefer-vector-width=256",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512dq",
    "-mavx512vnni",
    "-mavx512bf16",
)
_ISA_CFLAGS = {"portable": (), "avx2": _AVX2_CFLAGS, "avx512": _AVX2_CFLAGS + _AVX512_CFLAGS}
_AVX2_CPU = ("avx2", "fma", "f16c")
_AVX512_CPU = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16")
_ISA_CPU_FLAGS = {"portable": (), "avx2": _AVX2_CPU, "avx512": _AVX2_CPU + _AVX512_CPU}
# shown by `tokenmill env`
FLAGS_OF_INTEREST = (*_AVX2_CPU, *_AVX512_CPU, "amx_tile", "amx_int8", "amx_bf16")
# fast-math lets gcc vectorize exp (libmvec); finite-math stays off since -inf is used
_COMMON_CFLAGS = ("-O3", "-fopenmp", "-ffast-math", "-fno-finite-math-only")


class UnsupportedISAError(ValueError):
    """A kernel level was asked for that this CPU cannot run."""


def build_name(isa: str) -> str:
    return f"{BUILD_NAME_PREFIX}_{isa}"


def build_directory(isa: str) -> Path:
    """Where a level's build lives: torch's extensions folder, one subfolder per level *and checkout*. torch
    keys builds by name alone, so two checkouts (a git worktree, CI's clone) sharing one folder would rebuild
    the kernels (minutes) each time the other one loaded them."""
    base = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    checkout = hashlib.sha1(str(Path(_SOURCES[0]).parent).encode()).hexdigest()[:10]
    return base / f"{build_name(isa)}-{checkout}"


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str] | None, str]:
    """(model name, flags, vendor) of the first CPU in /proc/cpuinfo; flags None where it cannot be read."""
    model, flags, vendor = platform.processor() or platform.machine(), None, "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "vendor_id":
                    vendor = value.strip()
                elif key == "flags":
                    flags = frozenset(value.split())
                if key == "" and flags is not None:  # end of the first CPU's entry
                    break
    except OSError:
        pass
    return model, flags, vendor


def cpu_model() -> str:
    return _cpuinfo()[0]


def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD", ...), "unknown" where it is not there."""
    return _cpuinfo()[2]


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags as /proc/cpuinfo names them, or None where they cannot be read."""
    return _cpuinfo()[1]


def torch_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def pick_isa(capability: str, flags: Collection[str] | None = None) -> str:
    """The kernel level for what the CPU reports: torch's capability ("DEFAULT", "AVX2", "AVX512", ...;
    `torch.backends.cpu.get_cpu_capability()`) and its /proc/cpuinfo flags.

    A level needs both: the capability (it also honours ATEN_CPU_CAPABILITY, a user's cap) and every flag
    the level compiles for (torch's AVX512 does not imply VNNI/BF16: such CPUs get avx2). With flags None
    (not readable) torch's word is taken up to avx2, whose flags torch checks itself. Anything else, e.g. an
    unknown capability string, is portable.
    """
    cap = capability.strip().upper().replace(" ", "_")
    if cap.startswith("AVX512"):
        wanted = ["avx512", "avx2"]
    elif cap == "AVX2":
        wanted = ["avx2"]
    else:
        return "portable"
    for level in wanted:
        if flags is None:
            if level == "avx2":
                return level
        elif all(f in flags for f in _ISA_CPU_FLAGS[level]):
            return level
    return "portable"


def detect_isa() -> str:
    """The highest kernel level this CPU runs (what "auto" means)."""
    if not _is_x86():
        return "portable"
    return pick_isa(torch_capability(), cpu_flags())


def supported_isas() -> tuple[str, ...]:
    """Levels this CPU can run: every level up to the detected one, plus any whose flags it reports
    (asking for one above torch's capability, e.g. under ATEN_CPU_CAPABILITY, is allowed)."""
    flags = cpu_flags() if _is_x86() else frozenset()
    top = ISA_LEVELS.index(detect_isa())
    return tuple(
        level
        for i, level in enumerate(ISA_LEVELS)
        if i <= top or (flags is not None and all(f in flags for f in _ISA_CPU_FLAGS[level]))
    )


def resolve_isa(isa: str = "auto") -> str:
    """Check a requested level and turn "auto" into the detected one."""
    if isa == "auto":
        return detect_isa()
    if isa not in ISA_LEVELS:
        raise ValueError(f"cpu isa must be one of auto, {', '.join(ISA_LEVELS)}; got {isa!r}")
    if isa not in supported_isas():
        flags = cpu_flags() or frozenset()
        missing = [f for f in _ISA_CPU_FLAGS[isa] if f not in flags]
        raise UnsupportedISAError(
            f"this CPU ({cpu_model()}) cannot run the {isa} kernels"
            + (f" (missing: {', '.join(missing)})" if missing else "")
            + f"; it supports: {', '.join(supported_isas())}"
        )
    return isa


@functools.cache
def _build(isa: str) -> tuple[ModuleType | None, str | None]:
    """(module, None) or (None, why the build failed) for a resolved level."""
    try:
        from torch.utils.cpp_extension import load

        folder = build_directory(isa)
        folder.mkdir(parents=True, exist_ok=True)
        module = load(
            name=build_name(isa),
            sources=_SOURCES,
            build_directory=str(folder),
            extra_cflags=[*_COMMON_CFLAGS, *_ISA_CFLAGS[isa]],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, ...: the torch backend still works
        logger.warning("CPU kernels (%s) unavailable (%s); using the torch path", isa, exc)
        return None, f"{type(exc).__name__}: {exc}"
    built = module.cpu_isa()
    if built != isa:  # the compiler did not define the level's macros: run nothing of it
        logger.warning("CPU kernels built for %s report %s; using the torch path", isa, built)
        return None, f"built for {isa}, the module reports {built}"
    return module, None


@functools.cache
def load_cpu_kernels(isa: str = "auto") -> ModuleType | None:
    """The C++ kernels built for `isa` ("auto", "portable", "avx2", "avx512"), or None if they cannot be
    built here. Raises ValueError for an unknown level, UnsupportedISAError (a ValueError) for one the CPU
    lacks."""
    return _build(resolve_isa(isa))[0]


def kernel_info(isa: str = "auto", load: bool = True) -> dict[str, Any]:
    """What `tokenmill env` reports about the CPU and the kernels; `load` builds them if needed."""
    flags = cpu_flags()
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_flags": None if flags is None else [f for f in FLAGS_OF_INTEREST if f in flags],
        "torch_capability": torch_capability(),
        "detected_isa": detect_isa(),
        "supported_isas": list(supported_isas()),
        "requested_isa": isa,
    }
    try:
        level = resolve_isa(isa)
    except ValueError as exc:
        return {**info, "isa": None, "build_name": None, "kernels_loaded": False, "error": str(exc)}
    info.update(isa=level, build_name=build_name(level), kernels_loaded=None, error=None)
    if load:
        module, error = _build(level)
        info.update(kernels_loaded=module is not None, error=error)
    return info
