"""The engines one model can use: read from an engine folder, checked, loaded on first use.

`EngineSet` answers one question per call: which engine serves this static shape at the model's
current precision and device, or why none does. The answer follows the model: after `.to(dtype)`
or a move to another device, calls go to the entries built for that precision and device.

What is checked, and when:
- at open: the manifest (format, every entry's fields; a malformed entry is refused alone), the
  pin (`trusted`), which expert these weights are (by fingerprint), the parity gate (an entry built
  with `--allow-mismatch` is refused unless `allow_mismatch=True`), and that each entry lists every
  file its backend reads;
- which weights an entry can run: every entry runs the weights it was built from; an entry that
  takes its weights from the caller (`Entry.front_weights`: AOTInductor, inductor, ONNX Runtime
  entries, refittable TensorRT ones) also runs other weights of the same structure and layout (a
  fine-tune of the same model, merged LoRAs), checked by `weights_layout` before it loads. Baked
  entries (calibrated FP8/NVFP4 plans, older ONNX exports) serve their own weights only;
- before an entry is first used on a device (at open for the model's own): the backend's library,
  the tool versions and the device, then every file's size and sha256, hashed in full once per
  process (`runtime.integrity`); code is then loaded from the very bytes checked;
- `full_check=True`: every entry's files are re-hashed at open, whatever its precision or device,
  so a damaged folder is reported before the first call.
Every refusal is logged with the file and the check that failed and kept for `last_route`; with
`strict=True` it raises. An entry that fails to load is refused and never retried in this process.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from .backends import BACKENDS, Engine, backend
from .integrity import HASHED, HashStats
from .manifest import Entry, EngineError, Manifest, ManifestError, capability_of, check_files, read_manifest, tool_versions
from .static import StaticShape, StaticWanTransformer, weights_layout

log = logging.getLogger("wan_build.runtime")


def same_structure(built: Mapping, config: Mapping) -> bool:
    """Whether a manifest's expert config and a model's describe one structure (names aside)."""
    def plain(c: Mapping) -> dict:
        return {k: v for k, v in c.items() if not k.startswith("_") and k != "name"}
    return bool(built) and plain(built) == plain(config)


def _device_key(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


class EngineSet:
    def __init__(self, folder: Path, expert: str, entries: Sequence[Entry] = (), *, strict: bool = False,
                 order: Sequence[str] = BACKENDS, allow_mismatch: bool = False, full_check: bool = False,
                 engine_options: Mapping[str, Mapping] | None = None, max_loaded: int | None = None):
        self.folder = Path(folder)
        self.expert = expert
        self.strict = strict
        self.order = list(order)
        self.allow_mismatch = allow_mismatch
        self.full_check = full_check
        self.engine_options = dict(engine_options or {})
        self.max_loaded = max_loaded  # engines kept loaded at once (each TensorRT or ONNX Runtime one holds weights)
        self.by_shape: dict[StaticShape, list[Entry]] = {}  # whole-forward entries
        self.stages_by_shape: dict[StaticShape, list[Entry]] = {}  # stage entries (runtime.stages)
        for entry in sorted(entries, key=lambda e: self.order.index(e.backend)):
            (self.by_shape if entry.stage is None else self.stages_by_shape).setdefault(entry.shape, []).append(entry)
        self.refusals: dict[tuple[str, str | None], tuple[Entry, str]] = {}  # (id, device or None) -> why
        self.folder_problem: str | None = None
        self.malformed: dict[str, str] = {}  # manifest records refused at open: key -> reason
        self.load_attempts: Counter[tuple[str, str]] = Counter()
        self.verification = HashStats()  # what the checks of this set have hashed so far
        self._checked: set[tuple[str, str]] = set()
        self._loaded: dict[tuple[str, str], Engine] = {}
        self._warned: set[str] = set()
        self.own_weights = True  # False when opened for weights no expert of the folder was built from

    # -- opening ----------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | Path, *, fingerprint: str, precision: str | None, device: torch.device,
             strict: bool = False, backends: Sequence[str] | None = None, full_check: bool = False,
             trusted: str | None = None, allow_mismatch: bool = False,
             engine_options: Mapping[str, Mapping] | None = None, max_loaded: int | None = None,
             config: Mapping | None = None) -> "EngineSet":
        """Read `folder`'s manifest and keep this expert's entries (the one whose weights fingerprint
        matches) of the backends asked for, checking what can be checked now. Weights no expert was
        built from (a fine-tune): with `config` (the model's diffusers config), the entries of the
        experts of that structure that take their weights from the caller serve them."""
        folder = Path(folder)
        order = list(backends or BACKENDS)
        unknown = [b for b in order if b not in BACKENDS]
        if unknown:
            raise EngineError(f"backends {unknown} are not known; choose from {', '.join(BACKENDS)}")
        before = HASHED.snapshot()
        unknown = sorted(set(engine_options or {}) - set(BACKENDS))
        if unknown:
            raise EngineError(f"engine_options for {unknown}: not backends; choose from {', '.join(BACKENDS)}")
        if max_loaded is not None and max_loaded < 1:
            raise EngineError(f"max_loaded_engines={max_loaded} must be >= 1 (or None for no limit)")
        options = dict(strict=strict, order=order, allow_mismatch=allow_mismatch, full_check=full_check,
                       engine_options=engine_options, max_loaded=max_loaded)
        try:
            manifest = read_manifest(folder, trusted)
        except ManifestError as e:
            if strict:
                raise
            engines = cls(folder, "?", **options)
            engines.folder_problem = str(e)
            log.error("engine folder %s refused: %s; every call falls back to eager", folder, e)
            return engines
        for key, reason in manifest.bad_entries.items():
            message = f"entry {key[:40]} in {folder} refused: {reason}"
            log.warning("%s", message)
            if strict:
                raise ManifestError(message)
        malformed = dict(manifest.bad_entries)
        if "entries" in manifest.bad_entries:  # no entry can be read at all
            engines = cls(folder, "?", **options)
            engines.folder_problem = f"{folder}/manifest.json: {manifest.bad_entries['entries']}"
            return engines
        expert = next((n for n, e in manifest.experts.items() if e.fingerprint == fingerprint), None)
        if expert is None:  # entries that take the caller's weights serve these; the others refuse
            built = ", ".join(f"{n} {e.fingerprint[:12]}" for n, e in manifest.experts.items()) or "none"
            same = [n for n, e in manifest.experts.items() if config is not None and same_structure(e.config, config)]
            candidates = [e for e in manifest.entries.values() if e.backend in order]
            engines = cls(folder, same[0] if same else "?", candidates, **options)
            engines.own_weights = False
            engines.malformed = malformed
            for entry in candidates:
                if entry.expert not in same:
                    engines._refuse(entry, None, f"built for another model (experts {built}; these weights "
                                                 f"{fingerprint[:12]} are of another structure)" if config is not None
                                    else f"built from other weights (experts {built}; these weights {fingerprint[:12]})")
                elif not entry.front_weights:
                    engines._refuse(entry, None, f"holds the weights it was built from (expert {entry.expert} "
                                                 f"{manifest.experts[entry.expert].fingerprint[:12]}; these weights "
                                                 f"{fingerprint[:12]}); rebuild it for these weights")
            engines._static_checks(manifest, None)
            return engines._check_at_open(candidates if full_check else (), precision, device, before)
        mine = [e for e in manifest.entries.values() if e.expert == expert and e.backend in order]
        engines = cls(folder, expert, mine, **options)
        engines.malformed = malformed
        engines._static_checks(manifest, fingerprint)
        return engines._check_at_open(manifest.entries.values() if full_check else (), precision, device, before)

    def _check_at_open(self, rehash, precision: str | None, device: torch.device, before) -> "EngineSet":
        """Re-hash the entries `rehash` (full_check), then check the entries of this precision for
        `device`; records what the checks hashed."""
        for entry in rehash:
            problem = check_files(entry, self.folder, backend(entry.backend).required_files(entry), fresh=True)
            if problem:
                self._refuse(entry, None, problem)
        for entry in self.entries():
            if entry.precision == precision and (entry.id, None) not in self.refusals:
                self._usable(entry, device)
        self.verification = HASHED.since(before)
        if self.verification.files:
            log.info("checked the engines of %s for %s: %s", self.folder, self.expert, self.verification.describe())
        return self

    def _static_checks(self, manifest: Manifest, fingerprint: str | None) -> None:
        """`fingerprint` None: weights of no expert here (only front-weight entries can serve them)."""
        for entry in self.entries():
            b = backend(entry.backend)
            if (entry.id, None) in self.refusals:
                continue
            if fingerprint is not None and entry.weights_fingerprint != fingerprint:
                self._refuse(entry, None, f"built from other weights (fingerprint {entry.weights_fingerprint[:12]}, "
                                          f"these weights {fingerprint[:12]})")
            elif entry.allow_mismatch or not entry.parity.passed:
                if not self.allow_mismatch:
                    self._refuse(entry, None, f"failed its parity check at build ({entry.parity.describe()}); "
                                              "kept by --allow-mismatch; pass allow_mismatch=True to serve it anyway")
            elif any(n not in entry.files for n in b.required_files(entry)):
                missing = [n for n in b.required_files(entry) if n not in entry.files]
                self._refuse(entry, None, f"the manifest lists no {', '.join(missing)} for it (incomplete record)")

    def entries(self) -> list[Entry]:
        """Every entry of this set: whole-forward ones, then stages."""
        return [e for group in (self.by_shape, self.stages_by_shape) for es in group.values() for e in es]

    # -- checks per device --------------------------------------------------------------------------
    def _refuse(self, entry: Entry, device: str | None, reason: str) -> None:
        self.refusals[(entry.id, device)] = (entry, reason)
        where = f" on {device}" if device else ""
        message = f"engine {entry.describe()} in {self.folder} refused{where}: {reason}"
        log.warning("%s; calls of its shape fall back", message)
        if self.strict:
            raise EngineError(message)

    def _refusal(self, entry: Entry, device: str) -> str | None:
        for key in ((entry.id, None), (entry.id, device)):
            if key in self.refusals:
                return self.refusals[key][1]
        return None

    def _usable(self, entry: Entry, device: torch.device) -> bool:
        """Library, versions, device, files: checked once per (entry, device), refused with the reason."""
        key = _device_key(device)
        if self._refusal(entry, key) is not None:
            return False
        if (entry.id, key) in self._checked:
            return True
        b = backend(entry.backend)
        before = HASHED.snapshot()
        problem = b.missing_library() or b.compatibility(entry, torch.device(device), capability_of(device),
                                                         tool_versions()) \
            or check_files(entry, self.folder, b.required_files(entry))
        spent = HASHED.since(before)
        self.verification = HashStats(self.verification.files + spent.files, self.verification.bytes + spent.bytes,
                                      self.verification.seconds + spent.seconds)
        if problem:
            self._refuse(entry, key, problem)
            return False
        self._checked.add((entry.id, key))
        return True

    @property
    def refused_shapes(self) -> dict[StaticShape, list[str]]:
        """shape -> "id (backend): reason" of every refusal so far."""
        out: dict[StaticShape, list[str]] = {}
        for entry, reason in self.refusals.values():
            out.setdefault(entry.shape, []).append(f"{entry.id} ({entry.backend}): {reason}")
        return out

    def update_weights(self, weights: Mapping[str, torch.Tensor]) -> int:
        """The model's weights changed (LoRAs merged or removed; same layout): loaded engines that
        take the model's weights are handed the new tensors in place where their backend can
        (AOTInductor, inductor, refittable TensorRT); every other loaded engine is released and
        reloads on its next use. Returns how many were updated in place."""
        updated = 0
        for key, engine in list(self._loaded.items()):
            if engine.entry.front_weights and engine.update_weights(weights):
                updated += 1
            else:
                self._loaded.pop(key).release()
        return updated

    def release(self) -> None:
        """Drop loaded engines (their device memory too); they reload on next use."""
        for engine in self._loaded.values():
            engine.release()
        self._loaded.clear()

    # -- routing ------------------------------------------------------------------------------------
    def route(self, shape: StaticShape, precision: str | None, device: torch.device,
              model: Callable[[], StaticWanTransformer], changed: str = "",
              parts: bool = False) -> tuple[Engine | None, Entry | None, str]:
        """(engine, entry, reason) for `shape` at `precision` on `device`; engine is None when the call
        must fall back. `model()` gives the eager static model of `shape` (its tensors feed engines).
        `changed`: what makes the model's weights differ from the checkpoint's ("LoRAs a x1"), so
        that entries holding the checkpoint's weights do not serve. `parts`: the call runs the model's
        parts apart (step caching), so only backends that serve parts may take it."""
        engine, entry, reason = self._route(shape, precision, device, model, changed, parts)
        if engine is None and self.malformed:
            key, why = next(iter(self.malformed.items()))
            more = f" and {len(self.malformed) - 1} more" if len(self.malformed) > 1 else ""
            reason += f"; malformed manifest records were refused: {key[:40]}: {why}{more}"
        return engine, entry, reason

    def _route(self, shape: StaticShape, precision: str | None, device: torch.device,
               model: Callable[[], StaticWanTransformer], changed: str,
               parts: bool) -> tuple[Engine | None, Entry | None, str]:
        if self.folder_problem:
            return None, None, f"engine folder refused: {self.folder_problem}"
        key = _device_key(device)
        candidates = self.by_shape.get(shape, [])
        mine = [e for e in candidates if e.precision == precision]
        if not mine:
            if candidates:
                there = ", ".join(sorted({e.precision for e in candidates}))
                return None, None, f"engines for this shape are {there}, this model runs {precision or 'unsupported dtype'}"
            return None, None, f"no engine built for this shape ({len(self.by_shape)} usable shapes in {self.folder})"
        other = changed or ("" if self.own_weights else "weights of another checkpoint")
        skipped = []
        for entry in mine:
            if parts and not backend(entry.backend).serves_parts:
                skipped.append(f"{entry.id} ({entry.backend}): runs whole forwards only, not the parts a cached "
                               "step needs (an inductor entry, or the stage entries of `cache_stages: true`, serve them)")
                continue
            engine, why = self._engine(entry, key, device, model, other)
            if engine is None:
                if why:
                    skipped.append(why)
                continue
            if entry.allow_mismatch or not entry.parity.passed:
                return engine, entry, (f"engine {entry.id} ({entry.backend}, {entry.precision}) built for this shape, "
                                       f"SERVED DESPITE FAILED PARITY ({entry.parity.describe()})")
            served = f"engine {entry.id} ({entry.backend}, {entry.precision}) built for this shape"
            return engine, entry, served + (f", on the model's weights ({other})" if other else "")
        reasons = skipped + [f"{e.id} ({e.backend}): {self._refusal(e, key)}" for e in mine if self._refusal(e, key)]
        return None, None, "engine for this shape refused: " + "; ".join(reasons)

    def _engine(self, entry: Entry, key: str, device: torch.device, model: Callable[[], torch.nn.Module],
                other: str, keep: frozenset = frozenset()) -> tuple[Engine | None, str | None]:
        """`entry`'s engine on `device`, loaded (once) and checked; else None and why it was skipped (None
        when it is refused: the refusal is recorded). `other`: why the model's weights are not the
        checkpoint's, if they are not."""
        if other and not entry.front_weights:
            return None, (f"{entry.id} ({entry.backend}): holds the weights it was built from, and {other} "
                          "differ")
        engine = self._loaded.get((entry.id, key))
        if engine is not None:
            self._loaded[(entry.id, key)] = self._loaded.pop((entry.id, key))  # most recently used last
            return engine, None
        if not self._usable(entry, device):
            return None, None
        if entry.front_weights:
            layout = weights_layout(model().weights())
            if layout != entry.options["weights_layout"]:
                return None, (f"{entry.id} ({entry.backend}): built for another weights layout (tensor "
                              "shapes or dtypes differ: another precision policy or FP8 scaling)")
        self.load_attempts[(entry.id, key)] += 1
        try:
            engine = backend(entry.backend).load(entry, self.folder, torch.device(device), model(),
                                                 self.engine_options.get(entry.backend))
        except Exception as e:  # a library's own error: report it, fall back, never retry
            first = (str(e).strip().splitlines() or [""])[0][:200]
            self._refuse(entry, key, f"failed to load ({type(e).__name__}: {first})")
            return None, None
        self._loaded[(entry.id, key)] = engine
        while self.max_loaded is not None and self._units() > self.max_loaded:
            old_key = next((k for k in self._loaded if k != (entry.id, key) and k[0] not in keep), None)
            if old_key is None:
                break
            log.info("releasing engine %s on %s: more than max_loaded_engines=%d loaded", old_key[0],
                     old_key[1], self.max_loaded)
            self._loaded.pop(old_key).release()
        if (entry.allow_mismatch or not entry.parity.passed) and entry.id not in self._warned:
            log.warning("serving engine %s although it failed its parity check at build (%s)",
                        entry.describe(), entry.parity.describe())
            self._warned.add(entry.id)
        return engine, None

    def _units(self) -> int:
        """Loaded engines as `max_loaded` counts them: the stage engines of one shape, backend and
        precision count as one (a cached call needs them all)."""
        whole = sum(1 for engine in self._loaded.values() if engine.entry.stage is None)
        sets = {(e.entry.shape, e.entry.backend, e.entry.precision, k[1]) for k, e in self._loaded.items()
                if e.entry.stage is not None}
        return whole + len(sets)

    def route_stages(self, shape: StaticShape, precision: str | None, device: torch.device,
                     stage_model: Callable[[str], torch.nn.Module], stages: Sequence[str],
                     changed: str = "") -> tuple[dict[str, Engine] | None, str, str]:
        """Stage engines (`runtime.stages`) of one backend for every stage in `stages` at `shape`,
        `precision` and `device`: ({stage: engine}, backend, reason), or (None, "", why none).
        `stage_model(stage)` gives the eager stage model (its tensors feed the engines)."""
        if self.folder_problem:
            return None, "", f"engine folder refused: {self.folder_problem}"
        mine = [e for e in self.stages_by_shape.get(shape, []) if e.precision == precision]
        if not mine:
            return None, "", "no stage engines built for this shape at this precision (profile key cache_stages)"
        key = _device_key(device)
        other = changed or ("" if self.own_weights else "weights of another checkpoint")
        problems = []
        for name in dict.fromkeys(e.backend for e in mine):  # in the order of preference
            found = {e.stage: e for e in mine if e.backend == name}
            missing = [s for s in stages if s not in found]
            if missing:
                problems.append(f"{name}: no {', '.join(missing)} stage entries")
                continue
            engines: dict[str, Engine] = {}
            keep = frozenset(found[s].id for s in stages)  # loading one stage never releases another
            for stage in stages:
                entry = found[stage]
                engine, why = self._engine(entry, key, device, lambda: stage_model(stage), other, keep)
                if engine is None:
                    problems.append(why or f"{entry.id} ({name}, {stage} stage): {self._refusal(entry, key)}")
                    break
                engines[stage] = engine
            else:
                flagged = [found[s] for s in stages if found[s].allow_mismatch or not found[s].parity.passed]
                reason = (f"stage engines {', '.join(found[s].id for s in stages)} ({name}, {precision}) built for "
                          "this shape" + (f", on the model's weights ({other})" if other else ""))
                if flagged:
                    reason += f", SERVED DESPITE FAILED PARITY ({flagged[0].parity.describe()})"
                return engines, name, reason
        return None, "", "stage engines for this shape refused: " + "; ".join(problems)
