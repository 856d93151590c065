"""Builds and loads tokenmill's small C++ CPU kernels (once; torch caches the build keyed by the source).

If no compiler is available the build fails and callers fall back to the pure-torch path.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)
_SOURCES = sorted(str(p) for p in (Path(__file__).parent / "csrc").glob("*.cpp"))


@functools.cache
def load_cpu_kernels() -> ModuleType | None:
    if os.environ.get("TOKENMILL_DISABLE_CPU_KERNELS") == "1":
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(
            name="tokenmill_cpu_kernels",
            sources=_SOURCES,
            # fast-math lets gcc vectorize exp (libmvec); finite-math stays off since -inf is used
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math", "-fno-finite-math-only"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, ...: the torch backend still works
        logger.warning("CPU attention kernel unavailable (%s); using the torch path", exc)
        return None
