"""Regenerate the TensorRT Python name lists the tests check this project's TensorRT code against.

The `tensorrt-cu12-bindings` / `tensorrt-cu13-bindings` wheels on PyPI hold the compiled Python
module (`tensorrt_bindings/tensorrt.so`). It cannot be imported without TensorRT's libraries, but
every name it registers with pybind11 (classes, methods, properties, enum members) is a string in
the file. This keeps the identifier-like strings, one per line.

    python tests/data/tensorrt/extract_names.py 10.16.1.11 11.4.0.106
"""

import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def names_in(so: bytes) -> list[str]:
    """Identifiers in the printable runs of the file (like strings(1)). Names also appear inside
    docstrings and signatures, so every identifier-like token of a run counts; and the linker merges
    a string into the tail of a longer one ("INPUT" is stored as the end of "CONDITIONAL_INPUT"), so
    the parts of a token after each '_' count too."""
    found = set()
    for chunk in re.split(rb"[^\x20-\x7e]+", so):
        for m in re.findall(rb"(?<![A-Za-z0-9_])[A-Za-z_][A-Za-z0-9_]{2,63}(?![A-Za-z0-9_])", chunk):
            token = m.decode()
            found.add(token)
            parts = token.split("_")
            found.update("_".join(parts[i:]) for i in range(1, len(parts)) if len("_".join(parts[i:])) >= 3)
    return sorted(found)


def main(versions: list[str]) -> None:
    for version in versions:
        package = "tensorrt-cu13-bindings" if version.startswith("11.") else "tensorrt-cu12-bindings"
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "--python-version", "3.12", "--implementation", "cp",
                            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                            "-d", tmp, f"{package}=={version}"], check=True)
            wheel = next(Path(tmp).glob("*.whl"))
            with zipfile.ZipFile(wheel) as z:
                so = z.read(next(n for n in z.namelist() if n.endswith("tensorrt.so")))
        out = HERE / f"names-{version}.txt"
        out.write_text("\n".join(names_in(so)) + "\n")
        print(f"{out}: {len(names_in(so))} names from {wheel.name}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["10.16.1.11", "11.4.0.106"])
