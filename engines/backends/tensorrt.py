"""Backend ``tensorrt``: ``sm_XX`` targets (aliases ``hopper``, ``ada``... and ``auto``), a TensorRT engine.

In:  an export or quantize OnnxArtifact, :class:`BuildOptions`, an output folder, a machine with
     TensorRT and the target GPU (everything else is checked before looking for them).
Out: an EngineArtifact: ``model.plan`` (or ``<name>/1/model.plan`` with layout triton),
     ``layers.json`` (engine inspector), ``manifest.json`` (``kind: engine``: TensorRT version,
     GPU, the plan, per-layer precision summary, latency, timing cache, hashes). Only
     ``engines/_trt.py`` imports TensorRT.

Parity: Polygraphy's ``TrtRunner`` over the plan, where TensorRT and a GPU exist.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx

from trtforge import env
from trtforge.artifacts import Artifact, EngineArtifact, copy_side_files, load_artifact, sha256_file
from trtforge.backend import BuildIntent
from trtforge.engines.build import (
    ENGINE_FILE,
    LAYERS_FILE,
    open_source,
    place,
    plan_build,
    start_manifest,
)
from trtforge.engines.check import Check, LoadReport, Machine, check_engine
from trtforge.engines.feeds import opt_sizes, synthetic_feeds
from trtforge.engines.inspector import quantized_kernel_warning, summarize
from trtforge.engines.perf import Latency, compare_with_reference
from trtforge.engines.plan import BuildOptions, BuildPlan, HardwareCompatibility
from trtforge.engines.precision import tensorrt_qdq_problems
from trtforge.engines.targets import (
    ALIASES,
    TARGETS,
    TENSORRT,
    Target,
    refuse_unsupported,
    resolve_gpu_target,
    tensorrt_precisions,
)
from trtforge.engines.timing_cache import default_cache_path, load_timing_cache, save_timing_cache
from trtforge.errors import MissingDependencyError, OptionError, ParityError, TargetError
from trtforge.registry import BACKENDS
from trtforge.stage import StageOutput

log = logging.getLogger(__name__)


def tensorrt_adapter():
    """engines/_trt.py, the one module that imports tensorrt: loaded on first use, so that
    everything before it (every refusal) runs without TensorRT."""
    return importlib.import_module("trtforge.engines._trt")


def _refuse_tensorrt_qdq(model: onnx.ModelProto) -> None:
    problems = tensorrt_qdq_problems(model)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise TargetError(f"TensorRT cannot build this graph: {problems[0]}{more}",
                          "re-quantize with a TensorRT recipe (symmetric, signed), or use --target cpu")


def _check_build_gpu(target: Target, gpu, hw: HardwareCompatibility) -> None:
    if gpu.sm == target.sm:
        return
    if hw == HardwareCompatibility.AMPERE_PLUS and gpu.sm >= 80:
        return  # an Ampere+ hardware-compatible engine built on any Ampere+ GPU runs on the target
    raise TargetError(
        f"TensorRT builds for the GPU it runs on: this machine has {gpu.name} (sm_{gpu.sm}), the target is {target.name}",
        "build on a machine with the target GPU, use --target auto, or --hardware-compatibility ampere-plus for sm_80+")


class TensorRTBackend:
    name = TENSORRT
    kind = "engine"
    stage = "build"
    command = "build"
    options_table = "build"
    float_dtype = "fp16"  # TensorRT engines want the unquantized rest in FP16
    runs_parity = True
    fuses_gemms = False  # a strongly typed network runs each GEMM in the precision its Q/DQ give it

    # ------------------------------------------------------------------ targets
    def resolve(self, name: str, gpus: Any = None) -> Target | None:
        return resolve_gpu_target(name, gpus)

    def target_names(self) -> list[str]:
        return sorted(n for n, t in TARGETS.items() if t.backend == TENSORRT) + sorted(ALIASES) + ["auto"]

    def owns(self, artifact: Artifact) -> bool:
        return artifact.manifest.kind == self.kind

    def precisions(self, target: Target) -> list[str]:
        return tensorrt_precisions(target)

    def check_precision(self, target: Target, precision: str) -> None:
        refuse_unsupported(target, precision)

    def unavailable(self, target: Target) -> str | None:
        if not env.tensorrt_status()["available"]:
            return "TensorRT is not importable"
        if not env.gpus():
            return "no NVIDIA GPU was found"
        return None

    def host_mismatch(self, target: Target, plan: BuildPlan | None) -> str | None:
        """Why this machine's GPU cannot build for ``target`` (TensorRT builds for the GPU it runs on)."""
        found = env.gpus()
        if not found:
            return "no NVIDIA GPU was found"
        hw = plan.options.hardware_compatibility if plan is not None else HardwareCompatibility.NONE
        try:
            _check_build_gpu(target, found[0], hw)
        except TargetError as exc:
            return exc.problem
        return None

    def doctor(self, gpus: Any, tensorrt_available: bool) -> list[dict]:
        out = []
        for g in gpus:
            t = resolve_gpu_target("auto", [g])
            out.append({"target": t.name, "gpu": g.name, "precisions": t.precisions(), "ready": tensorrt_available,
                        "missing": None if tensorrt_available else "tensorrt (pip install 'trtforge[gpu]')"})
        return out

    # ------------------------------------------------------------------ options and checks
    def default_options(self) -> BuildOptions:
        return BuildOptions()

    def parse_options(self, table: Mapping[str, Any]) -> BuildOptions:
        return BuildOptions.from_table(table)

    def check_options(self, target: Target, options: BuildOptions) -> None:
        if options.cpu_only():
            raise OptionError(f"{', '.join(options.cpu_only())} applies to the cpu target, not {target.name}",
                              "drop it for GPU targets (TensorRT keeps the lm_head as the artifact has it)",
                              fields=tuple(options.cpu_only()))
        if options.hardware_compatibility == HardwareCompatibility.AMPERE_PLUS and (target.sm or 0) < 80:
            raise OptionError(f"hardware_compatibility ampere-plus cannot target {target.name} ({target.arch})",
                              "ampere-plus engines run on sm_80 and newer; drop the option for this target",
                              fields=("hardware_compatibility",))

    def preflight(self, intent: BuildIntent, target: Target, options: BuildOptions) -> None:
        self.check_precision(target, intent.precision)
        options.check(target)

    def check(self, artifact: Artifact, target: Target, options: BuildOptions) -> BuildPlan:
        art = open_source(artifact)
        plan = plan_build(art, target, options, graph_checks=[_refuse_tensorrt_qdq],
                          # None: the per-user default, resolved once the TensorRT version is known
                          timing_cache=options.timing_cache if options.use_timing_cache else None)
        if options.reference_engine is not None:
            ref = load_artifact(options.reference_engine)
            if ref.manifest.kind != self.kind:
                raise OptionError(f"reference_engine {options.reference_engine} is not a TensorRT engine folder",
                                  "pass the folder 'trtforge build' wrote for the FP16 export", fields=("reference_engine",))
        return plan

    # ------------------------------------------------------------------ build
    def _environment(self, target: Target):
        """The GPU to build on, after checking TensorRT and the hardware; raises TargetError otherwise."""
        trt = env.tensorrt_status()
        if not trt["available"]:
            raise TargetError(f"--target {target.name} needs TensorRT, which is not importable here ({trt['reason']})",
                              "pip install 'trtforge[gpu]' on a machine with an NVIDIA GPU, or use --target cpu")
        found = env.gpus()
        if not found:
            raise TargetError(f"--target {target.name} needs an NVIDIA GPU and none was found (nvidia-smi)",
                              "build on a GPU machine, or use --target cpu")
        return found[0]

    def build(self, artifact: Artifact | str | Path, target: Target, options: BuildOptions, out: str | Path, *,
              force: bool = False) -> EngineArtifact:
        art = open_source(artifact)
        stage = StageOutput(out, stage="build", kind=self.kind, force=force, inputs=[art.path])
        plan = self.check(art, target, options)
        gpu = self._environment(plan.target)
        _check_build_gpu(plan.target, gpu, plan.options.hardware_compatibility)
        reference = load_artifact(plan.options.reference_engine).manifest if plan.options.reference_engine else None
        try:
            _trt = tensorrt_adapter()
        except MissingDependencyError as exc:  # importable per env.tensorrt_status, but the adapter failed
            raise TargetError(f"TensorRT failed to load: {exc.problem}", "pip install 'trtforge[gpu]', or use --target cpu") from exc

        version = _trt.version()
        cache_path = None
        if plan.options.use_timing_cache:
            cache_path = plan.timing_cache_path or default_cache_path(version, gpu.compute_capability)
            plan = replace(plan, timing_cache_path=cache_path)
        cache = load_timing_cache(cache_path, version, gpu.compute_capability)

        m = stage.manifest
        with stage.open() as tmp:
            result = _trt.build(plan, cache.data)
            rel, layout = place(tmp, art, plan, "tensorrt_plan", ENGINE_FILE)
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(result.engine)
            (tmp / LAYERS_FILE).write_text(json.dumps(result.layers, indent=1) + "\n", encoding="utf-8")
            summary = summarize(result.layers)
            warnings = [w for w in [quantized_kernel_warning(summary, plan.precision.precision)] if w]

            feeds = synthetic_feeds(art.manifest, opt_sizes(plan.profile.to_json()["symbols"]))
            samples = _trt.measure(result.engine, feeds, iterations=plan.options.benchmark_iterations,
                                   version_compatible=plan.options.version_compatible)
            latency = Latency.from_samples(samples, {k: list(v.shape) for k, v in feeds.items()})

            copy_side_files(art.path, tmp)
            start_manifest(m, art, plan)
            m.set("engine", {"file": rel, "sha256": sha256_file(tmp / rel), "bytes": len(result.engine), "io": result.io})
            m.set("tensorrt", {"version": version})
            m.set("gpu", {"name": gpu.name, "compute_capability": gpu.compute_capability, "index": gpu.index})
            m.set("plan", plan.to_json())
            m.set("layers", {"file": LAYERS_FILE, "summary": summary})
            performance: dict[str, Any] = {"latency": latency.to_json()}
            m.set("performance", performance)
            if reference is not None:
                cmp = compare_with_reference(m.to_json(), reference.to_json(), plan.options.slower_tolerance)
                performance["reference"] = {"path": str(plan.options.reference_engine), **cmp}
                if cmp.get("warning"):
                    warnings.append(cmp["warning"])
            m.set("timing_cache", cache.to_json(cache_path))
            m.set("layout", layout)
            m.set("build_log", result.log[-50:])
            m.set("warnings", warnings)
            m.timings["build_s"] = result.build_s
        # Only a complete build updates the cache.
        if cache_path is not None and result.timing_cache:
            m_cache = save_timing_cache(cache_path, result.timing_cache, version, gpu.compute_capability, gpu.name)
            log.info("timing cache saved to %s (%d bytes)", cache_path, m_cache["bytes"])
        for w in warnings:
            log.warning("%s", w)
        return load_artifact(stage.path)  # an EngineArtifact

    def model_file(self, artifact: Artifact) -> Path:
        return artifact.engine_path

    def summary(self, artifact: Artifact) -> str:
        m = artifact.manifest
        by_precision = m.section("layers")["summary"]["by_precision"]
        lat, gpu = m.section("performance")["latency"], m.section("gpu")
        return (f"{artifact.path}  {(m.section('precision') or {}).get('precision')} engine for {gpu['name']} "
                f"(sm {gpu['compute_capability']}), TensorRT {m.section('tensorrt')['version']}; layers "
                + ", ".join(f"{k} {v}" for k, v in by_precision.items() if v)
                + f"; {lat['median_ms']:.3f} ms median at opt shapes")

    # ------------------------------------------------------------------ load check
    def load_check(self, artifact: Artifact, machine: Machine, *, load: bool = False) -> LoadReport:
        report = check_engine(artifact, machine)
        if not (load and report.loads):
            return report
        _trt = tensorrt_adapter()
        vc = bool(((artifact.manifest.section("plan") or {}).get("config") or {}).get("version_compatible"))
        ok, detail = _trt.try_deserialize(artifact.engine_path.read_bytes(), vc)
        return LoadReport(report.artifact, report.kind, report.checks + (Check("load", ok, detail),), report.machine)

    # ------------------------------------------------------------------ parity
    def parity_runner(self, side: Any) -> tuple[Any, dict[str, Any]]:
        """Polygraphy's TrtRunner over the plan; ParityError without TensorRT or a GPU.
        See trtforge.backend.Backend.parity_runner."""
        status = env.tensorrt_status()
        found = env.gpus() if status["available"] else []
        if not status["available"] or not found:
            raise ParityError(
                f"the {side.role} is a TensorRT engine, which needs TensorRT and an NVIDIA GPU "
                f"({'no GPU found' if status['available'] else status['reason']})",
                "run parity on the GPU machine the engine was built for (pip install 'trtforge[gpu]')",
            )
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        engine = EngineFromBytes(side.model_file.read_bytes())
        g = found[0]
        return TrtRunner(engine, name=side.role), {
            "runner": "polygraphy TrtRunner",
            "engine": "tensorrt",
            "tensorrt": status.get("version"),
            "gpu": f"{g.name} (compute capability {g.compute_capability})",
            "model_dtype": side.precision,
        }


TENSORRT_BACKEND = BACKENDS.register(TensorRTBackend())
