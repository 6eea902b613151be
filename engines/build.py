"""Build stage: ONNX artifact -> TensorRT engine for a GPU target, or an ONNX Runtime artifact for the CPU.

In:  an OnnxArtifact folder (export or quantize stage), a target name (``hopper``, ``sm_89``,
     ``auto``, ``cpu``...), :class:`BuildOptions`, an output folder.
Out: for GPU targets an EngineArtifact: ``model.plan`` (or ``<name>/1/model.plan`` with
     ``--layout triton``), ``layers.json`` (engine inspector), ``manifest.json`` (TensorRT version,
     GPU, flags, profiles, build time, hashes of the ONNX input and of the engine, per-layer
     precision summary, latency). For ``cpu`` an OnnxArtifact optimized for ONNX Runtime
     (see cpu.py). Written to a temporary folder and renamed when complete.

Order matters: everything that can refuse the job (unknown target, a precision the target
cannot run, Q/DQ TensorRT rejects, profiles that contradict the model, bad options) is checked
before looking for TensorRT or a GPU, so those refusals are the same on every machine.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from trtforge.artifacts import (
    HF_SIDE_FILES,
    EngineArtifact,
    OnnxArtifact,
    atomic_output_dir,
    base_manifest,
    check_output_dir,
    file_table,
    load_artifact,
    read_json,
    sha256_file,
    write_json,
)
from trtforge.engines import triton
from trtforge.engines.plan import BuildOptions, BuildPlan, HardwareCompatibility, Layout
from trtforge.engines.precision import check_target, detect_precision, tensorrt_qdq_problems
from trtforge.engines.profiles import derive_profile
from trtforge.engines.targets import Target, resolve_target
from trtforge.errors import InputError, MissingDependencyError, TargetError

log = logging.getLogger(__name__)

ENGINE_FILE = "model.plan"
LAYERS_FILE = "layers.json"
CPU_MODEL_FILE = "model.onnx"
# Manifest keys copied from the input so the parity stage can feed and tokenize the result.
CARRIED_KEYS = ("source", "dims", "io", "tokenizer", "quantization")


def _open(artifact: str | Path | OnnxArtifact) -> OnnxArtifact:
    art = artifact if isinstance(artifact, OnnxArtifact) else load_artifact(artifact)
    if not isinstance(art, OnnxArtifact):
        raise InputError(f"{artifact} is a TensorRT engine, not an ONNX artifact",
                         "pass the folder written by 'trtforge export' or 'trtforge quantize'")
    if art.manifest.get("stage") == "build":
        raise InputError(f"{artifact} was written by 'trtforge build' (target {art.manifest.get('target', {}).get('name')})",
                         "build from the export or quantize folder instead")
    return art


def prepare(artifact: str | Path | OnnxArtifact, target: str | Target, options: BuildOptions = BuildOptions(),
            *, gpus=None) -> tuple[OnnxArtifact, BuildPlan]:
    """All checks that need neither TensorRT nor a GPU; returns the artifact and the build plan."""
    art = _open(artifact)
    tgt = target if isinstance(target, Target) else resolve_target(target, gpus)
    options.check(tgt)
    import onnx

    model = onnx.load(str(art.model_path), load_external_data=False)
    info = detect_precision(art.manifest, model)
    check_target(tgt, info)
    if not tgt.is_cpu:
        problems = tensorrt_qdq_problems(model)
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            raise TargetError(f"TensorRT cannot build this graph: {problems[0]}{more}",
                              "re-quantize with a TensorRT recipe (symmetric, signed), or use --target cpu")
    del model
    profile = derive_profile(art.manifest, options.profile)
    if options.reference_engine is not None:
        ref = load_artifact(options.reference_engine)
        if not isinstance(ref, EngineArtifact):
            raise InputError(f"--reference-engine {options.reference_engine} is not a TensorRT engine folder",
                             "pass the folder 'trtforge build' wrote for the FP16 export")
    cache = None
    if not tgt.is_cpu and options.use_timing_cache:
        cache = options.timing_cache  # None: the per-user default, resolved once the TensorRT version is known
    return art, BuildPlan(art.model_path, tgt, info, profile, options, cache)


def build(artifact: str | Path | OnnxArtifact, target: str | Target, out: str | Path,
          options: BuildOptions = BuildOptions(), *, force: bool = False) -> OnnxArtifact | EngineArtifact:
    """Build ``artifact`` for ``target`` into ``out``. See module docstring."""
    t_start = time.perf_counter()
    out = check_output_dir(Path(out), force=force)
    art, plan = prepare(artifact, target, options)
    if art.path == out or art.path in out.parents:
        raise InputError(f"output folder {out} is inside the input artifact", "write the build somewhere else")
    if plan.target.is_cpu:
        return _build_cpu(art, plan, out, force, t_start)
    return _build_gpu(art, plan, out, force, t_start)


def _model_name(art: OnnxArtifact, plan: BuildPlan) -> str:
    return plan.options.model_name or triton.model_name_for(art.manifest, plan.precision.precision)


def _copy_side_files(src: Path, dst: Path) -> None:
    for name in HF_SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _common_manifest(art: OnnxArtifact, plan: BuildPlan, kind: str) -> dict:
    m = base_manifest("build", kind)
    for k in CARRIED_KEYS:
        if k in art.manifest:
            m[k] = art.manifest[k]
    # "upstream": the ONNX input, by path and hash (the parity stage follows it to the tokenizer)
    m["upstream"] = {
        "path": str(art.path),
        "stage": art.manifest.get("stage"),
        "model_file": art.manifest["model"]["file"],
        "model_sha256": sha256_file(art.model_path),
        "manifest_sha256": sha256_file(art.path / "manifest.json"),
    }
    data = art.manifest["model"].get("external_data")
    if data and (art.model_path.parent / data).is_file():
        m["upstream"]["external_data_sha256"] = sha256_file(art.model_path.parent / data)
    m["precision"] = plan.precision.to_json()
    m["target"] = plan.target.to_json()
    m["options"] = plan.options.to_json()
    m["profile"] = plan.profile.to_json()
    return m


def _place(tmp: Path, art: OnnxArtifact, plan: BuildPlan, platform: str, plain_file: str) -> tuple[str, dict]:
    """Where the built model goes: ``plain_file``, or a Triton repository (config.pbtxt written);
    returns (path relative to the artifact folder, layout record)."""
    if plan.options.layout != Layout.TRITON:
        return plain_file, {"kind": "plain"}
    name = _model_name(art, plan)
    (tmp / name / triton.VERSION).mkdir(parents=True, exist_ok=True)
    (tmp / name / "config.pbtxt").write_text(triton.config_pbtxt(name, platform, art.manifest["io"], plan.profile),
                                             encoding="utf-8")
    layout = {"kind": "triton", "model_name": name, "config": f"{name}/config.pbtxt", "platform": platform}
    return triton.model_file(name, platform), layout


# --------------------------------------------------------------------------- CPU


def _build_cpu(art: OnnxArtifact, plan: BuildPlan, out: Path, force: bool, t_start: float) -> OnnxArtifact:
    from trtforge.engines.cpu import build_cpu
    from trtforge.onnx_io import DATA_FILE, EXTERNAL_DATA_THRESHOLD

    src_size = sum(p.stat().st_size for p in art.path.iterdir() if p.is_file() and p.name.startswith("model.onnx"))
    external = bool(art.manifest["model"].get("external_data")) or src_size > EXTERNAL_DATA_THRESHOLD
    with atomic_output_dir(out, force=force) as tmp:
        rel, layout = _place(tmp, art, plan, "onnxruntime_onnx", CPU_MODEL_FILE)
        parts = build_cpu(art.model_path, art.manifest, tmp / "_work", tmp / rel, plan.precision, plan.profile,
                          external=external)
        shutil.rmtree(tmp / "_work", ignore_errors=True)
        _copy_side_files(art.path, tmp)
        m = _common_manifest(art, plan, "onnx")
        m["model"] = {
            "file": rel,
            "external_data": DATA_FILE if external else None,
            "opset": art.manifest["model"].get("opset"),
            "dtype": art.manifest["model"].get("dtype", plan.precision.float_dtype),
            "optimized_by": "onnxruntime",
        }
        m["runtime"] = parts["runtime"]
        m["build"] = parts["build"]
        m["layout"] = layout
        m["timings"] = {**parts["build"]["timings"], "total_s": round(time.perf_counter() - t_start, 3)}
        m["files"] = file_table(tmp)
        write_json(tmp / "manifest.json", m)
    log.info("built %s for cpu (%s) in %s", art.path.name, plan.precision.precision, out)
    return OnnxArtifact.open(out)


# --------------------------------------------------------------------------- GPU


def _gpu_environment(target: Target):
    """The GPU to build on, after checking TensorRT and the hardware; raises TargetError otherwise."""
    from trtforge.env import gpus, tensorrt_status

    trt = tensorrt_status()
    if not trt["available"]:
        raise TargetError(f"--target {target.name} needs TensorRT, which is not importable here ({trt['reason']})",
                          "pip install 'trtforge[gpu]' on a machine with an NVIDIA GPU, or use --target cpu")
    found = gpus()
    if not found:
        raise TargetError(f"--target {target.name} needs an NVIDIA GPU and none was found (nvidia-smi)",
                          "build on a GPU machine, or use --target cpu")
    return found[0]


def _check_build_gpu(target: Target, gpu, hw: HardwareCompatibility) -> None:
    if gpu.sm == target.sm:
        return
    if hw == HardwareCompatibility.AMPERE_PLUS and gpu.sm >= 80:
        return  # an Ampere+ hardware-compatible engine built on any Ampere+ GPU runs on the target
    raise TargetError(
        f"TensorRT builds for the GPU it runs on: this machine has {gpu.name} (sm_{gpu.sm}), the target is {target.name}",
        "build on a machine with the target GPU, use --target auto, or --hardware-compatibility ampere-plus for sm_80+")


def _build_gpu(art: OnnxArtifact, plan: BuildPlan, out: Path, force: bool, t_start: float) -> EngineArtifact:
    from dataclasses import replace

    from trtforge.engines.feeds import opt_sizes, synthetic_feeds
    from trtforge.engines.inspector import quantized_kernel_warning, summarize
    from trtforge.engines.perf import Latency, compare_with_reference
    from trtforge.engines.timing_cache import default_cache_path, load_timing_cache, save_timing_cache

    gpu = _gpu_environment(plan.target)
    _check_build_gpu(plan.target, gpu, plan.options.hardware_compatibility)
    reference = load_artifact(plan.options.reference_engine).manifest if plan.options.reference_engine else None
    try:
        from trtforge.engines import _trt
    except MissingDependencyError as exc:  # importable per env.tensorrt_status, but the adapter failed
        raise TargetError(f"TensorRT failed to load: {exc.problem}", "pip install 'trtforge[gpu]', or use --target cpu") from exc

    version = _trt.version()
    cache_path = None
    if plan.options.use_timing_cache:
        cache_path = plan.timing_cache_path or default_cache_path(version, gpu.compute_capability)
        plan = replace(plan, timing_cache_path=cache_path)
    cache = load_timing_cache(cache_path, version, gpu.compute_capability)

    with atomic_output_dir(out, force=force) as tmp:
        result = _trt.build(plan, cache.data)
        rel, layout = _place(tmp, art, plan, "tensorrt_plan", ENGINE_FILE)
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(result.engine)
        (tmp / LAYERS_FILE).write_text(json.dumps(result.layers, indent=1) + "\n", encoding="utf-8")
        summary = summarize(result.layers)
        warnings = [w for w in [quantized_kernel_warning(summary, plan.precision.precision)] if w]

        feeds = synthetic_feeds(art.manifest, opt_sizes(plan.profile.to_json()["symbols"]))
        samples = _trt.measure(result.engine, feeds, iterations=plan.options.benchmark_iterations,
                               version_compatible=plan.options.version_compatible)
        latency = Latency.from_samples(samples, {k: list(v.shape) for k, v in feeds.items()})

        _copy_side_files(art.path, tmp)
        m = _common_manifest(art, plan, "engine")
        m["engine"] = {"file": rel, "sha256": sha256_file(tmp / rel), "bytes": len(result.engine), "io": result.io}
        m["tensorrt"] = {"version": version}
        m["gpu"] = {"name": gpu.name, "compute_capability": gpu.compute_capability, "index": gpu.index}
        m["plan"] = plan.to_json()
        m["layers"] = {"file": LAYERS_FILE, "summary": summary}
        m["performance"] = {"latency": latency.to_json()}
        if reference is not None:
            cmp = compare_with_reference(m, reference, plan.options.slower_tolerance)
            m["performance"]["reference"] = {"path": str(plan.options.reference_engine), **cmp}
            if cmp.get("warning"):
                warnings.append(cmp["warning"])
        m["timing_cache"] = cache.to_json(cache_path)
        m["layout"] = layout
        m["build_log"] = result.log[-50:]
        m["warnings"] = warnings
        m["timings"] = {"build_s": round(result.build_s, 3), "total_s": round(time.perf_counter() - t_start, 3)}
        m["files"] = file_table(tmp)
        write_json(tmp / "manifest.json", m)
    # Only a complete build updates the cache.
    if cache_path is not None and result.timing_cache:
        m_cache = save_timing_cache(cache_path, result.timing_cache, version, gpu.compute_capability, gpu.name)
        log.info("timing cache saved to %s (%d bytes)", cache_path, m_cache["bytes"])
    for w in warnings:
        log.warning("%s", w)
    return EngineArtifact(out, read_json(out / "manifest.json", "manifest"))
