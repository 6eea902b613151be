"""Typed manifests: one reader and one writer for ``manifest.json`` of every stage.

Stages build a :class:`Manifest` and its sections (:class:`SourceInfo`, :class:`ModelDims`,
:class:`IOInfo`, :class:`ModelFile`, :class:`QuantizationInfo`, :class:`Upstream`) and never
index raw dicts; readers get the same typed objects back from :meth:`Manifest.from_json`.

The JSON on disk is the one trtforge has always written (schema 1): every section round-trips
key for key, and keys a section does not model stay in its ``extra`` dict, so a manifest
written by another version of trtforge is never silently stripped. The one addition is a
top-level ``upstream`` on every derived artifact (quantize wrote it only under
``quantization.upstream``, which it still writes); the reader falls back to the old places, so
there is one answer to "where did this artifact come from".
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

from trtforge._version import __version__
from trtforge.errors import InputError
from trtforge.vocab import Family, Precision, Task

MANIFEST = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1


class Section:
    """A manifest section: typed fields plus ``extra`` for keys it does not model."""

    extra: dict[str, Any]
    # fields written only when not None (older manifests lack them)
    _optional: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_json(cls, data: dict | None):
        if data is None:
            return None
        if not isinstance(data, dict):
            raise InputError(f"manifest section {cls.__name__} is not an object", "regenerate the artifact")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: cls._decode(k, v) for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**kwargs, extra=extra)

    @classmethod
    def _decode(cls, key: str, value: Any) -> Any:
        return value

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if v is None and f.name in self._optional:
                continue
            out[f.name] = _plain(v)
        out.update(_plain(self.extra))
        return out

    def get(self, key: str, default: Any = None) -> Any:
        """Dict-style access for keys a section does not type (``extra``) or does."""
        if key != "extra" and key in {f.name for f in dataclasses.fields(self)}:
            return getattr(self, key)
        return self.extra.get(key, default)


def _plain(v: Any) -> Any:
    """JSON-ready form: sections and dataclasses to dicts, enums to values, paths to strings."""
    if isinstance(v, Section):
        return v.to_json()
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if hasattr(v, "value") and hasattr(v, "name") and not isinstance(v, type):  # Enum
        return v.value
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


# --------------------------------------------------------------------------- sections


@dataclass
class SourceInfo(Section):
    """The Hugging Face folder an export came from."""

    path: str
    architecture: str
    model_type: str
    family: Family
    task: Task
    weight_files: list[str] = field(default_factory=list)
    weights_sha256: str | None = None
    config_sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def _decode(cls, key, value):
        if key == "family":
            return Family(value)
        if key == "task":
            return Task(value)
        return value

    @property
    def is_decoder(self) -> bool:
        return self.family == Family.DECODER


@dataclass(frozen=True)
class ModelDims:
    """The numbers every stage needs about a model's shape."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    num_labels: int | None = None

    @classmethod
    def from_config(cls, cfg: dict) -> ModelDims:
        layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
        heads = cfg.get("num_attention_heads", cfg.get("n_head"))
        hidden = cfg.get("hidden_size", cfg.get("n_embd"))
        kv = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or hidden // heads
        max_pos = cfg.get("max_position_embeddings", cfg.get("n_positions", 2048))
        labels = len(cfg["id2label"]) if isinstance(cfg.get("id2label"), dict) else cfg.get("num_labels")
        return cls(int(layers), int(heads), int(kv), int(head_dim), int(hidden), int(cfg["vocab_size"]),
                   int(max_pos), labels)

    @classmethod
    def from_json(cls, data: dict | None) -> ModelDims | None:
        if data is None:
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # dict-style reads, for code that still passes dims around as a mapping
    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


@dataclass
class TensorInfo(Section):
    """One graph input or output: name, numpy dtype name, shape (ints and axis names)."""

    name: str
    dtype: str
    shape: list[int | str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.get(key)


@dataclass
class IOInfo(Section):
    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)
    dynamic_axes: dict[str, dict[str, str]] | None = None
    padding_side: str | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    _optional: ClassVar[tuple[str, ...]] = ("dynamic_axes", "padding_side", "pad_token_id")

    @classmethod
    def _decode(cls, key, value):
        if key in ("inputs", "outputs"):
            return [TensorInfo.from_json(t) for t in value]
        return value

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass
class ModelFile(Section):
    """The ONNX file of an artifact."""

    file: str
    external_data: str | None = None
    opset: int | None = None
    dtype: str | None = None  # fp32 | fp16 | bf16: what the unquantized rest computes in
    size_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    _optional: ClassVar[tuple[str, ...]] = ("size_bytes",)


