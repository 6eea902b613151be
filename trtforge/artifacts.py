"""Artifacts: the folders stages hand each other, their manifests, and atomic writes.

Every stage writes into a temporary sibling of its output folder and renames it into place
only when everything is written, so an interrupted or failed run never leaves a half-written
artifact behind. A manifest (``manifest.json``) records what a reviewer needs to trust the
folder: inputs and their hashes, options, tool versions, timings.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trtforge.errors import InputError, OutputExistsError, TrtforgeError
from trtforge.manifest import (  # noqa: F401  (re-exported)
    MANIFEST,
    MANIFEST_SCHEMA_VERSION,
    Manifest,
    ModelDims,
    TensorInfo,
    library_versions,
    now_iso,
)
from trtforge.onnx_io import load_model
from trtforge.vocab import Task

# Files copied from a Hugging Face folder into every ONNX artifact, so later stages can
# tokenize text and read the model config without the source folder.
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)


# --------------------------------------------------------------------------- hashing


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object, independent of key order."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def hash_files(paths: Iterable[Path], root: Path | None = None) -> str:
    """One hash over several files: names (relative to root) and contents, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        name = str(p.relative_to(root)) if root else p.name
        h.update(name.encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def file_table(folder: Path) -> dict[str, str]:
    """sha256 of every file in an artifact folder except the manifest itself."""
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def file_stats(folder: Path) -> dict[str, list[int]]:
    """[size, mtime_ns] of every file in an artifact folder except the manifest: the fast check."""
    return {
        str(p.relative_to(folder)): [p.stat().st_size, p.stat().st_mtime_ns]
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def verify_files(folder: Path, recorded: dict[str, str], stats: dict[str, list[int]] | None = None, *,
                 deep: bool = False) -> list[str]:
    """What differs between ``folder`` and the file table its manifest recorded (empty: intact).

    Sizes and modification times recorded with the table (``stats``) are the fast check; a file
    whose size or time differs, or every file with ``deep`` (or without ``stats``), is hashed.
    """
    folder = Path(folder)
    now = file_stats(folder)
    problems = []
    for name in sorted(set(recorded) - set(now)):
        problems.append(f"{name} is missing")
    for name in sorted(set(now) - set(recorded)):
        problems.append(f"{name} was added")
    for name in sorted(set(recorded) & set(now)):
        same_stat = stats is not None and stats.get(name) == now[name]
        if (deep or not same_stat) and sha256_file(folder / name) != recorded[name]:
            problems.append(f"{name} changed")
    return problems


# --------------------------------------------------------------------------- JSON


def write_json(path: Path, obj: Any) -> None:
    """Write JSON via a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, default=_json_default, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C, an object JSON cannot hold: no half file left behind
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _json_default(o: Any) -> Any:
    if hasattr(o, "to_json"):  # Manifest and its sections
        return o.to_json()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "value") and hasattr(o, "name"):  # Enum
        return o.value
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_json(path: Path, what: str = "file") -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} {path} is not valid JSON: {exc}", "regenerate it") from None


# --------------------------------------------------------------------------- atomic output


# Room the temporary sibling's name needs beyond the output folder's own name:
# ".{name}.tmp-{pid}-{8 random}" and ".{name}.old-{pid}".
_TMP_NAME_EXTRA = 32
_OS_HINTS = {
    errno.ENOSPC: "free disk space, or write the output to another disk",
    errno.EDQUOT: "free disk space (quota exceeded), or write the output elsewhere",
    errno.EROFS: "the file system is read-only: choose an -o on a writable disk",
    errno.EACCES: "choose an -o in a folder you can write",
    errno.EPERM: "choose an -o in a folder you can write (it may be immutable)",
    errno.ENAMETOOLONG: "choose a shorter output name",
    errno.EIO: "the disk reported an I/O error: check it, or write elsewhere",
}


def os_error(exc: OSError, doing: str) -> TrtforgeError:
    """A one-line error for an OSError while ``doing`` something (writing an artifact, ...)."""
    what = exc.strerror or str(exc)
    return TrtforgeError(f"{doing} failed: {what}", _OS_HINTS.get(exc.errno or 0, "check the path, disk space and permissions"))


def _trtforge_wrote(folder: Path) -> bool:
    """Whether ``folder`` is a trtforge output (artifact, report or pipeline folder) or empty."""
    if not any(folder.iterdir()):
        return True
    for marker in (MANIFEST, "report.json"):
        m = folder / marker
        if m.is_file():
            try:
                data = json.loads(m.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return False
            return isinstance(data, dict) and ("kind" in data or "verdict" in data or "schema_version" in data)
    return False


def check_output_dir(out: Path, *, force: bool, what: str = "output folder") -> Path:
    """Every check of an output location that needs no work; raises a one-line error.

    ``out`` must not be a file; it must not exist unless ``force``, and with ``force`` it must be
    something trtforge wrote (never a folder of the user's own files); its parent (the nearest
    existing ancestor) must be a writable folder, checked by creating and removing a probe; and its
    name must leave room for the temporary sibling's suffix within the file system's name limit.
    """
    out = Path(out).expanduser()
    try:
        out = out.resolve()
    except (OSError, RuntimeError) as exc:
        raise InputError(f"{what} {out} cannot be resolved ({exc})", "choose another -o") from None
    if out.exists() and not out.is_dir():
        raise InputError(f"{what} {out} exists and is not a folder", "choose another -o")
    if out.exists():
        if not force:
            raise OutputExistsError(out)
        if not _trtforge_wrote(out):
            raise InputError(f"{what} {out} holds files trtforge did not write, so --force will not replace it",
                             "choose another -o, or move those files away first")
    anc = out.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise InputError(f"{what} {out} cannot be created: {anc} is a file", "choose another -o")
    try:
        name_max = os.pathconf(anc, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    longest = max(len(p.encode()) for p in out.relative_to(anc).parts) if out != anc else 0
    if len(out.name.encode()) + _TMP_NAME_EXTRA > name_max or longest > name_max:
        raise InputError(f"{what} name {out.name[:40]}... is {len(out.name.encode())} bytes; this file system allows "
                         f"{name_max} and trtforge needs {_TMP_NAME_EXTRA} more for its temporary folder",
                         f"choose a name under {name_max - _TMP_NAME_EXTRA} bytes")
    try:
        probe = Path(tempfile.mkdtemp(prefix=".trtforge-probe-", dir=anc))
        probe.rmdir()
    except OSError as exc:
        raise os_error(exc, f"checking that {what} {out} can be written (in {anc})") from None
    return out


@contextlib.contextmanager
def atomic_output_dir(out: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out`` only if the block completes.

    On any exception (Ctrl-C included) the temporary folder is removed and ``out`` is left
    as it was; an OSError (full disk, read-only file system, ...) becomes a one-line error. With
    ``force`` an existing ``out`` is replaced only after the new one is complete.
    """
    out = check_output_dir(out, force=force)
    tmp: Path | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the artifact is an ordinary folder
        yield tmp
        if out.exists():
            if not force:  # someone else created it meanwhile
                raise OutputExistsError(out)
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            tmp = None
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
            tmp = None
    except OSError as exc:
        raise os_error(exc, f"writing {out}") from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale(out: Path) -> None:
    """Remove temporary folders of ``out`` left by a process that was killed (SIGKILL, power loss)."""
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        pid = p.name[len(f".{out.name}.tmp-"):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def base_manifest(stage: str, kind: str) -> dict[str, Any]:
    """Transitional: the dict form of :meth:`Manifest.new` (stages move to trtforge.stage)."""
    d = Manifest.new(stage, kind).to_json()
    d.pop("timings"), d.pop("files")
    return d


# --------------------------------------------------------------------------- artifacts


@dataclass(frozen=True)
class OnnxArtifact:
    """An ONNX model folder: ``model.onnx`` (+ external data), HF side files, manifest."""

    path: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model.file

    @property
    def dtype(self) -> str:
        return self.manifest.model.dtype

    @property
    def task(self) -> Task:
        return self.manifest.source.task

    @property
    def architecture(self) -> str:
        return self.manifest.source.architecture

    @property
    def model_type(self) -> str:
        return self.manifest.source.model_type

    @property
    def dims(self) -> ModelDims:
        return self.manifest.dims

    @property
    def inputs(self) -> list[TensorInfo]:
        return self.manifest.io.inputs

    @property
    def outputs(self) -> list[TensorInfo]:
        return self.manifest.io.outputs

    @property
    def precision(self) -> str:
        """What the graph computes in: fp32/fp16 for exports, the recipe's precision for quantized."""
        q = self.manifest.quantization
        return q.precision.value if q else self.dtype

    @property
    def quantized(self) -> bool:
        return self.manifest.quantization is not None

    @property
    def sha256(self) -> str:
        return self.manifest.files[self.manifest.model.file]

    def load(self, load_external_data: bool = True):  # -> onnx.ModelProto
        return load_model(self.model_path, load_external_data=load_external_data)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> OnnxArtifact:
        art = load_artifact(path)
        if not isinstance(art, OnnxArtifact):
            raise InputError(
                f"{path} is a {art.manifest.kind} artifact, not an ONNX artifact",
                "pass the folder written by 'trtforge export' or 'trtforge quantize'",
            )
        return art


@dataclass(frozen=True)
class EngineArtifact:
    """A TensorRT engine folder: ``model.plan``, layer info, manifest."""

    path: Path
    manifest: Manifest

    @property
    def engine_path(self) -> Path:
        return self.path / self.manifest.section("engine")["file"]


@dataclass(frozen=True)
class CheckpointArtifact:
    """A TensorRT-LLM checkpoint folder (Model Optimizer's unified HF format) and its manifest."""

    path: Path
    manifest: Manifest

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> CheckpointArtifact:
        art = load_artifact(path)
        if not isinstance(art, CheckpointArtifact):
            raise InputError(f"{Path(path).expanduser().resolve()} is not a checkpoint written by trtforge "
                             "export-checkpoint", "pass its output folder")
        return art


Artifact = OnnxArtifact | EngineArtifact | CheckpointArtifact
CHECKPOINT_KIND = "trtllm-checkpoint"


def load_artifact(path: str | os.PathLike[str]) -> Artifact:
    """Open an artifact folder written by any stage, checking it is complete."""
    folder = Path(path).expanduser().resolve()
    if not folder.exists():
        raise InputError(f"artifact folder {folder} does not exist", "check the path")
    if not folder.is_dir():
        raise InputError(f"{folder} is a file, not an artifact folder", "pass the folder a trtforge stage wrote")
    mpath = folder / MANIFEST
    if not mpath.exists():
        raise InputError(
            f"{folder} has no {MANIFEST}, so it was not written by trtforge (or not completely)",
            "pass the folder a trtforge stage wrote",
        )
    manifest = Manifest.read(mpath)
    kind = manifest.kind
    if kind == "onnx":
        art: Artifact = OnnxArtifact(folder, manifest)
        if manifest.model is None:
            raise InputError(f"{mpath} has no model section", "re-run the stage that wrote it")
        if not art.model_path.exists():
            raise InputError(f"{art.model_path} is missing from the artifact", "re-run the stage that wrote it")
        return art
    if kind == "engine":
        eng = EngineArtifact(folder, manifest)
        if not isinstance(manifest.section("engine"), dict) or not eng.engine_path.exists():
            raise InputError(f"the engine file of {folder} is missing", "re-run 'trtforge build'")
        return eng
    if kind == CHECKPOINT_KIND:
        return CheckpointArtifact(folder, manifest)
    raise InputError(f"{mpath} has unknown kind {kind!r}", "pass an export, quantize, build or checkpoint folder")


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer and config files; returns the names copied."""
    copied = []
    for name in HF_SIDE_FILES:
        p = Path(src) / name
        if p.is_file():
            shutil.copy2(p, Path(dst) / name)
            copied.append(name)
    return copied
