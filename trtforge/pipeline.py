"""`trtforge run`: export, quantize, build and parity from one recipe, cached and resumable.

Output layout (stable; documented in docs/pipeline.md):

    OUT/export/fp32/               the export calibration and the CPU target read
    OUT/export/fp16/               the FP16 reference (parity compares against it)
    OUT/quantized/<recipe>/        the Q/DQ (or INT4 weight-only) ONNX
    OUT/engines/<target>/          a TensorRT engine, or the CPU target's ONNX Runtime artifact
    OUT/reports/<recipe>[-<target>]/  parity reports (report.json / .html / .md)
    OUT/manifest.json              links them: keys, hashes, timings, versions, verdict
    OUT/.trtforge/                 stage records (cache keys) and the lock

A stage is skipped when its key (a hash of its upstream artifact, its options, its data files
and the trtforge version) matches the record of a completed earlier run and its folder still
has the recorded manifest; changing one option reruns only the stages that depend on it.
Every stage writes into a temporary folder renamed when complete, so an interrupted run
(Ctrl-C, a killed CI job) leaves no half-written artifact and the next run resumes after the
last completed stage. A lock refuses a second run into the same OUT at the same time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from trtforge._version import __version__
from trtforge.artifacts import (
    base_manifest,
    hash_files,
    load_artifact,
    read_json,
    sha256_file,
    sha256_json,
    write_json,
)
from trtforge.errors import LockedError, TargetError, TrtforgeError
from trtforge.pipeline_recipe import PipelineRecipe, load_pipeline_recipe

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
    import fcntl

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
        self.planned: tuple[list, list[tuple[str, str]]] = ([], [])
        self.build_options = None
        self.t0 = time.perf_counter()

    # ------------------------------------------------------------------ caching
    def _record_path(self, name: str) -> Path:
        return self.out / STATE / "stages" / (name.replace("/", "__") + ".json")

    def stage(self, name: str, folder: Path, key_parts: dict, fn: Callable[[Path], object],
              marker: str = "manifest.json") -> StageResult:
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
        return sha256_json(read_json(folder / "manifest.json", "manifest").get("files", {}))

    # ------------------------------------------------------------------ plan
    def preflight(self) -> None:
        """Every check that needs no work: targets, the model folder, the data files."""
        from trtforge.exporter import Task
        from trtforge.exporter.export import inspect_source

        r = self.r
        self.build_options = self._build_options()
        self.planned = self.plan_targets()
        inspect_source(r.model_dir, Task(r.task) if r.task else None)
        for p in [*r.calib_data, *r.parity_data, *([r.ranges] if r.ranges else [])]:
            if not Path(p).exists():
                raise TrtforgeError(f"data file {p} does not exist", "check calibration.data / parity.data in the recipe")

    def _build_options(self):
        from trtforge.engines import BuildOptions, DimOverride, HardwareCompatibility, Layout
        from trtforge.errors import RecipeError

        b = self.r.build
        try:
            opts = BuildOptions(
                profile=tuple(DimOverride.parse(p) for p in (b.get("profile") or [])),
                optimization_level=b.get("optimization_level", 3), workspace_mib=b.get("workspace_mib"),
                layout=Layout(b.get("layout", "plain")),
                hardware_compatibility=HardwareCompatibility(b.get("hardware_compatibility", "none")),
                version_compatible=b.get("version_compatible", False),
            )
        except ValueError as exc:
            raise RecipeError(f"{self.r.source}: [build] {exc}", "see docs/pipeline.md for the build keys") from None
        for p in opts.profile:  # the rest is checked against the model when the build stage runs
            if not p.range.min <= p.range.opt <= p.range.max:
                raise RecipeError(f"{self.r.source}: [build] profile {p} is not ordered min <= opt <= max",
                                  "write SYMBOL=MIN:OPT:MAX, e.g. batch=1:8:32")
        return opts

    def plan_targets(self) -> tuple[list, list[tuple[str, str]]]:
        """Refuse impossible precision/target pairs and missing GPUs before any work."""
        from trtforge.engines.targets import check_supported, resolve_target
        from trtforge.env import gpus, tensorrt_status

        precision = self.r.quant.precision.value
        usable, skipped = [], []
        trt_ok = None
        found = None
        for name in self.r.targets:
            t = resolve_target(name)
            check_supported(t, precision)
            if self.build_options is not None:
                self.build_options.check(t)
            if not t.is_cpu:
                if trt_ok is None:
                    trt_ok, found = tensorrt_status()["available"], gpus()
                if not (trt_ok and found):
                    why = "TensorRT is not importable" if not trt_ok else "no NVIDIA GPU was found"
                    if not self.skip_unavailable:
                        raise TargetError(f"target {t.name} cannot be built on this machine: {why}",
                                          "run on a GPU machine with pip install 'trtforge[gpu]', drop the target, "
                                          "or pass --skip-unavailable-targets to run the other stages")
                    skipped.append((t.name, why))
                    continue
            usable.append(t)
        return usable, skipped

    # ------------------------------------------------------------------ stages
    def run(self) -> dict:
        from trtforge.calibration import quantize
        from trtforge.engines import build
        from trtforge.exporter import DType, ExportOptions, Task, export_onnx

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
        if r.reference_dtype == "fp16":
            self.stage("export/fp16", ref_dir, export_key, export_to(DType.FP16))

        quant = r.quant
        if quant.dtype == "auto":  # TensorRT engines want the unquantized rest in FP16; CPUs run FP32 faster
            quant = quant.replace(dtype="fp16" if any(not t.is_cpu for t in targets) or skipped else "fp32")
        qdir = out / "quantized" / quant.name
        data_key = {"calib": {str(p): sha256_file(p) if p.is_file() else hash_files(x for x in p.rglob("*") if x.is_file())
                              for p in r.calib_data},
                    "ranges": sha256_file(r.ranges) if r.ranges else None}

        def quantize_to(folder: Path) -> None:
            quantize(exp32, quant, folder, calib=r.calib_data or None, ranges=r.ranges, force=True)

        self.stage(f"quantized/{quant.name}", qdir, {"upstream": self.upstream_key(exp32), "recipe": quant.to_dict(), **data_key},
                   quantize_to)

        opts = self.build_options
        built: list[tuple[str, Path]] = []
        for t in targets:
            edir = out / "engines" / t.name

            def build_to(folder: Path, t=t) -> None:
                build(qdir, t, folder, opts, force=True)

            self.stage(f"engines/{t.name}", edir, {"upstream": self.upstream_key(qdir), "options": opts.to_json(), "target": t.name},
                       build_to)
            built.append((t.name, edir))
        for name, why in skipped:
            self.stages.append(StageResult(f"engines/{name}", out / "engines" / name, "skipped", "", detail=why))
            log.warning("stage engines/%s: skipped (%s)", name, why, extra={"stage": f"engines/{name}", "event": "skipped"})

        candidates: list[tuple[str, Path]] = []
        if r.reports in ("all", "quantized"):
            candidates.append((quant.name, qdir))
        if r.reports in ("all", "builds"):
            candidates += [(f"{quant.name}-{n}", d) for n, d in built]
        for rep_name, cand in candidates:
            self._parity(rep_name, ref_dir, cand)
        return self.manifest()

    def _parity(self, name: str, ref: Path, cand: Path) -> None:
        from trtforge.parity import check_parity

        r = self.r
        data_key = {str(p): sha256_file(p) for p in r.parity_data if p.is_file()}
        key = {"reference": self.upstream_key(ref), "candidate": self.upstream_key(cand), "data": data_key,
               "thresholds": r.thresholds, "per_layer": r.per_layer}

        thresholds = r.thresholds
        if isinstance(thresholds, dict):  # an inline [parity.thresholds] table: preset + limits
            from trtforge.parity.options import Thresholds

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
    def manifest(self, error: str | None = None, interrupted: bool = False) -> dict:
        reports = [s for s in self.stages if s.name.startswith("reports/")]
        gate_ok = all(s.extra.get("passed", False) for s in reports)
        # A target skipped on request (--skip-unavailable-targets) is listed, not failed.
        stage_ok = all(s.status in ("done", "cached", "skipped") for s in self.stages)
        if interrupted:
            verdict = "interrupted"
        elif error:
            verdict = "failed"
        elif not stage_ok:
            verdict = "incomplete"
        else:
            verdict = "passed" if gate_ok else "failed"
        m = base_manifest("run", "pipeline")
        m.update({
            "recipe": self.r.to_json(),
            "out": str(self.out),
            "stages": [s.to_json(self.out) for s in self.stages],
            "reports": {s.name.split("/", 1)[1]: {"passed": s.extra.get("passed"), "path": os.path.relpath(s.path, self.out),
                                                  "failures": s.extra.get("failures", [])} for s in reports},
            "verdict": verdict,
            "skipped": [{"stage": s.name, "why": s.detail} for s in self.stages if s.status == "skipped"],
            "exit_code": 0 if verdict == "passed" else 1,
            "error": error,
            "seconds": round(time.perf_counter() - self.t0, 2),
        })
        for s in self.stages:
            if s.status in ("done", "cached") and (s.path / "manifest.json").exists():
                sm = load_artifact(s.path).manifest
                m.setdefault("artifacts", {})[s.name] = {"files": sm.get("files", {}), "timings": sm.get("timings", {})}
        return m


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