@dataclass
class Upstream(Section):
    """The artifact this one was made from, by path and content hash."""

    path: str
    stage: str | None = None
    sha256: str | None = None  # of its model file (quantize wrote it as "sha256")
    model_sha256: str | None = None  # the same, as builds write it
    dtype: str | None = None
    manifest_sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    _optional: ClassVar[tuple[str, ...]] = ("stage", "sha256", "model_sha256", "dtype", "manifest_sha256")

    @property
    def folder(self) -> Path:
        return Path(self.path).expanduser().resolve()

    @property
    def model_hash(self) -> str | None:
        return self.model_sha256 or self.sha256


@dataclass
class QuantizationInfo(Section):
    """What quantize did: the recipe's precision and options, calibration data, per-GEMM record."""

    precision: Precision
    recipe: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    upstream: Upstream | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    _optional: ClassVar[tuple[str, ...]] = ("upstream",)

    @classmethod
    def _decode(cls, key, value):
        if key == "precision":
            return Precision.parse(value)
        if key == "upstream":
            return Upstream.from_json(value)
        return value

    @property
    def nodes(self) -> list[dict[str, Any]]:
        return self.extra.get("nodes") or []

    @property
    def layers(self) -> list[dict[str, Any]]:
        """With a budget: every GEMM as {name, group, precision, sensitivity, reason, weight_bytes}."""
        return self.extra.get("layers") or []

    @property
    def budget(self) -> dict[str, Any] | None:
        """With a budget: {metric, limit, measured, measured_all_quantized, held_out_samples, met, ...}."""
        return self.extra.get("budget")


# --------------------------------------------------------------------------- manifest


_TYPED = {
    "source": SourceInfo,
    "dims": ModelDims,
    "io": IOInfo,
    "model": ModelFile,
    "quantization": QuantizationInfo,
    "upstream": Upstream,
}


# A TensorRT-LLM checkpoint's "source" names the quantized artifact it came from, not a HF folder.
_UNTYPED_BY_KIND = {"trtllm-checkpoint": frozenset({"source"})}


