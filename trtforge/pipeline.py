"""`trtforge run`: export, quantize, build and parity from one recipe, cached and resumable.

Output layout (stable; documented in docs/pipeline.md):

    OUT/export/fp32/               the export calibration and the CPU target read
    OUT/export/fp16/               the FP16 reference (parity compares against it)
    OUT/quantized/<recipe>/        the Q/DQ (or INT4 weight-only) ONNX
    OUT/engines/<target>/          a TensorRT engine, or the CPU target's ONNX Runtime artifact
    OUT/engines/trtllm/            the TensorRT-LLM checkpoint (target "trtllm"; export-checkpoint's format)
    OUT/reports/<recipe>[-<target>]/  parity reports (report.json / .html / .md)
    OUT/manifest.json              links them: keys, hashes, timings, versions, verdict
    OUT/.trtforge/                 stage records (cache keys) and the lock

A stage is skipped when its key (a hash of its upstream artifact, its options, its data files
and the trtforge version) matches the record of a completed earlier run and its folder still
has the recorded manifest; changing one option reruns only the stages that depend on it.
Every stage writes into a temporary folder renamed when complete, so an interrupted run
(Ctrl-C, a killed CI job) leaves no half-written artifact and the next run resumes after the
last completed stage. A lock refuses a second run into the same OUT at the same time.

Every target is built by its backend (trtforge.backend: BACKENDS): the pipeline resolves each
name, asks the backend for its options (from the recipe table it names), its refusals before any
work (``preflight``) and whether this machine can build it (``unavailable``), then calls the build
stage. Backends without a parity runner (the TensorRT-LLM checkpoint, verified when written) get
no parity report; their stage record carries the backend's one-line summary instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtforge._version import __version__
from trtforge.artifacts import hash_files, read_json, sha256_file, sha256_json, write_json
from trtforge.backend import Backend, BuildIntent, backend_for_target
from trtforge.calibration import quantize
from trtforge.engines import build
from trtforge.engines.targets import Target, resolve_target
from trtforge.errors import LockedError, OptionError, RecipeError, TargetError, TrtforgeError
from trtforge.exporter import DType, ExportOptions, export_onnx, inspect_source
from trtforge.manifest import MANIFEST, Manifest
from trtforge.parity import Thresholds, check_parity
from trtforge.pipeline_recipe import PipelineRecipe, load_pipeline_recipe
from trtforge.vocab import Precision, Task

log = logging.getLogger("trtforge.pipeline")
STATE = ".trtforge"


@dataclass
class StageResult:
    name: str
    path: Path
    status: str  # "done" | "cached" | "failed" | "skipped"
    key: str
    seconds: float = 0.0
    detail: str = ""
    manifest_sha256: str | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self, root: Path) -> dict:
        d = {"name": self.name, "status": self.status, "path": os.path.relpath(self.path, root), "key": self.key,
             "seconds": round(self.seconds, 3), "manifest_sha256": self.manifest_sha256}
        if self.detail:
            d["detail"] = self.detail
        d.update(self.extra)
        return d


@contextlib.contextmanager
def lock(out: Path) -> Iterator[None]:
    """Exclusive lock on OUT; a second run into the same folder refuses at once."""
    state = out / STATE
    state.mkdir(parents=True, exist_ok=True)
    path = state / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise LockedError(f"{out} is being written by another trtforge run (pid {other})",
                              "wait for it to finish, or write to another -o") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class Runner:
    def __init__(self, recipe: PipelineRecipe, out: Path, *, skip_unavailable_targets: bool = False) -> None:
        self.r = recipe
        self.out = out
        self.skip_unavailable = skip_unavailable_targets
        self.stages: list[StageResult] = []
        # (targets to build, targets skipped on request with the reason), decided by preflight
        self.planned: tuple[list[Target], list[tuple[Target, str]]] = ([], [])
        self.options: dict[str, Any] = {}  # backend name -> its options
        self.t0 = time.perf_counter()

    # ------------------------------------------------------------------ caching
    def _record_path(self, name: str) -> Path:
        return self.out / STATE / "stages" / (name.replace("/", "__") + ".json")

    def stage(self, name: str, folder: Path, key_parts: dict, fn: Callable[[Path], object],
              marker: str = MANIFEST) -> StageResult:
        """Run ``fn(folder)`` unless a completed run with the same key left ``folder/marker`` intact."""
        key = sha256_json({"stage": name, "trtforge": __version__, **key_parts})
        rec_path = self._record_path(name)
        if rec_path.exists() and (folder / marker).exists():
            rec = read_json(rec_path, "stage record")
            if rec.get("key") == key and rec.get("manifest_sha256") == sha256_file(folder / marker):
                res = StageResult(name, folder, "cached", key, manifest_sha256=rec["manifest_sha256"], extra=rec.get("extra", {}))
                log.info("stage %s: cached (%s)", name, os.path.relpath(folder, self.out), extra={"stage": name, "event": "cached"})
                self.stages.append(res)
                return res
        log.info("stage %s: running", name, extra={"stage": name, "event": "start"})
        t = time.perf_counter()
        extra = fn(folder) or {}
        res = StageResult(name, folder, "done", key, time.perf_counter() - t,
                          manifest_sha256=sha256_file(folder / marker), extra=extra if isinstance(extra, dict) else {})
        rec_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(rec_path, {"key": key, "manifest_sha256": res.manifest_sha256, "finished": time.time(), "extra": res.extra})
        log.info("stage %s: done in %.1fs", name, res.seconds, extra={"stage": name, "event": "done", "seconds": round(res.seconds, 2)})
        self.stages.append(res)
        return res

    def upstream_key(self, folder: Path) -> str:
        """What a downstream stage depends on: the upstream files' content, not its timestamps."""
        return sha256_json(Manifest.read(folder / MANIFEST).files)

    # ------------------------------------------------------------------ plan
    def preflight(self) -> None:
        """Every check that needs no work: targets and their options, the model folder, the data files."""
        r = self.r
        self.planned = self.plan_targets()
        src = inspect_source(r.model_dir, Task(r.task) if r.task else None)
        intent = BuildIntent(r.quant.precision, str(src.config.get("model_type")),
                             str((src.config.get("architectures") or [""])[0]), src.task, r.quant.to_dict(), src.config)
        for t in self.planned[0]:
            backend = backend_for_target(t)
            self._recipe_errors(backend, lambda b=backend, t=t: b.preflight(intent, t, self.options[b.name]))
        for p in [*r.calib_data, *r.parity_data, *([r.ranges] if r.ranges else [])]:
            if not Path(p).exists():
                raise TrtforgeError(f"data file {p} does not exist", "check calibration.data / parity.data in the recipe")

    def _recipe_errors(self, backend: Backend, fn: Callable[[], Any]) -> Any:
        """Run ``fn``; option errors name the recipe table and key that set the option."""
        table = backend.options_table
        try:
            return fn()
        except OptionError as exc:
            raise RecipeError(f"{self.r.source}: [{table}] {exc.problem}", exc.hint) from None
        except ValueError as exc:
            raise RecipeError(f"{self.r.source}: [{table}] {exc}", f"see docs/pipeline.md for the [{table}] keys") from None

    def _options(self, backend: Backend) -> Any:
        """The backend's options, parsed once from the recipe table it names ([build], [checkpoint])."""
        if backend.name not in self.options:
            table = {"build": self.r.build, "checkpoint": self.r.checkpoint}.get(backend.options_table, {})
            self.options[backend.name] = self._recipe_errors(backend, lambda: backend.parse_options(table))
        return self.options[backend.name]

    def plan_targets(self) -> tuple[list[Target], list[tuple[Target, str]]]:
        """Refuse impossible precision/target pairs, bad options and missing GPUs before any work."""
        precision = self.r.quant.precision
        resolved = [resolve_target(name) for name in self.r.targets]
        for t in resolved:  # every table parses before any target is judged
            self._options(backend_for_target(t))
        usable: list[Target] = []
        skipped: list[tuple[Target, str]] = []
        for t in resolved:
            backend = backend_for_target(t)
            backend.check_precision(t, precision)
            self._recipe_errors(backend, lambda b=backend, t=t: b.check_options(t, self.options[b.name]))
            why = backend.unavailable(t)
            if why is not None:
                if not self.skip_unavailable:
                    raise TargetError(f"target {t.name} cannot be built on this machine: {why}",
                                      "run on a GPU machine with pip install 'trtforge[gpu]', drop the target, "
                                      "or pass --skip-unavailable-targets to run the other stages")
                skipped.append((t, why))
                continue
            usable.append(t)
        return usable, skipped

    # ------------------------------------------------------------------ stages
    def run(self) -> dict:
        r, out = self.r, self.out
        targets, skipped = self.planned
        weights = sorted(p for pat in ("*.safetensors", "pytorch_model*.bin") for p in r.model_dir.glob(pat))
        source_key = {"weights": hash_files(weights), "config": sha256_file(r.model_dir / "config.json")}
        task = Task(r.task) if r.task else None

        def export_to(dtype: DType) -> Callable[[Path], None]:
            def fn(folder: Path) -> None:
                export_onnx(r.model_dir, folder, ExportOptions(task=task, dtype=dtype, opset=r.opset, validate=r.validate),
                            force=True)
            return fn

        export_key = {"source": source_key, "task": r.task, "opset": r.opset, "validate": r.validate}
        exp32 = out / "export" / "fp32"
        self.stage("export/fp32", exp32, export_key, export_to(DType.FP32))
        ref_dir = out / "export" / r.reference_dtype
        if r.reference_dtype == Precision.FP16:
            self.stage("export/fp16", ref_dir, export_key, export_to(DType.FP16))

        quant = r.quant
        if quant.dtype == "auto":
            # the unquantized rest in what the targets' backends want: FP16 for TensorRT engines and
            # TensorRT-LLM checkpoints, FP32 for CPUs (skipped targets count: the artifact is shared)
            every = [*targets, *(t for t, _ in skipped)]
            quant = quant.replace(dtype=Precision.FP16.value if any(
                backend_for_target(t).float_dtype == Precision.FP16 for t in every) else Precision.FP32.value)
        qdir = out / "quantized" / quant.name
        data_key = {"calib": {str(p): sha256_file(p) if p.is_file() else hash_files(x for x in p.rglob("*") if x.is_file())
                              for p in r.calib_data},
                    "ranges": sha256_file(r.ranges) if r.ranges else None}

        def quantize_to(folder: Path) -> None:
            quantize(exp32, quant, folder, calib=r.calib_data or None, ranges=r.ranges, force=True)

        self.stage(f"quantized/{quant.name}", qdir, {"upstream": self.upstream_key(exp32), "recipe": quant.to_dict(), **data_key},
                   quantize_to)

        built: list[tuple[str, Path]] = []
        for t in targets:
            backend = backend_for_target(t)
            opts = self.options[backend.name]
            edir = out / "engines" / t.name

            def build_to(folder: Path, t=t, opts=opts, backend=backend) -> dict:
                art = build(qdir, t, folder, opts, force=True)
                # no parity report for it: record what its own verification found
                return {} if backend.runs_parity else {"summary": backend.summary(art)}

            self.stage(f"engines/{t.name}", edir, {"upstream": self.upstream_key(qdir), "options": opts.to_json(), "target": t.name},
                       build_to)
            if backend.runs_parity:
                built.append((t.name, edir))
        for res in self.skipped_stages():
            self.stages.append(res)
            log.warning("stage %s: skipped (%s)", res.name, res.detail, extra={"stage": res.name, "event": "skipped"})

        candidates: list[tuple[str, Path]] = []
        if r.reports in ("all", "quantized"):
            candidates.append((quant.name, qdir))
        if r.reports in ("all", "builds"):
            candidates += [(f"{quant.name}-{n}", d) for n, d in built]
        for rep_name, cand in candidates:
            self._parity(rep_name, ref_dir, cand)
        return self.manifest()

    def _parity(self, name: str, ref: Path, cand: Path) -> None:
        r = self.r
        data_key = {str(p): sha256_file(p) for p in r.parity_data if p.is_file()}
        key = {"reference": self.upstream_key(ref), "candidate": self.upstream_key(cand), "data": data_key,
               "thresholds": r.thresholds, "per_layer": r.per_layer}

        thresholds = r.thresholds
        if isinstance(thresholds, dict):  # an inline [parity.thresholds] table: preset + limits
            limits = {k: float(v) for k, v in thresholds.items() if k != "preset" and v not in (None, False)}
            base = Thresholds.preset(thresholds["preset"]) if "preset" in thresholds else None
            thresholds = Thresholds(f"{base.name if base else 'recipe'}+recipe", {**(base.limits if base else {}), **limits}, "recipe")

        def run(folder: Path) -> dict:
            rep = check_parity(ref, cand, r.parity_data or None, thresholds, folder, per_layer=r.per_layer, force=True)
            return {"passed": rep.passed, "failures": [f.to_json() for f in rep.failures][:5]}

        res = self.stage(f"reports/{name}", self.out / "reports" / name, key, run, marker="report.json")
        if not res.extra.get("passed", False):
            log.warning("parity %s: FAILED (%s)", name, "; ".join(f.get("message", str(f)) for f in res.extra.get("failures", [])[:2]))

    # ------------------------------------------------------------------ manifest
    def skipped_stages(self) -> list[StageResult]:
        """One record per target skipped on request, with the reason (listed whether or not the run
        got as far as the builds)."""
        return [StageResult(f"engines/{t.name}", self.out / "engines" / t.name, "skipped", "", detail=why)
                for t, why in self.planned[1]]

    def manifest(self, error: str | None = None, interrupted: bool = False) -> dict:
        names = {s.name for s in self.stages}  # a run that stopped early still lists its skipped targets
        stages = self.stages + [s for s in self.skipped_stages() if s.name not in names]
        reports = [s for s in stages if s.name.startswith("reports/")]
        gate_ok = all(s.extra.get("passed", False) for s in reports)
        # A target skipped on request (--skip-unavailable-targets) is listed, not failed.
        stage_ok = all(s.status in ("done", "cached", "skipped") for s in stages)
        if interrupted:
            verdict = "interrupted"
        elif error:
            verdict = "failed"
        elif not stage_ok:
            verdict = "incomplete"
        else:
            verdict = "passed" if gate_ok else "failed"
        m = Manifest.new("run", "pipeline")
        for key, value in {
            "recipe": self.r.to_json(),
            "out": str(self.out),
            "stages": [s.to_json(self.out) for s in stages],
            "reports": {s.name.split("/", 1)[1]: {"passed": s.extra.get("passed"), "path": os.path.relpath(s.path, self.out),
                                                  "failures": s.extra.get("failures", [])} for s in reports},
            "verdict": verdict,
            "skipped": [{"stage": s.name, "target": s.name.split("/", 1)[1], "why": s.detail}
                        for s in stages if s.status == "skipped"],
            "exit_code": 0 if verdict == "passed" else 1,
            "error": error,
            "seconds": round(time.perf_counter() - self.t0, 2),
        }.items():
            m.set(key, value)
        artifacts = {}
        for s in stages:
            if s.status in ("done", "cached") and (s.path / MANIFEST).exists():
                sm = Manifest.read(s.path / MANIFEST)
                artifacts[s.name] = {"files": sm.files, "timings": sm.timings}
        if artifacts:
            m.set("artifacts", artifacts)
        out = m.to_json()
        del out["timings"], out["files"]  # the run manifest links artifacts; it is not one (same keys as ever)
        return out


