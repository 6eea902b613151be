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
and the trtforge version) matches the record of a completed earlier run and its folder is still
the one recorded: the same manifest, and every file of the manifest's file table with the size and
modification time recorded (a file whose size or time differs is hashed; ``verify=True`` hashes
every file). A folder that differs is rebuilt, the log and the stage's ``detail`` say why, and
the stages after it rerun. Changing one option reruns only the stages that depend on it.

OUT is checked before any work: it must not be, lie inside or hold one of the run's inputs (the
model folder, data files and folders), it must be writable, and it must be new, empty or an
earlier run's output whose stage folders hold only what trtforge wrote; a folder of the user's
own files is refused, never overwritten.
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtforge._version import __version__
from trtforge.artifacts import hash_files, os_error, read_json, sha256_file, sha256_json, write_json
from trtforge.backend import Backend, BuildIntent, TargetLike, backend_for_target
from trtforge.calibration import QuantRecipe, quantize
from trtforge.calibration.budget_spec import check_applies, parse_budget
from trtforge.engines import build
from trtforge.engines.targets import Target, resolve_target
from trtforge.errors import LockedError, OptionError, RecipeError, TargetError, TrtforgeError
from trtforge.exporter import DType, ExportOptions, export_onnx, inspect_source
from trtforge.manifest import MANIFEST, Manifest
from trtforge.ort import calibration_device
from trtforge.parity import ParityOptions, Thresholds, check_parity, load_prompts
from trtforge.pipeline_out import REPORT, STATE, changed_on_disk, check_out, needs_refresh, with_file_checks
from trtforge.pipeline_recipe import PipelineRecipe, load_pipeline_recipe
from trtforge.vocab import Precision, Task

log = logging.getLogger("trtforge.pipeline")


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


PARITY_SIZES = ("num_samples", "max_len", "batch_sizes", "max_new_tokens")


def parity_sizes(table: dict) -> dict:
    """The [parity] keys that size the parity data, as ParityOptions fields (unset keys keep its defaults)."""
    out = {k: table[k] for k in PARITY_SIZES if k in table}
    if "batch_sizes" in out:
        out["batch_sizes"] = tuple(out["batch_sizes"])
    return out


@contextlib.contextmanager
def lock(out: Path) -> Iterator[None]:
    """Exclusive lock on OUT; a second run into the same folder refuses at once."""
    state = out / STATE
    path = state / "lock"
    try:
        state.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise os_error(exc, f"creating the lock {path}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise LockedError(f"{out} is being written by another trtforge run (pid {other})",
                              "wait for it to finish, or write to another -o") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as exc:
            raise os_error(exc, f"writing the lock {path}") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def quant_for_targets(quant: QuantRecipe, targets: Sequence[TargetLike]) -> QuantRecipe:
    """The recipe's "auto" keys resolved for the backends that build ``targets``:
    dtype: the unquantized rest in FP16 where a backend wants it (TensorRT engines, TensorRT-LLM
    checkpoints), FP32 otherwise (CPUs); budget_granularity: the budget switches q/k/v and gate/up
    together ("group") where a backend fuses them (TensorRT-LLM), each GEMM alone otherwise."""
    backends = [backend_for_target(t) for t in targets]
    if quant.dtype == "auto":
        quant = quant.replace(dtype=Precision.FP16.value if any(
            b.float_dtype == Precision.FP16 for b in backends) else Precision.FP32.value)
    if quant.budget_granularity == "auto":  # getattr: a backend written before fuses_gemms existed
        quant = quant.replace(budget_granularity="group" if any(
            getattr(b, "fuses_gemms", False) for b in backends) else "gemm")
    return quant