@dataclass
class Manifest:
    """A whole ``manifest.json``. Typed sections are attributes; other sections stay in ``sections``."""

    kind: str  # onnx | engine | trtllm-checkpoint
    stage: str  # export | quantize | build | export-checkpoint
    schema_version: int = MANIFEST_SCHEMA_VERSION
    created_at: str = ""
    versions: dict[str, str | None] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)
    source: SourceInfo | None = None
    dims: ModelDims | None = None
    io: IOInfo | None = None
    model: ModelFile | None = None
    quantization: QuantizationInfo | None = None
    upstream: Upstream | None = None
    timings: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    # every other top-level key (tokenizer, options, validation, target, build, ...), in order
    sections: dict[str, Any] = field(default_factory=dict)

    _HEAD: ClassVar[tuple[str, ...]] = ("schema_version", "kind", "stage", "created_at", "versions", "host")

    # ---------------------------------------------------------------- writer side

    @classmethod
    def new(cls, stage: str, kind: str) -> Manifest:
        return cls(kind=kind, stage=stage, created_at=now_iso(), versions=library_versions(),
                   host={"platform": platform.platform(), "machine": platform.machine(), "argv": sys.argv[:1]})

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: _plain(getattr(self, k)) for k in self._HEAD}
        for key in ("source", "dims", "io", "model"):
            if getattr(self, key) is not None:
                out[key] = _plain(getattr(self, key))
            elif key in self.sections:  # untyped for this kind
                out[key] = _plain(self.sections[key])
        for key, value in self.sections.items():
            out.setdefault(key, _plain(value))
        for key in ("quantization", "upstream"):
            if getattr(self, key) is not None:
                out[key] = _plain(getattr(self, key))
        out["timings"] = {k: round(float(v), 3) for k, v in self.timings.items()}
        out["files"] = dict(self.files)
        return out

    def write(self, path: Path) -> None:
        from trtforge.artifacts import write_json  # the one atomic JSON writer

        write_json(path, self.to_json())

    # ---------------------------------------------------------------- reader side

    @classmethod
    def from_json(cls, data: dict[str, Any], *, where: str = "manifest") -> Manifest:
        if not isinstance(data, dict) or "kind" not in data:
            raise InputError(f"{where} is not a trtforge manifest", "pass the folder a trtforge stage wrote")
        if data.get("schema_version", 0) > MANIFEST_SCHEMA_VERSION:
            raise InputError(f"{where} was written by a newer trtforge (manifest schema {data['schema_version']})",
                             "upgrade trtforge")
        kw: dict[str, Any] = {k: data[k] for k in cls._HEAD if k in data}
        kw.setdefault("stage", data.get("stage", ""))
        sections: dict[str, Any] = {}
        untyped = _UNTYPED_BY_KIND.get(data["kind"], frozenset())
        try:
            for key, value in data.items():
                if key in cls._HEAD:
                    continue
                if key in _TYPED and key not in untyped:
                    kw[key] = _TYPED[key].from_json(value)
                elif key in ("timings", "files"):
                    kw[key] = value or {}
                else:
                    sections[key] = value
        except (TypeError, ValueError, KeyError) as exc:
            raise InputError(f"{where} has a malformed section ({exc})", "regenerate the artifact") from None
        return cls(**kw, sections=sections)

    @classmethod
    def read(cls, path: Path) -> Manifest:
        from trtforge.artifacts import read_json

        return cls.from_json(read_json(path, "manifest"), where=str(path))

    # ---------------------------------------------------------------- JSON view
    # Read-only dict access to the JSON on disk (``m["build"]["self_check"]``), for tests, scripts
    # and readers outside trtforge. trtforge's own code reads the typed attributes instead (a test
    # checks the source for ``manifest[``).

    def __getitem__(self, key: str) -> Any:
        data = self.to_json()
        if key not in data:
            raise KeyError(key)
        return data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_json().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.to_json()

    def __eq__(self, other: object) -> bool:
        """Equal to another Manifest or to a JSON dict with the same content (``json.load`` of the file)."""
        if isinstance(other, Manifest):
            return self.to_json() == other.to_json()
        if isinstance(other, dict):
            return self.to_json() == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  (mutable)

    # ---------------------------------------------------------------- queries

    def section(self, key: str, default: Any = None) -> Any:
        """An untyped section (``tokenizer``, ``options``, ``target``, ``build``, ...)."""
        return self.sections.get(key, default)

    def set(self, key: str, value: Any) -> None:
        if key in _TYPED or key in ("timings", "files"):
            setattr(self, key, value)
        else:
            self.sections[key] = value

    @property
    def origin(self) -> Upstream | None:
        """Where this artifact came from: ``upstream``, else ``quantization.upstream`` (schema 1)."""
        if self.upstream is not None:
            return self.upstream
        if self.quantization is not None and self.quantization.upstream is not None:
            return self.quantization.upstream
        b = self.sections.get("build")
        if isinstance(b, dict) and isinstance(b.get("upstream"), dict) and "path" in b["upstream"]:
            return Upstream.from_json(b["upstream"])
        return None

    @property
    def precision(self) -> Precision | None:
        """Quantized: the recipe's precision; a build: its precision record; an export: its dtype."""
        if self.quantization is not None:
            return self.quantization.precision
        p = self.sections.get("precision")
        if isinstance(p, dict):
            p = p.get("precision")
        if isinstance(p, str):
            return Precision.lookup(p)
        if self.model is not None and self.model.dtype:
            return Precision.lookup(self.model.dtype)
        return None


# --------------------------------------------------------------------------- environment


_VERSIONED = (
    "torch",
    "transformers",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "polygraphy",
    "numpy",
    "ml_dtypes",
    "tensorrt",
    "nvidia-modelopt",
)


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries that shape an artifact, read without importing them."""
    out: dict[str, str | None] = {"trtforge": __version__, "python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name not in ("onnxruntime-gpu", "tensorrt", "nvidia-modelopt"):
                out[name] = None
    return out


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def dumps(m: Manifest) -> str:
    return json.dumps(m.to_json(), indent=2)
