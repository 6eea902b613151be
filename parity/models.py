"""The two sides of a parity check: what each artifact is, and the Polygraphy runner that runs it.

In:  an artifact folder (export, quantize, CPU build: kind "onnx"; TensorRT build: kind "engine").
Out: :class:`ModelSide` — task, I/O, dims, tokenizer folder, precision and hashes, read from the
     artifact's typed manifest or, for folders that do not repeat them (engines), from the
     artifacts it came from (``Manifest.origin``, followed up the lineage) — and
     ``make_runner()``: the runner of the backend that owns the artifact
     (``trtforge.backend.backend_for_artifact(...).parity_runner(side)``): Polygraphy's
     ``OnnxrtRunner`` for ONNX artifacts (honouring a CPU build's recorded ``runtime``), or
     ``TrtRunner`` over ``model.plan`` where TensorRT and a GPU exist.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnx import helper

from trtforge.artifacts import (
    MANIFEST,
    Artifact,
    CheckpointArtifact,
    EngineArtifact,
    OnnxArtifact,
    hash_files,
    load_artifact,
    sha256_file,
)
from trtforge.backend import backend_for_artifact
from trtforge.errors import InputError, ParityError
from trtforge.manifest import IOInfo, Manifest, ModelDims, QuantizationInfo, SourceInfo
from trtforge.onnx_io import load_model
from trtforge.vocab import Task

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model")
# How far open_side follows Manifest.origin: build -> quantize -> export is three.
MAX_LINEAGE = 4


@dataclass(frozen=True)
class ModelSide:
    """One side of the comparison (reference or candidate)."""

    role: str
    artifact: Artifact
    lineage: tuple[tuple[Path, Manifest], ...]  # (folder, manifest): the artifact, then where it came from

    @property
    def manifest(self) -> Manifest:
        return self.artifact.manifest

    @property
    def kind(self) -> str:
        return self.manifest.kind

    def _first(self, section: str) -> Any:
        """The first manifest in the lineage that has the typed ``section``."""
        for _, m in self.lineage:
            value = getattr(m, section)
            if value is not None:
                return value
        return None

    @property
    def source(self) -> SourceInfo | None:
        return self._first("source")

    @property
    def task(self) -> Task:
        src = self.source
        if src is None:
            raise ParityError(f"{self.artifact.path} does not record its task", "pass artifacts written by trtforge")
        return src.task

    @property
    def io(self) -> IOInfo:
        io = self._first("io")
        if io is None or not io.inputs:
            raise ParityError(f"{self.artifact.path} does not record its inputs and outputs", "pass artifacts written by trtforge")
        return io

    @property
    def dims(self) -> ModelDims:
        dims = self._first("dims")
        if dims is None:
            raise ParityError(f"{self.artifact.path} does not record the model's dimensions", "pass artifacts written by trtforge")
        return dims

    @property
    def input_names(self) -> list[str]:
        return self.io.input_names()

    @property
    def output_names(self) -> list[str]:
        return self.io.output_names()

    @property
    def padding_side(self) -> str:
        side = self.io.padding_side
        if side in ("left", "right"):
            return side
        return "left" if self.source is not None and self.source.is_decoder else "right"

    @property
    def pad_token_id(self) -> int:
        return int(self.io.pad_token_id or 0)

    @property
    def quantization(self) -> QuantizationInfo | None:
        return self._first("quantization")

    @property
    def precision(self) -> str:
        """The first precision the lineage records (Manifest.precision), as its name."""
        for _, m in self.lineage:
            if m.precision is not None:
                return m.precision.value
        return "unknown"

    @property
    def model_file(self) -> Path:
        if isinstance(self.artifact, OnnxArtifact):
            return self.artifact.model_path
        if isinstance(self.artifact, EngineArtifact):
            return self.artifact.engine_path
        raise ParityError(f"the {self.role} {self.artifact.path} is a {self.kind} artifact, which parity cannot run",
                          "compare an export, quantize or build folder")

    @property
    def external_data(self) -> Path | None:
        ext = self.manifest.model.external_data if self.manifest.model is not None else None
        return self.artifact.path / ext if ext and (self.artifact.path / ext).is_file() else None

    def tokenizer_dir(self) -> Path | None:
        for folder, _ in self.lineage:
            if any((folder / n).is_file() for n in TOKENIZER_FILES):
                return folder
        return None

    def tokenizer_hash(self) -> str | None:
        folder = self.tokenizer_dir()
        if folder is None:
            return None
        return hash_files([folder / n for n in TOKENIZER_FILES if (folder / n).is_file()], folder)

    def describe(self) -> dict[str, Any]:
        files = [self.model_file] + ([self.external_data] if self.external_data else [])
        hashes = {p.name: sha256_file(p) for p in files}
        return {
            "path": str(self.artifact.path),
            "kind": self.kind,
            "stage": self.manifest.stage,
            "precision": self.precision,
            "task": self.task.value,
            "model_file": self.model_file.name,
            "model_sha256": hashes[self.model_file.name],
            "files_sha256": hashes,
            "manifest_sha256": sha256_file(self.artifact.path / MANIFEST),
            "upstream": [str(f) for f, _ in self.lineage[1:]],
        }


def open_side(path: str | os.PathLike[str] | Artifact, role: str) -> ModelSide:
    """Open an artifact (one-line InputError naming the role when it is missing or incomplete),
    and the artifacts it came from, following ``Manifest.origin``."""
    if isinstance(path, (OnnxArtifact, EngineArtifact, CheckpointArtifact)):
        art = path
    else:
        try:
            art = load_artifact(path)
        except InputError as exc:
            raise InputError(f"{role}: {exc.problem}", exc.hint) from None
    lineage = [(art.path, art.manifest)]
    seen = {art.path}
    while len(lineage) < MAX_LINEAGE:
        origin = lineage[-1][1].origin
        up = origin.folder if origin is not None else None
        if up is None or up in seen or not (up / MANIFEST).is_file():
            break
        try:
            up_art = load_artifact(up)
        except InputError:
            break
        lineage.append((up_art.path, up_art.manifest))
        seen.add(up_art.path)
    return ModelSide(role, art, tuple(lineage))


def profile_limits(side: ModelSide) -> dict[str, tuple[int, int]]:
    """(min, max) of each dynamic axis a TensorRT engine was built for (its manifest's profile)."""
    if side.kind != "engine":
        return {}
    symbols = (side.manifest.section("profile") or {}).get("symbols") or {}
    out = {}
    for name, rng in symbols.items():
        if isinstance(rng, (list, tuple)) and len(rng) == 3 and all(isinstance(x, int) for x in rng):
            out[name] = (rng[0], rng[2])
    return out


def onnx_signature(side: ModelSide) -> dict[str, str]:
    """Input name -> element type ("int64", "float16", ...) as the graph declares them."""
    if side.kind != "onnx":
        return {t.name: t.dtype or "unknown" for t in side.io.inputs}
    model = load_model(side.model_file, load_external_data=False)
    init = {t.name for t in model.graph.initializer}
    return {
        i.name: helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name
        for i in model.graph.input
        if i.name not in init
    }


def _kind(dtype: str) -> str:
    d = dtype.lower()
    if "float" in d or d.startswith(("fp", "bf")):
        return "float"
    if "int" in d or d == "bool":
        return "int"
    return d


def check_compatible(ref: ModelSide, cand: ModelSide) -> list[str]:
    """Raise ParityError when the two models cannot be compared; returns notes for the report."""
    notes: list[str] = []
    if ref.task != cand.task:
        raise ParityError(
            f"reference is a {ref.task} model but the candidate is {cand.task}",
            "compare artifacts exported with the same --task",
        )
    rs, cs = onnx_signature(ref), onnx_signature(cand)
    if set(rs) != set(cs):
        missing, extra = sorted(set(rs) - set(cs)), sorted(set(cs) - set(rs))
        parts = ([f"candidate lacks {', '.join(missing)}"] if missing else []) + (
            [f"candidate has extra {', '.join(extra)}"] if extra else [])
        raise ParityError(
            f"reference and candidate take different inputs ({'; '.join(parts)})",
            "compare artifacts of the same model and task (same export options)",
        )
    differ: dict[tuple[str, str], list[str]] = {}
    for name in rs:
        if _kind(rs[name]) != _kind(cs[name]):
            raise ParityError(
                f"input {name!r} is {rs[name]} in the reference but {cs[name]} in the candidate",
                "compare artifacts of the same model and task",
            )
        if rs[name] != cs[name]:
            differ.setdefault((rs[name], cs[name]), []).append(name)
    for (rd, cd), names in differ.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        notes.append(f"input(s) {shown} are {rd} in the reference and {cd} in the candidate; "
                     "the same values are cast to each model's type")
    missing_out = sorted(set(ref.output_names) - set(cand.output_names))
    if missing_out:
        raise ParityError(
            f"the candidate lacks output(s) {', '.join(missing_out)} of the reference",
            "compare artifacts of the same model and task",
        )
    rv, cv = ref.dims.vocab_size, cand.dims.vocab_size
    if rv and cv and rv != cv:
        raise ParityError(f"vocabulary sizes differ (reference {rv}, candidate {cv})", "compare artifacts of the same model")
    rt, ct = ref.tokenizer_hash(), cand.tokenizer_hash()
    if rt and ct and rt != ct:
        raise ParityError("reference and candidate ship different tokenizer files", "compare artifacts of the same model")
    rw = ref.source.weights_sha256 if ref.source is not None else None
    cw = cand.source.weights_sha256 if cand.source is not None else None
    if rw and cw and rw != cw:
        notes.append("reference and candidate were exported from different weight files (source.weights_sha256)")
    return notes


# --------------------------------------------------------------------------- runners


def make_runner(side: ModelSide) -> tuple[Any, dict[str, Any]]:
    """A Polygraphy runner for the side and a description of how it computes (for the report):
    whatever the backend that owns the artifact gives (trtforge.backend: cpu-ort runs every ONNX
    artifact, tensorrt its engines)."""
    return backend_for_artifact(side.artifact).parity_runner(side)