class Runner:
    def __init__(self, recipe: PipelineRecipe, out: Path, *, skip_unavailable_targets: bool = False,
                 verify: bool = False) -> None:
        self.r = recipe
        self.out = out
        self.skip_unavailable = skip_unavailable_targets
        self.verify = verify  # hash every file of a cached stage, not only those whose size or time changed
        self.rebuilt: set[str] = set()  # stages rerun because their folder was not the one recorded
        self.stages: list[StageResult] = []
        # (targets to build, targets skipped on request with the reason), decided by preflight
        self.planned: tuple[list[Target], list[tuple[Target, str]]] = ([], [])
        self.options: dict[str, Any] = {}  # backend name -> its options
        self.t0 = time.perf_counter()

    # ------------------------------------------------------------------ caching
    def _record_path(self, name: str) -> Path:
        return self.out / STATE / "stages" / (name.replace("/", "__") + ".json")

    def _record(self, name: str) -> dict | None:
        """The stage's record of an earlier run; a damaged one counts as none (the stage reruns)."""
        path = self._record_path(name)
        if not path.is_file():
            return None
        try:
            rec = read_json(path, "stage record")
        except TrtforgeError as exc:
            log.warning("ignoring the stage record %s: %s", path, exc.problem)
            return None
        return rec if isinstance(rec, dict) else None

    def stage(self, name: str, folder: Path, key_parts: dict, fn: Callable[[Path], object],
              marker: str = MANIFEST, after: tuple[str, ...] = ()) -> StageResult:
        """Run ``fn(folder)`` unless a completed run with the same key left ``folder`` as it recorded it.

        ``after``: the stages this one reads; when one of them was rebuilt because its folder had
        changed, this one reruns too (what it was made from can no longer be vouched for).
        """
        key = sha256_json({"stage": name, "trtforge": __version__, **key_parts})
        rec = self._record(name)
        why = None
        if rec is not None and rec.get("key") == key:
            why = self._changed(name, folder, marker, rec, after)
            if why is None:
                res = StageResult(name, folder, "cached", key, manifest_sha256=rec["manifest_sha256"], extra=rec.get("extra", {}))
                log.info("stage %s: cached (%s)", name, os.path.relpath(folder, self.out), extra={"stage": name, "event": "cached"})
                self.stages.append(res)
                return res
            self.rebuilt.add(name)
            log.warning("stage %s: rebuilding, its folder is not the one recorded: %s", name, why,
                        extra={"stage": name, "event": "rebuild"})
        else:
            log.info("stage %s: running", name, extra={"stage": name, "event": "start"})
        t = time.perf_counter()
        extra = fn(folder) or {}
        res = StageResult(name, folder, "done", key, time.perf_counter() - t, detail=f"rebuilt: {why}" if why else "",
                          manifest_sha256=sha256_file(folder / marker), extra=extra if isinstance(extra, dict) else {})
        self._write_record(name, folder, marker, {"key": key, "manifest_sha256": res.manifest_sha256,
                                                  "finished": time.time(), "extra": res.extra})
        log.info("stage %s: done in %.1fs", name, res.seconds, extra={"stage": name, "event": "done", "seconds": round(res.seconds, 2)})
        self.stages.append(res)
        return res

    def _write_record(self, name: str, folder: Path, marker: str, rec: dict) -> None:
        path = self._record_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, with_file_checks(folder, marker, rec))

    def _changed(self, name: str, folder: Path, marker: str, rec: dict, after: tuple[str, ...]) -> str | None:
        """Why ``folder`` is not the artifact the record describes (None: it is; a cache hit)."""
        rel = os.path.relpath(folder, self.out)
        why = changed_on_disk(folder, marker, rec, rel=rel, deep=self.verify, before_files=True)
        if why is None:
            upstream = [a for a in after if a in self.rebuilt]
            why = f"{upstream[0]}, which it was made from, was rebuilt" if upstream else None
        if why is None:
            why = changed_on_disk(folder, marker, rec, rel=rel, deep=self.verify)
        if why is None and needs_refresh(folder, marker, rec):
            # the same content with new times (copied, touched): refresh the fast check
            self._write_record(name, folder, marker, {k: v for k, v in rec.items() if k not in ("stats", "files")})
        return why

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
        if r.quant.budget:  # [quantize] budget: a metric this model can be measured by, and data to hold out
            try:
                check_applies(parse_budget(r.quant.budget), src.task)
            except OptionError as exc:
                raise RecipeError(f"{r.source}: [quantize] {exc.problem}", exc.hint) from None
            if r.ranges:
                raise RecipeError(f"{r.source}: [quantize] budget is measured on held-out calibration samples, and "
                                  "[calibration] ranges brings none", "set [calibration] data instead of ranges")
        try:  # [quantize] calib_device = cuda where ONNX Runtime has no CUDA provider: before any work
            calibration_device(r.quant.calib_device)
        except OptionError as exc:
            raise RecipeError(f"{r.source}: [quantize] {exc.problem}", exc.hint) from None
        for p in [*r.calib_data, *r.parity_data, *([r.ranges] if r.ranges else [])]:
            if not Path(p).exists():
                raise TrtforgeError(f"data file {p} does not exist", "check calibration.data / parity.data in the recipe")
        if r.raw.get("parity", {}).get("prompts"):  # every line of [parity] prompts checked before any work
            load_prompts(r.raw["parity"]["prompts"])
        try:  # [parity] num_samples / max_len / batch_sizes / max_new_tokens: usable before any work
            ParityOptions(**parity_sizes(r.raw.get("parity", {})))
        except OptionError as exc:
            raise RecipeError(f"{r.source}: [parity] {exc.problem}", exc.hint) from None

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

    # ------------------------------------------------------------------ the output folder
    def folders(self) -> list[tuple[str, Path, str]]:
        """(stage, folder, marker file) of every stage the plan writes, in order."""
        r, out = self.r, self.out
        qname = r.quant.name
        folders = [("export/fp32", out / "export" / "fp32", MANIFEST)]
        if r.reference_dtype == Precision.FP16:
            folders.append(("export/fp16", out / "export" / "fp16", MANIFEST))
        folders.append((f"quantized/{qname}", out / "quantized" / qname, MANIFEST))
        reports = [qname] if r.reports in ("all", "quantized") else []
        for t in self.planned[0]:
            folders.append((f"engines/{t.name}", out / "engines" / t.name, MANIFEST))
            if backend_for_target(t).runs_parity and r.reports in ("all", "builds"):
                reports.append(f"{qname}-{t.name}")
        return folders + [(f"reports/{n}", out / "reports" / n, REPORT) for n in reports]

    def inputs(self) -> list[tuple[str, Path]]:
        """What the run reads from outside OUT: (what, path)."""
        r = self.r
        found: list[tuple[str, Path]] = [("model folder", r.model_dir)]
        found += [("calibration data", Path(p)) for p in r.calib_data]
        found += [("parity data", Path(p)) for p in r.parity_data]
        if r.ranges:
            found.append(("ranges file", Path(r.ranges)))
        if isinstance(r.thresholds, str) and Path(r.thresholds).is_file():
            found.append(("thresholds file", Path(r.thresholds)))
        for key in ("reference", "text"):
            if r.checkpoint.get(key):
                found.append((f"checkpoint.{key}", Path(r.checkpoint[key])))
        return found

    def check_out(self) -> None:
        """Every check of OUT that needs no work (trtforge.pipeline_out.check_out)."""
        check_out(self.out, self.inputs(), self.folders(), self._record)

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

        # skipped targets count: the artifact is shared
        quant = quant_for_targets(r.quant, [*targets, *(t for t, _ in skipped)])
        qdir = out / "quantized" / quant.name
        data_key = {"calib": {str(p): sha256_file(p) if p.is_file() else hash_files(x for x in p.rglob("*") if x.is_file())
                              for p in r.calib_data},
                    "ranges": sha256_file(r.ranges) if r.ranges else None}

        def quantize_to(folder: Path) -> None:
            quantize(exp32, quant, folder, calib=r.calib_data or None, ranges=r.ranges, force=True)

        qname = f"quantized/{quant.name}"
        # calib_device is where calibration runs, not what it computes (the same ranges within the
        # tolerance of docs/quantization.md, "GPU calibration"): switching it reuses the artifact
        recipe_key = {k: v for k, v in quant.to_dict().items() if k != "calib_device"}
        self.stage(qname, qdir, {"upstream": self.upstream_key(exp32), "recipe": recipe_key, **data_key},
                   quantize_to, after=("export/fp32",))

        built: list[tuple[str, Path, str]] = []
        for t in targets:
            backend = backend_for_target(t)
            opts = self.options[backend.name]
            edir = out / "engines" / t.name

            def build_to(folder: Path, t=t, opts=opts, backend=backend) -> dict:
                art = build(qdir, t, folder, opts, force=True)
                # no parity report for it: record what its own verification found
                return {} if backend.runs_parity else {"summary": backend.summary(art)}

            self.stage(f"engines/{t.name}", edir, {"upstream": self.upstream_key(qdir), "options": opts.to_json(), "target": t.name},
                       build_to, after=(qname,))
            if backend.runs_parity:
                built.append((t.name, edir, f"engines/{t.name}"))
        for res in self.skipped_stages():
            self.stages.append(res)
            log.warning("stage %s: skipped (%s)", res.name, res.detail, extra={"stage": res.name, "event": "skipped"})

        candidates: list[tuple[str, Path, str]] = []
        if r.reports in ("all", "quantized"):
            candidates.append((quant.name, qdir, qname))
        if r.reports in ("all", "builds"):
            candidates += [(f"{quant.name}-{n}", d, stage) for n, d, stage in built]
        for rep_name, cand, cand_stage in candidates:
            self._parity(rep_name, ref_dir, cand, after=(f"export/{r.reference_dtype}", cand_stage))
        return self.manifest()

    def _parity(self, name: str, ref: Path, cand: Path, after: tuple[str, ...] = ()) -> None:
        r = self.r
        data_key = {str(p): sha256_file(p) for p in r.parity_data if p.is_file()}
        prompts = r.raw.get("parity", {}).get("prompts")  # a path, resolved against the recipe's folder
        key = {"reference": self.upstream_key(ref), "candidate": self.upstream_key(cand), "data": data_key,
               "thresholds": r.thresholds, "per_layer": r.per_layer,
               **({"prompts": sha256_file(prompts)} if prompts and Path(prompts).is_file() else {})}
        save_outputs = bool(r.raw.get("parity", {}).get("save_outputs", False))  # full outputs.json: on request
        if save_outputs:
            key["save_outputs"] = True
        sizes = parity_sizes(r.raw.get("parity", {}))
        if sizes:
            key["sizes"] = sizes

        thresholds = r.thresholds
        if isinstance(thresholds, dict) and "tasks" not in thresholds:  # inline [parity.thresholds]: preset + limits
            # (with a [parity.thresholds.tasks] subtable the table goes to the parity stage whole: its
            # loader reads per-category overrides the way it reads a thresholds file)
            limits = {k: float(v) for k, v in thresholds.items() if k != "preset" and v not in (None, False)}
            base = Thresholds.preset(thresholds["preset"]) if "preset" in thresholds else None
            thresholds = Thresholds(f"{base.name if base else 'recipe'}+recipe", {**(base.limits if base else {}), **limits}, "recipe")

        def run(folder: Path) -> dict:
            rep = check_parity(ref, cand, r.parity_data or None, thresholds, folder, per_layer=r.per_layer, force=True,
                               prompts=prompts, options=ParityOptions(save_outputs=save_outputs, **sizes))
            return {"passed": rep.passed, "failures": [f.to_json() for f in rep.failures][:5]}

        res = self.stage(f"reports/{name}", self.out / "reports" / name, key, run, marker=REPORT, after=after)
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
        skip_unavailable_targets: bool = False, verify: bool = False) -> dict:
    """Run the whole build step; returns the top-level manifest (also written to OUT/manifest.json).

    ``verify``: hash every file of every cached stage (default: only files whose size or
    modification time differs from the record). Raises TrtforgeError for problems found before
    any work (nothing is written then); a stage that fails later is recorded in the manifest
    (verdict "failed", the error) and re-raised.
    """
    r = recipe if isinstance(recipe, PipelineRecipe) else load_pipeline_recipe(recipe, sets)
    out_dir = Path(out or r.out or "trtforge-out").expanduser().resolve()
    runner = Runner(r, out_dir, skip_unavailable_targets=skip_unavailable_targets, verify=verify)
    runner.preflight()  # refusals happen before anything is written
    runner.check_out()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, f"creating {out_dir}") from None
    with lock(out_dir):
        try:
            m = runner.run()
        except KeyboardInterrupt:
            _write_after_failure(out_dir, runner.manifest(interrupted=True))
            raise
        except TrtforgeError as exc:
            _write_after_failure(out_dir, runner.manifest(error=exc.one_line()))
            raise
        except OSError as exc:  # a stage record or the lock's folder: a full or read-only disk
            err = os_error(exc, f"writing {out_dir}")
            _write_after_failure(out_dir, runner.manifest(error=err.one_line()))
            raise err from exc
        try:
            write_json(out_dir / MANIFEST, m)
        except OSError as exc:
            raise os_error(exc, f"writing {out_dir / MANIFEST}") from exc
        return m


def _write_after_failure(out_dir: Path, manifest: dict) -> None:
    """Record how the run ended; on a full or read-only disk that may fail too, and then the
    error that stopped the run is the one to report (this one is logged)."""
    try:
        write_json(out_dir / MANIFEST, manifest)
    except OSError as exc:
        log.warning("could not write %s: %s", out_dir / MANIFEST, exc.strerror or exc)
