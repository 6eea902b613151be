"""Build stage: ONNX artifact -> the deployable artifact of a target, through its Backend.

In:  an OnnxArtifact folder (export or quantize stage), a target name (``hopper``, ``sm_89``,
     ``auto``, ``cpu``, ``trtllm``...), the backend's options (:class:`BuildOptions` for TensorRT
     and CPU targets), an output folder.
Out: whatever the target's backend writes (trtforge.backend: BACKENDS):
     * ``sm_XX`` (backend ``tensorrt``, backends/tensorrt.py): an EngineArtifact: ``model.plan``
       (or ``<name>/1/model.plan`` with ``--layout triton``), ``layers.json`` (engine inspector),
       ``manifest.json`` (TensorRT version, GPU, flags, profiles, build time, hashes of the ONNX
       input and of the engine, per-layer precision summary, latency);
     * ``cpu`` (backend ``cpu-ort``, backends/cpu_ort.py): an OnnxArtifact optimized for ONNX
       Runtime (see cpu.py);
     * ``trtllm`` (backend ``trtllm-checkpoint``): a TensorRT-LLM checkpoint (engines/trtllm).
     Written to a temporary folder and renamed when complete (trtforge.stage.StageOutput).

Order matters: everything that can refuse the job (unknown target, a precision the target
cannot run, Q/DQ TensorRT rejects, profiles that contradict the model, bad options) is checked
before looking for TensorRT or a GPU, so those refusals are the same on every machine.

This module holds what the ONNX-consuming backends (cpu-ort, tensorrt) share: opening the
input, the build plan, the manifest sections every build carries, and the Triton placement.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import onnx

from trtforge.artifacts import Artifact, OnnxArtifact, load_artifact, sha256_file
from trtforge.backend import backend_for_target
from trtforge.engines import triton
from trtforge.engines.plan import BuildOptions, BuildPlan, Layout
from trtforge.engines.precision import check_target, detect_precision
from trtforge.engines.profiles import derive_profile
from trtforge.engines.targets import Target, resolve_target
from trtforge.errors import InputError
from trtforge.manifest import MANIFEST, Manifest, Upstream
from trtforge.onnx_io import load_model

log = logging.getLogger(__name__)

ENGINE_FILE = "model.plan"
LAYERS_FILE = "layers.json"
CPU_MODEL_FILE = "model.onnx"


def open_source(artifact: str | Path | OnnxArtifact) -> OnnxArtifact:
    """The ONNX artifact a build reads (export or quantize; never another build)."""
    art = artifact if isinstance(artifact, OnnxArtifact) else load_artifact(artifact)
    if not isinstance(art, OnnxArtifact):
        raise InputError(f"{artifact} is a {art.manifest.kind} artifact, not an ONNX artifact"
                         if art.manifest.kind != "engine" else f"{artifact} is a TensorRT engine, not an ONNX artifact",
                         "pass the folder written by 'trtforge export' or 'trtforge quantize'")
    if art.manifest.stage == "build":
        target = art.manifest.section("target") or {}
        raise InputError(f"{artifact} was written by 'trtforge build' (target {target.get('name')})",
                         "build from the export or quantize folder instead")
    return art


def plan_build(art: OnnxArtifact, target: Target, options: BuildOptions, *,
               graph_checks: Iterable[Callable[[onnx.ModelProto], None]] = (),
               timing_cache: Path | None = None) -> BuildPlan:
    """The plan of an ONNX-consuming backend: options, precision vs target, the backend's own
    graph checks (no weights loaded), the shape profile."""
    options.check(target)
    model = load_model(art.model_path, load_external_data=False)
    info = detect_precision(art.manifest, model)
    check_target(target, info)
    for check in graph_checks:
        check(model)
    del model
    profile = derive_profile(art.manifest, options.profile)
    return BuildPlan(art.model_path, target, info, profile, options, timing_cache)


def prepare(artifact: str | Path | OnnxArtifact, target: str | Target, options: Any = None,
            *, gpus=None) -> tuple[OnnxArtifact, Any]:
    """All checks that need neither TensorRT nor a GPU; returns the artifact and the backend's plan."""
    art = open_source(artifact)
    tgt = resolve_target(target, gpus)
    backend = backend_for_target(tgt)
    plan = backend.check(art, tgt, backend.default_options() if options is None else options)
    return art, plan


def cannot_build_here(target: Target, plan: Any = None) -> str | None:
    """Why this machine cannot carry out ``plan`` for ``target`` (None: it can): what ``--dry-run``
    warns about, since its checks need neither TensorRT nor a GPU."""
    backend = backend_for_target(target)
    why = backend.unavailable(target)
    mismatch = getattr(backend, "host_mismatch", None)
    if why is None and mismatch is not None:
        why = mismatch(target, plan)
    return why


def build(artifact: str | Path | OnnxArtifact, target: str | Target, out: str | Path,
          options: Any = None, *, force: bool = False) -> Artifact:
    """Build ``artifact`` for ``target`` into ``out`` with the target's backend. See module docstring."""
    tgt = resolve_target(target)
    backend = backend_for_target(tgt)
    return backend.build(artifact, tgt, backend.default_options() if options is None else options, out, force=force)


# --------------------------------------------------------------------------- shared manifest parts


def start_manifest(m: Manifest, art: OnnxArtifact, plan: BuildPlan) -> None:
    """What every build manifest carries: the input's source, dims, io, tokenizer and quantization
    (so parity can feed and tokenize the result), the ``upstream`` link, precision, target,
    options and profile."""
    src = art.manifest
    m.source, m.dims, m.io, m.quantization = src.source, src.dims, src.io, src.quantization
    if src.section("tokenizer") is not None:
        m.set("tokenizer", src.section("tokenizer"))
    # the ONNX input, by path and hash (the parity stage follows it to the tokenizer)
    up = Upstream(path=str(art.path), stage=src.stage, model_sha256=sha256_file(art.model_path),
                  manifest_sha256=sha256_file(art.path / MANIFEST), extra={"model_file": src.model.file})
    data = src.model.external_data
    if data and (art.model_path.parent / data).is_file():
        up.extra["external_data_sha256"] = sha256_file(art.model_path.parent / data)
    m.upstream = up
    m.set("precision", plan.precision.to_json())
    m.set("target", plan.target.to_json())
    m.set("options", plan.options.to_json())
    m.set("profile", plan.profile.to_json())


def place(tmp: Path, art: OnnxArtifact, plan: BuildPlan, platform: str, plain_file: str) -> tuple[str, dict]:
    """Where the built model goes: ``plain_file``, or a Triton repository (config.pbtxt written);
    returns (path relative to the artifact folder, layout record)."""
    if plan.options.layout != Layout.TRITON:
        return plain_file, {"kind": "plain"}
    name = plan.options.model_name or triton.model_name_for(art.manifest, plan.precision.precision)
    (tmp / name / triton.VERSION).mkdir(parents=True, exist_ok=True)
    (tmp / name / "config.pbtxt").write_text(triton.config_pbtxt(name, platform, art.manifest.io, plan.profile),
                                             encoding="utf-8")
    layout = {"kind": "triton", "model_name": name, "config": f"{name}/config.pbtxt", "platform": platform}
    return triton.model_file(name, platform), layout