def run(recipe: str | Path | dict | PipelineRecipe, out: str | Path | None = None, *, sets: list[str] | tuple[str, ...] = (),
        skip_unavailable_targets: bool = False) -> dict:
    """Run the whole build step; returns the top-level manifest (also written to OUT/manifest.json).

    Raises TrtforgeError for problems found before any work; a stage that fails later is
    recorded in the manifest (verdict "failed", the error) and re-raised.
    """
    r = recipe if isinstance(recipe, PipelineRecipe) else load_pipeline_recipe(recipe, sets)
    out_dir = Path(out or r.out or "trtforge-out").expanduser().resolve()
    runner = Runner(r, out_dir, skip_unavailable_targets=skip_unavailable_targets)
    runner.preflight()  # refusals happen before anything is written
    if out_dir.exists() and not out_dir.is_dir():
        raise TrtforgeError(f"output path {out_dir} is a file", "choose another -o")
    out_dir.mkdir(parents=True, exist_ok=True)
    with lock(out_dir):
        try:
            m = runner.run()
        except KeyboardInterrupt:
            write_json(out_dir / "manifest.json", runner.manifest(interrupted=True))
            raise
        except TrtforgeError as exc:
            write_json(out_dir / "manifest.json", runner.manifest(error=exc.one_line()))
            raise
        write_json(out_dir / "manifest.json", m)
        return m
