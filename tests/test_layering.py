"""`runtime` is what deployments import: it must not need builder, onnx or build-only libraries."""

from __future__ import annotations

import subprocess
import sys

BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"onnx", "onnxscript", "onnxruntime", "builder", "modelopt", "tensorrt", "yaml", "typer",
                                  "diffusers", "transformers"}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
"""


def test_runtime_imports_without_build_only_packages():
    code = BLOCKER + ("import runtime, runtime.static, runtime.dynamic, runtime.weights, runtime.engines, "
                      "runtime.manifest, runtime.experts, runtime.backends, runtime.backends.aoti, runtime.integrity, "
                      "runtime.backends.onnxruntime, runtime.backends.tensorrt, runtime.precision\n"
                      "assert len(runtime.backends.registry()) == 4\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_blocker_really_blocks():
    r = subprocess.run([sys.executable, "-c", BLOCKER + "import builder"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "blocked: builder" in r.stderr


def test_runtime_sources_never_import_builder():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "runtime"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "import builder" not in text and "from builder" not in text, path
