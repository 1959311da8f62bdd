"""The engines one model can use: read from an engine folder, checked, loaded on first use.

`EngineSet` answers one question per call: which engine serves this static shape, or why none
does. Every refusal (other weights, other versions, a changed file, a load failure) is logged
with the file and the check that failed, kept in `refused`, and with `strict=True` raised.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from .backends import BACKENDS, Engine, load_engine, missing_library
from .manifest import Entry, EngineError, check_entry, read_manifest, tool_versions
from .static import StaticShape

log = logging.getLogger("wan_build.runtime")


@dataclass
class EngineSet:
    folder: Path
    expert: str
    precision: str
    strict: bool = False
    by_shape: dict[StaticShape, list[Entry]] = field(default_factory=dict)
    refused_shapes: dict[StaticShape, list[str]] = field(default_factory=dict)
    other_precisions: dict[StaticShape, list[str]] = field(default_factory=dict)
    _loaded: dict[str, Engine] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: str | Path, *, fingerprint: str, precision: str, device: torch.device,
             strict: bool = False, backends: Sequence[str] | None = None, full_check: bool = False) -> "EngineSet":
        """Read `folder`'s manifest and keep the entries these weights, this precision and this
        machine can use. The expert is the one whose weights fingerprint matches."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        experts = manifest.get("experts", {})
        expert = next((name for name, e in experts.items() if e.get("fingerprint") == fingerprint), None)
        order = list(backends or BACKENDS)
        unknown = [b for b in order if b not in BACKENDS]
        if unknown:
            raise EngineError(f"backends {unknown} are not known; choose from {', '.join(BACKENDS)}")
        engines = cls(folder, expert or "?", precision, strict)
        versions = tool_versions()
        entries = [Entry.from_json(e) for e in manifest.get("entries", {}).values()]
        if expert is None:
            built = ", ".join(f"{n} {e.get('fingerprint', '')[:12]}" for n, e in experts.items())
            for entry in entries:
                engines.refuse(entry, f"built from other weights (experts {built}; these weights {fingerprint[:12]})")
            return engines
        for entry in entries:
            if entry.expert != expert or entry.backend not in order:
                continue  # the other expert's engines, or a backend the caller did not ask for
            if entry.precision != precision:
                engines.other_precisions.setdefault(entry.shape, []).append(entry.precision)
                continue
            reason = missing_library(entry.backend) or check_entry(
                entry, folder, fingerprint=fingerprint, device=device, versions=versions, full=full_check)
            if reason:
                engines.refuse(entry, reason)
                continue
            engines.by_shape.setdefault(entry.shape, []).append(entry)
        for candidates in engines.by_shape.values():
            candidates.sort(key=lambda e: order.index(e.backend))
        return engines

    def refuse(self, entry: Entry, reason: str) -> None:
        message = f"engine {entry.describe()} in {self.folder} refused: {reason}"
        self.refused_shapes.setdefault(entry.shape, []).append(f"{entry.id} ({entry.backend}): {reason}")
        log.warning("%s; calls of its shape fall back", message)
        if self.strict:
            raise EngineError(message)

    def release(self) -> None:
        """Drop loaded engines (their device memory too); they reload on next use."""
        for engine in self._loaded.values():
            if hasattr(engine, "release"):
                engine.release()
        self._loaded.clear()

    def route(self, shape: StaticShape, device: torch.device,
              constants: Callable[[], Mapping[str, torch.Tensor]]) -> tuple[Engine | None, Entry | None, str]:
        """(engine, entry, reason) for `shape`; engine is None when the call must fall back."""
        for entry in list(self.by_shape.get(shape, [])):
            engine = self._loaded.get(entry.id)
            if engine is None:
                try:
                    engine = load_engine(entry, self.folder, device, constants())
                except Exception as e:  # a library's own error: report it and fall back
                    self.by_shape[shape].remove(entry)
                    self.refuse(entry, f"failed to load ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
                    continue
                self._loaded[entry.id] = engine
            return engine, entry, f"engine {entry.id} ({entry.backend}, {entry.precision}) built for this shape"
        if shape in self.refused_shapes:
            return None, None, "engine for this shape refused: " + "; ".join(self.refused_shapes[shape])
        if shape in self.other_precisions:
            return None, None, (f"engines for this shape are {', '.join(sorted(set(self.other_precisions[shape])))}, "
                                f"this model runs {self.precision}")
        return None, None, f"no engine built for this shape ({len(self.by_shape)} usable shapes in {self.folder})"
