"""Backend ``cpu-ort``: the ``cpu`` target, an ONNX artifact optimized offline for ONNX Runtime's CPU provider.

In:  an export or quantize OnnxArtifact, :class:`BuildOptions` (profile, layout, model name; the
     TensorRT-only fields are refused), an output folder.
Out: an OnnxArtifact (manifest ``kind: onnx``, ``stage: build``) with ``runtime`` (the session
     options it must be loaded with), ``build`` (rewrites, fused operators, self-check) and the
     sections every build carries (engines/build.py ``start_manifest``). The work is cpu.py's.

Parity: this backend runs every ONNX artifact (export, quantize or CPU build) with Polygraphy's
``OnnxrtRunner`` over ``trtforge.ort.session``, honouring a CPU build's recorded ``runtime``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trtforge.artifacts import Artifact, OnnxArtifact, copy_side_files
from trtforge.backend import BuildIntent
from trtforge.engines import cpu
from trtforge.engines.build import (
    CPU_MODEL_FILE,
    open_source,
    place,
    plan_build,
    start_manifest,
)
from trtforge.engines.check import Check, LoadReport, Machine, check_cpu
from trtforge.engines.plan import BuildOptions, BuildPlan
from trtforge.engines.targets import (
    CPU_ORT,
    CPU_PRECISIONS,
    FP8,
    FP16,
    FP32,
    INT4,
    INT8,
    TARGETS,
    Target,
    refuse_unsupported,
)
from trtforge.errors import InputError, OptionError, ParityError, TrtforgeError
from trtforge.manifest import ModelFile
from trtforge.onnx_io import DATA_FILE, EXTERNAL_DATA_THRESHOLD
from trtforge.ort import EMULATION_CONFIG, session
from trtforge.registry import BACKENDS
from trtforge.stage import StageOutput

log = logging.getLogger(__name__)

# Skip the "how did ONNX Runtime execute it" analysis above this size: it saves a second copy.
ANALYSIS_MAX_BYTES = 1 << 30
# Ops that only move or reshape data: running them through float32 casts changes no value.
_DATA_MOVEMENT = {"Reshape", "Transpose", "Concat", "Shape", "Unsqueeze", "Squeeze", "Gather", "Slice", "Expand",
                  "Where", "Split", "Identity", "Flatten", "Tile", "GatherElements", "ScatterND", "Pad"}
_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}


class CpuOrtBackend:
    name = CPU_ORT
    kind = "onnx"
    stage = "build"
    command = "build"
    options_table = "build"
    float_dtype = "fp32"  # CPUs run the unquantized rest faster in FP32
    runs_parity = True
    fuses_gemms = False  # ONNX Runtime runs each GEMM in its own precision

    # ------------------------------------------------------------------ targets
    def resolve(self, name: str, gpus: Any = None) -> Target | None:
        return TARGETS["cpu"] if name == "cpu" else None

    def target_names(self) -> list[str]:
        return ["cpu"]

    def owns(self, artifact: Artifact) -> bool:
        return artifact.manifest.kind == self.kind

    def precisions(self, target: Target) -> list[str]:
        return list(CPU_PRECISIONS)

    def check_precision(self, target: Target, precision: str) -> None:
        refuse_unsupported(target, precision)

    def unavailable(self, target: Target) -> str | None:
        return None  # ONNX Runtime's CPU provider is a core dependency

    def doctor(self, gpus: Any, tensorrt_available: bool) -> list[dict]:
        """Per precision what a CPU build runs here, from this CPU's flags and a probe of ONNX
        Runtime's integer GEMM (a second): ``ready`` lists what builds here, ``notes`` says how
        it runs (FP8 has no CPU kernel: emulated in float; INT8 needs an exact U8U8 kernel)."""
        flags = cpu.cpu_flags()
        vnni = bool(flags and set(flags) & set(cpu.VNNI_FLAGS))
        try:
            u8u8 = cpu.probe_int8_gemm()["u8u8_max_rel_err"]
        except Exception as exc:  # an ONNX Runtime without the contrib op: say it, do not crash doctor
            u8u8 = None
            why = f"the integer GEMM probe failed ({type(exc).__name__})"
        notes = {FP32: "float kernels", FP16: "float16 graph, computed in float32 where ONNX Runtime has no float16 kernel"}
        ready = [FP32, FP16, INT4]
        notes[INT4] = "MatMulNBits: 4-bit weights, float activations (W4A16)"
        if u8u8 == 0.0:
            ready.append(INT8)
            notes[INT8] = ("integer GEMMs (MatMulIntegerToFloat, U8U8): exact here; "
                           + ("VNNI" if vnni else "no VNNI on this CPU, so slower than on a VNNI CPU"))
        else:
            notes[INT8] = (why if u8u8 is None else f"ONNX Runtime's U8U8 integer GEMM is not exact on this CPU "
                           f"(max error {u8u8:.3g} of the output range): int8 builds are refused here")
        ready.append(FP8)
        notes[FP8] = ("no ONNX Runtime CPU kernel: weights folded to float, activations fake-quantized in float; "
                      "an accuracy artifact, not a speed-up over fp32")
        order = self.precisions(TARGETS["cpu"])
        return [{"target": "cpu", "precisions": [p for p in order if p in ready], "ready": True,
                 "not_ready": {p.value: notes[p] for p in order if p not in ready} or None,
                 "notes": {p.value: notes[p] for p in order if p in notes},
                 "check": "every build compares the optimized artifact with its input and refuses a mismatch",
                 "cpu_flags": list(flags or ())}]

    # ------------------------------------------------------------------ options and checks
    def default_options(self) -> BuildOptions:
        return BuildOptions()

    def parse_options(self, table: Mapping[str, Any]) -> BuildOptions:
        return BuildOptions.from_table(table)

    def check_options(self, target: Target, options: BuildOptions) -> None:
        gpu_only = options.tensorrt_only()
        if gpu_only:
            raise OptionError(f"{', '.join(gpu_only)} applies to TensorRT targets, not the cpu target",
                              "drop it or build for a GPU target", fields=tuple(gpu_only))

    def preflight(self, intent: BuildIntent, target: Target, options: BuildOptions) -> None:
        self.check_precision(target, intent.precision)
        options.check(target)

    def check(self, artifact: Artifact, target: Target, options: BuildOptions) -> BuildPlan:
        art = open_source(artifact)
        plan = plan_build(art, target, options)
        cpu.check_lm_head_option(art.model_path, art.manifest, plan.precision, options.cpu_lm_head)
        return plan

    # ------------------------------------------------------------------ build
    def build(self, artifact: Artifact | str | Path, target: Target, options: BuildOptions, out: str | Path, *,
              force: bool = False) -> OnnxArtifact:
        art = open_source(artifact)
        stage = StageOutput(out, stage="build", kind=self.kind, force=force, inputs=[art.path])
        plan = self.check(art, target, options)
        src_model = art.manifest.model
        src_size = sum(p.stat().st_size for p in art.path.iterdir() if p.is_file() and p.name.startswith("model.onnx"))
        external = bool(src_model.external_data) or src_size > EXTERNAL_DATA_THRESHOLD
        m = stage.manifest
        with stage.open() as tmp:
            rel, layout = place(tmp, art, plan, "onnxruntime_onnx", CPU_MODEL_FILE)
            parts = cpu.build_cpu(art.model_path, art.manifest, tmp / "_work", tmp / rel, plan.precision, plan.profile,
                                  external=external, lm_head=plan.options.cpu_lm_head)
            shutil.rmtree(tmp / "_work", ignore_errors=True)
            copy_side_files(art.path, tmp)
            start_manifest(m, art, plan)
            m.model = ModelFile(file=rel, external_data=DATA_FILE if external else None, opset=src_model.opset,
                                dtype=src_model.dtype if src_model.dtype is not None else plan.precision.float_dtype,
                                extra={"optimized_by": "onnxruntime"})
            m.set("runtime", parts["runtime"])
            m.set("build", parts["build"])
            m.set("layout", layout)
            m.timings.update(parts["build"]["timings"])
        log.info("built %s for cpu (%s) in %s", art.path.name, plan.precision.precision, out)
        return OnnxArtifact.open(stage.path)

    def model_file(self, artifact: Artifact) -> Path:
        return artifact.model_path

    def summary(self, artifact: Artifact) -> str:
        m = artifact.manifest
        b = m.section("build")
        return (f"{artifact.path}  {(m.section('precision') or {}).get('precision')} CPU artifact (ONNX Runtime "
                f"{m.versions.get('onnxruntime')}); {b['uint8_activation_groups']} INT8 activation Q/DQ -> UINT8; ops "
                + ", ".join(f"{k} {v}" for k, v in b["ops_after"].items()) + _gemm_line(b))

    # ------------------------------------------------------------------ load check
    def load_check(self, artifact: Artifact, machine: Machine, *, load: bool = False) -> LoadReport:
        report = check_cpu(artifact, machine)
        if not (load and report.loads):
            return report
        rt = artifact.manifest.section("runtime") or {}
        try:
            cpu.session(artifact.model_path, cpu.CpuRuntime(rt.get("session_config") or {},
                                                            rt.get("graph_optimization_level", cpu.LOAD_LEVEL)))
            ok, detail = True, "ONNX Runtime created a session"
        except TrtforgeError as exc:
            ok, detail = False, exc.problem
        return LoadReport(report.artifact, report.kind, report.checks + (Check("load", ok, detail),), report.machine)

    # ------------------------------------------------------------------ parity
    def parity_runner(self, side: Any) -> tuple[Any, dict[str, Any]]:
        """Polygraphy's OnnxrtRunner over trtforge.ort.session; a CPU build's ``runtime`` (provider,
        session config, optimization level) is honoured. See trtforge.backend.Backend.parity_runner."""
        from polygraphy.backend.onnxrt import OnnxrtRunner

        man = side.artifact.manifest
        runtime = man.section("runtime") or {}  # a CPU build records how it must be run
        provider = runtime.get("provider") or "CPUExecutionProvider"
        config = {str(k): str(v) for k, v in (runtime.get("session_config") or {}).items()}
        level = opt_level(runtime.get("graph_optimization_level"))
        import onnxruntime as ort

        available = ort.get_available_providers()
        desc: dict[str, Any] = {
            "runner": "polygraphy OnnxrtRunner",
            "engine": "onnxruntime",
            # what ort.session registers; replaced by the session's own list when it loads
            "providers": list(dict.fromkeys([p for p in (provider,) if p in available] + ["CPUExecutionProvider"])),
            "model_dtype": (man.model.dtype if man.model is not None else None) or side.precision,
            "session_config": {**EMULATION_CONFIG, **config},
            "graph_optimization_level": level or "ORT_ENABLE_ALL (default)",
            "from_build_runtime": bool(runtime),
        }
        if provider not in desc["providers"]:
            desc["note"] = f"{provider} (recorded by the build) is not available here; ran on {desc['providers'][0]}"
        desc.update(execution_analysis(side, desc["providers"][0], {**EMULATION_CONFIG, **config}, level))

        def load():
            """The session, built when the runner is activated and freed when it is deactivated: parity
            runs one side after the other, so one model's weights are in memory at a time."""
            try:
                sess = session(side.model_file, providers=[provider], config=config, optimization=level)
            except Exception as exc:  # ORT raises its own exception types for unloadable graphs
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ParityError(f"ONNX Runtime cannot load the {side.role} {side.model_file}: {first[:300]}",
                                  "check the artifact with 'onnx.checker' or re-run the stage that wrote it") from None
            desc["providers"] = list(sess.get_providers())
            return sess

        return OnnxrtRunner(load, name=side.role), desc


