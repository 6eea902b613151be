"""The Backend interface: one entry per kind of deployable artifact, in :data:`BACKENDS`.

A backend turns an ONNX artifact into something a runtime loads, and knows everything about
that runtime the other stages need. The built-in entries live in ``engines/backends/``:

=====================  =========================  ===============================================
backend                targets it serves          artifact (manifest ``kind``)
=====================  =========================  ===============================================
``cpu-ort``            ``cpu``                    ONNX optimized for ONNX Runtime's CPU (``onnx``)
``tensorrt``           ``sm_XX``, aliases, auto   TensorRT engine ``model.plan`` (``engine``)
``trtllm-checkpoint``  ``trtllm``                 TensorRT-LLM checkpoint (``trtllm-checkpoint``)
=====================  =========================  ===============================================

Who calls what:

* the build stage (``engines/build.py``) and the pipeline resolve a target name, look its
  backend up with :func:`backend_for_target` and call ``check`` (every refusal, before any work)
  and ``build``; the pipeline calls ``preflight`` before the artifact even exists;
* parity calls :func:`backend_for_artifact` on each side and ``parity_runner(side)``;
* ``trtforge inspect`` calls ``load_check``; ``trtforge doctor`` loops over ``doctor``.

This module imports no stage: backends are reached only through :data:`BACKENDS`, which
imports the entry modules on first use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from trtforge.artifacts import Artifact
from trtforge.errors import InputError
from trtforge.registry import BACKENDS
from trtforge.vocab import Precision, Task


class TargetLike(Protocol):
    """What the core needs of a build target (``trtforge.engines.targets.Target``)."""

    name: str
    backend: str  # the BACKENDS name that builds for it


class RunnerSide(Protocol):
    """What ``parity_runner`` reads of one side of a comparison (``parity.models.ModelSide``)."""

    role: str  # "reference" | "candidate": names the Polygraphy runner and error messages
    artifact: Artifact

    @property
    def model_file(self) -> Path: ...  # the file the runtime loads: Backend.model_file(artifact)

    @property
    def precision(self) -> str: ...  # for the report, e.g. "int8"


@dataclass(frozen=True)
class BuildIntent:
    """What the pipeline is about to build, known before any work (no artifact exists yet):
    lets a backend refuse a recipe/target pair up front (``Backend.preflight``)."""

    precision: Precision
    model_type: str  # config.json model_type (an ARCHITECTURES name)
    architecture: str  # config.json architectures[0] (for messages)
    task: Task | None  # None: the architecture's default
    recipe: Mapping[str, Any] = field(default_factory=dict)  # QuantRecipe.to_dict()
    config: Mapping[str, Any] = field(default_factory=dict)  # the model's config.json


@runtime_checkable
class Backend(Protocol):
    """One kind of deployable artifact. Every method that can refuse raises a TrtforgeError
    whose message names the option's *field* (``optimization_level``), never a CLI flag."""

    name: str  # registry name: "cpu-ort", "tensorrt", "trtllm-checkpoint"
    kind: str  # manifest kind of the artifacts it writes: "onnx", "engine", "trtllm-checkpoint"
    stage: str  # manifest stage of the artifacts it writes: "build" | "export-checkpoint"
    command: str  # the CLI command that writes its artifacts on their own: "build" | "export-checkpoint"
    options_table: str  # the run-recipe table its options come from: "build" | "checkpoint"
    float_dtype: str  # what the unquantized rest of the graph it is given should compute in: fp32 | fp16
    runs_parity: bool  # False: parity_runner raises; its artifacts are verified when written
    # True: it fuses q/k/v and gate/up into one layer of one precision (a budget in 'trtforge run'
    # then switches them together: budget_granularity "auto" resolves to "group")
    fuses_gemms: bool = False

    def resolve(self, name: str, gpus: Any = None) -> TargetLike | None:
        """The target ``name`` (lower-case, aliases not yet applied) means, if this backend serves it."""

    def target_names(self) -> list[str]:
        """The names ``resolve`` accepts (for help texts and 'unknown target' errors)."""

    def owns(self, artifact: Artifact) -> bool:
        """Whether this backend runs ``artifact`` (its manifest kind; cpu-ort runs every ONNX artifact,
        built or not). Built by it: also ``artifact.manifest.stage == self.stage``."""

    def check_options(self, target: TargetLike, options: Any) -> None:
        """Refuse options ``target`` does not take (OptionError naming the fields)."""

    def precisions(self, target: TargetLike) -> list[str]:
        """The precisions (``Precision`` values) ``target`` runs."""

    def check_precision(self, target: TargetLike, precision: str) -> None:
        """Refuse (TargetError naming the alternative) a precision ``target`` cannot run."""

    def parse_options(self, table: Mapping[str, Any]) -> Any:
        """Options from a run-recipe table (keys = option field names); ValueError/InputError naming the field."""

    def default_options(self) -> Any:
        """The options ``build`` uses when given none."""

    def unavailable(self, target: TargetLike) -> str | None:
        """Why this machine cannot build ``target`` (missing library or GPU), or None."""

    def preflight(self, intent: BuildIntent, target: TargetLike, options: Any) -> None:
        """Every refusal that can be decided before the artifact exists (run recipes)."""

    def check(self, artifact: Artifact, target: TargetLike, options: Any) -> Any:
        """Every refusal that needs no work, on the real artifact; returns the build plan."""

    def build(self, artifact: Artifact | str | Path, target: TargetLike, options: Any, out: str | Path, *,
              force: bool = False) -> Artifact:
        """``check``, then write the artifact into ``out`` atomically (trtforge.stage.StageOutput)."""

    def model_file(self, artifact: Artifact) -> Path:
        """The file its runtime loads (``model.onnx``, ``model.plan``, the first safetensors shard)."""

    def summary(self, artifact: Artifact) -> str:
        """One line for the CLI about an artifact this backend wrote (path, precision, key figures)."""

    def parity_runner(self, side: RunnerSide) -> tuple[Any, dict[str, Any]]:
        """The Polygraphy runner for ``side.artifact`` and a description of how it computes.

        Returns ``(runner, info)``: ``runner`` is a not-yet-activated Polygraphy runner
        (``OnnxrtRunner``, ``TrtRunner``) named ``side.role``, to be used inside ``with runner:``
        by a Polygraphy ``Comparator``; ``info`` is a JSON-able dict for the report with at
        least ``runner`` (e.g. "polygraphy OnnxrtRunner"), ``engine`` ("onnxruntime" |
        "tensorrt") and ``model_dtype``. Raises ParityError (one line) when the runtime is not
        usable here (no TensorRT or GPU) or the backend has no runner (``runs_parity`` False).
        """

    def load_check(self, artifact: Artifact, machine: Any, *, load: bool = False) -> Any:
        """Will ``artifact`` load on ``machine`` (engines.check.Machine)? An engines.check.LoadReport;
        with ``load`` it is also loaded (TensorRT deserialization, an ONNX Runtime session)."""

    def doctor(self, gpus: Any, tensorrt_available: bool) -> list[dict[str, Any]]:
        """The targets this backend can build on a machine with ``gpus`` (for ``trtforge doctor``)."""


def backend_for_target(target: TargetLike) -> Backend:
    """The backend that builds for ``target`` (a resolved target, not a name)."""
    return BACKENDS.get(target.backend)


def backend_for_artifact(artifact: Artifact) -> Backend:
    """The backend whose built artifact this is; for a plain ONNX artifact (export, quantize)
    the one that runs ONNX (cpu-ort). InputError when no backend claims it."""
    for b in BACKENDS:
        if b.owns(artifact):
            return b
    raise InputError(f"{artifact.path} ({artifact.manifest.kind}) is not an artifact any trtforge backend runs",
                     f"backends: {', '.join(BACKENDS.names())}")


def resolve_target(name: str, gpus: Any = None) -> TargetLike | None:
    """The target a backend claims for ``name``, or None (the caller names the choices)."""
    key = name.strip().lower()
    for b in BACKENDS:
        t = b.resolve(key, gpus)
        if t is not None:
            return t
    return None


def target_names() -> list[str]:
    return [n for b in BACKENDS for n in b.target_names()]


__all__ = ["BACKENDS", "Backend", "BuildIntent", "RunnerSide", "TargetLike", "backend_for_artifact",
           "backend_for_target", "resolve_target", "target_names"]