def opt_level(value: Any) -> str | None:
    """A recorded graph_optimization_level (name, short name or GraphOptimizationLevel int) -> its name."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        # GraphOptimizationLevel's integer values: 0, 1, 2, 3 (layout), 99 (all)
        by_int = {0: "ORT_DISABLE_ALL", 1: "ORT_ENABLE_BASIC", 2: "ORT_ENABLE_EXTENDED", 3: "ORT_ENABLE_LAYOUT",
                  99: "ORT_ENABLE_ALL"}
        if value in by_int:
            return by_int[value]
    text = str(value)
    if text in _OPT_LEVELS.values():
        return text
    key = text.lower().replace("ort_", "").replace("enable_", "").replace("_all", "")
    if key in _OPT_LEVELS:
        return _OPT_LEVELS[key]
    raise InputError(f"unknown graph_optimization_level {value!r} in the build's runtime",
                     f"use one of {', '.join(_OPT_LEVELS.values())}")


def execution_analysis(side: Any, provider: str, config: dict[str, str], level: str | None) -> dict[str, Any]:
    """How ONNX Runtime really executes the graph: FP16 ops it runs through FP32 casts, and the
    quantized kernels it fuses Q/DQ into. Read from the graph ORT saves after partitioning."""
    art = side.artifact
    ext = art.manifest.model.external_data if art.manifest.model is not None else None
    size = side.model_file.stat().st_size + (
        (art.path / ext).stat().st_size if ext and (art.path / ext).is_file() else 0)
    if size > ANALYSIS_MAX_BYTES:
        return {"execution": {"analysed": False, "reason": f"model larger than {ANALYSIS_MAX_BYTES >> 20} MiB"}}
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="trtforge-parity-") as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        for k, v in config.items():
            so.add_session_config_entry(k, v)
        if level:
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        try:
            ort.InferenceSession(str(side.model_file), so, providers=[provider])
            opt = onnx.load(so.optimized_model_filepath, load_external_data=False)
        except Exception as exc:  # analysis is informative only; never fail the run on it
            return {"execution": {"analysed": False, "reason": f"{type(exc).__name__}: {str(exc)[:200]}"}}
    casts = {n.output[0] for n in opt.graph.node if n.op_type == "Cast" and n.name.startswith("InsertedPrecisionFreeCast")}
    fallback = Counter(n.op_type for n in opt.graph.node if n.op_type != "Cast" and any(i in casts for i in n.input))
    quant_ops = Counter(n.op_type for n in opt.graph.node
                        if n.op_type in ("QLinearMatMul", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulNBits",
                                         "QGemm", "QAttention", "MatMulIntegerToFloat", "QLinearAdd"))
    qdq = Counter(n.op_type for n in opt.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    out: dict[str, Any] = {"analysed": True, "fp32_fallback_ops": dict(sorted(fallback.items())),
                           "quantized_kernels": dict(sorted(quant_ops.items())), "qdq_nodes_left": dict(sorted(qdq.items()))}
    compute = {k: v for k, v in fallback.items() if k not in _DATA_MOVEMENT}
    parts = []
    if fallback:
        moved = sum(fallback.values()) - sum(compute.values())
        out["fp32_compute_nodes"] = sum(compute.values())
        parts.append(
            f"{provider} has no float16 kernel for {sum(compute.values())} arithmetic node(s) "
            f"({', '.join(f'{k} x{v}' for k, v in sorted(compute.items()))}): ONNX Runtime runs them in float32 "
            "between inserted casts, so they compute in FP32 and round to FP16 at their outputs"
            + (f"; {moved} data-movement node(s) also pass through casts, which is lossless" if moved else "")
        )
    if quant_ops or qdq:
        parts.append(
            "Q/DQ run by ONNX Runtime: " + ", ".join(f"{k} x{v}" for k, v in sorted({**quant_ops, **qdq}.items()))
            + (" (GEMMs fused into integer kernels)" if quant_ops else " (dequantize, then float compute: emulation)")
        )
    out["summary"] = ". ".join(parts) if parts else f"every node ran on {provider} in the graph's own precision"
    return {"execution": out}


CPU_ORT_BACKEND = BACKENDS.register(CpuOrtBackend())


def _gemm_line(build: dict) -> str:
    """The per-GEMM check in the build's one-line summary (absent from artifacts built before it)."""
    g = build.get("gemm_check") or {}
    if not g.get("checked"):
        return ""
    fb = ((build.get("int8_gemm") or {}).get("float_fallback")) or []
    worst = (g.get("worst") or {}).get("max_rel_err")
    return (f"; {g['checked']} integer GEMMs checked against exact math (worst {worst:.2g})"
            + (f", {len(fb)} fell back to float" if fb else ""))
