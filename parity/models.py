"""The two sides of a parity check: what each artifact is, and the Polygraphy runner that runs it.

In:  an artifact folder (export, quantize, CPU build: kind "onnx"; TensorRT build: kind "engine").
Out: :class:`ModelSide` — task, I/O, dims, tokenizer folder, precision and hashes, read from the
     artifact's manifest or, for folders that do not repeat them (engines), from the upstream
     artifact it names — and ``make_runner()``: Polygraphy's ``OnnxrtRunner`` over a
     ``trtforge.ort.session`` (honouring a CPU build's recorded ``runtime``), or ``TrtRunner``
     over ``model.plan`` where TensorRT and a GPU exist.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trtforge.artifacts import EngineArtifact, OnnxArtifact, load_artifact, sha256_file
from trtforge.errors import InputError, ParityError
from trtforge.manifest import Manifest

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model")
# Skip the "how did ONNX Runtime execute it" analysis above this size: it saves a second copy.
ANALYSIS_MAX_BYTES = 1 << 30
# Ops that only move or reshape data: running them through float32 casts changes no value.
_DATA_MOVEMENT = {"Reshape", "Transpose", "Concat", "Shape", "Unsqueeze", "Squeeze", "Gather", "Slice", "Expand",
                  "Where", "Split", "Identity", "Flatten", "Tile", "GatherElements", "ScatterND", "Pad"}
_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}


@dataclass(frozen=True)
class ModelSide:
    """One side of the comparison (reference or candidate)."""

    role: str
    artifact: OnnxArtifact | EngineArtifact
    lineage: tuple[tuple[Path, dict], ...]  # (folder, manifest): the artifact, then its upstreams

    @property
    def manifest(self) -> dict:
        return self.artifact.manifest

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    def find(self, key: str) -> Any:
        """The first manifest in the lineage that has ``key``."""
        for _, m in self.lineage:
            if key in m:
                return m[key]
        return None

    @property
    def task(self) -> str:
        src = self.find("source") or {}
        if "task" not in src:
            raise ParityError(f"{self.artifact.path} does not record its task", "pass artifacts written by trtforge")
        return src["task"]

    @property
    def io(self) -> dict:
        io = self.find("io")
        if not io:
            raise ParityError(f"{self.artifact.path} does not record its inputs and outputs", "pass artifacts written by trtforge")
        return io

    @property
    def dims(self) -> dict:
        dims = self.find("dims")
        if not dims:
            raise ParityError(f"{self.artifact.path} does not record the model's dimensions", "pass artifacts written by trtforge")
        return dims

    @property
    def input_names(self) -> list[str]:
        return [i["name"] for i in self.io["inputs"]]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.io["outputs"]]

    @property
    def padding_side(self) -> str:
        side = self.io.get("padding_side")
        if side in ("left", "right"):
            return side
        return "left" if (self.find("source") or {}).get("family") == "decoder" else "right"

    @property
    def pad_token_id(self) -> int:
        return int(self.io.get("pad_token_id") or 0)

    @property
    def quantization(self) -> dict | None:
        return self.find("quantization")

    @property
    def precision(self) -> str:
        for _, m in self.lineage:
            value = _precision_of(m)
            if value:
                return value
        return "unknown"

    @property
    def model_file(self) -> Path:
        if isinstance(self.artifact, EngineArtifact):
            return self.artifact.engine_path
        return self.artifact.model_path

    def tokenizer_dir(self) -> Path | None:
        for folder, _ in self.lineage:
            if any((folder / n).is_file() for n in TOKENIZER_FILES):
                return folder
        return None

    def tokenizer_hash(self) -> str | None:
        folder = self.tokenizer_dir()
        if folder is None:
            return None
        from trtforge.artifacts import hash_files

        return hash_files([folder / n for n in TOKENIZER_FILES if (folder / n).is_file()], folder)

    def describe(self) -> dict[str, Any]:
        files = [self.model_file]
        ext = (self.manifest.get("model") or {}).get("external_data")
        if ext and (self.artifact.path / ext).is_file():
            files.append(self.artifact.path / ext)
        hashes = {p.name: sha256_file(p) for p in files}
        return {
            "path": str(self.artifact.path),
            "kind": self.kind,
            "stage": self.manifest.get("stage"),
            "precision": self.precision,
            "task": self.task,
            "model_file": self.model_file.name,
            "model_sha256": hashes[self.model_file.name],
            "files_sha256": hashes,
            "manifest_sha256": sha256_file(self.artifact.path / "manifest.json"),
            "upstream": [str(f) for f, _ in self.lineage[1:]],
        }


def _precision_of(m: dict) -> str | None:
    """Quantized: the recipe's precision; a build: its record ({"precision": ...}); an export: its dtype."""
    q = (m.get("quantization") or {}).get("precision")
    if isinstance(q, str):
        return q
    p = m.get("precision")
    if isinstance(p, dict):
        p = p.get("precision")
    if isinstance(p, str):
        return p
    d = (m.get("model") or {}).get("dtype")
    return d if isinstance(d, str) else None


def open_side(path: str | os.PathLike[str] | OnnxArtifact | EngineArtifact, role: str) -> ModelSide:
    """Open an artifact (one-line InputError naming the role when it is missing or incomplete)."""
    if isinstance(path, (OnnxArtifact, EngineArtifact)):
        art = path
    else:
        try:
            art = load_artifact(path)
        except InputError as exc:
            raise InputError(f"{role}: {exc.problem}", exc.hint) from None
    lineage = [(art.path, art.manifest)]
    seen = {art.path}
    while len(lineage) < 4:
        up = _upstream_path(lineage[-1][1])
        if up is None or up in seen or not (up / "manifest.json").is_file():
            break
        try:
            up_art = load_artifact(up)
        except InputError:
            break
        lineage.append((up_art.path, up_art.manifest))
        seen.add(up_art.path)
    return ModelSide(role, art, tuple(lineage))


def _upstream_path(manifest: dict) -> Path | None:
    """Where an artifact says it came from (quantize: quantization.upstream; build: upstream)."""
    if isinstance(manifest, Manifest):
        up = manifest.origin
        return up.folder if up is not None else None
    for holder in (manifest, manifest.get("quantization") or {}, manifest.get("build") or {}):
        up = holder.get("upstream") if isinstance(holder, dict) else None
        if isinstance(up, dict) and isinstance(up.get("path"), str):
            return Path(up["path"]).expanduser().resolve()
        if isinstance(up, str):
            return Path(up).expanduser().resolve()
    return None


def profile_limits(side: ModelSide) -> dict[str, tuple[int, int]]:
    """(min, max) of each dynamic axis a TensorRT engine was built for (its manifest's profile)."""
    if side.kind != "engine":
        return {}
    symbols = (side.manifest.get("profile") or {}).get("symbols") or {}
    out = {}
    for name, rng in symbols.items():
        if isinstance(rng, (list, tuple)) and len(rng) == 3 and all(isinstance(x, int) for x in rng):
            out[name] = (rng[0], rng[2])
    return out


def onnx_signature(side: ModelSide) -> dict[str, str]:
    """Input name -> element type ("int64", "float16", ...) as the graph declares them."""
    if side.kind != "onnx":
        return {i["name"]: i.get("dtype", "unknown") for i in side.io["inputs"]}
    import onnx
    from onnx import helper

    model = onnx.load(str(side.model_file), load_external_data=False)
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
    rv, cv = ref.dims.get("vocab_size"), cand.dims.get("vocab_size")
    if rv and cv and rv != cv:
        raise ParityError(f"vocabulary sizes differ (reference {rv}, candidate {cv})", "compare artifacts of the same model")
    rt, ct = ref.tokenizer_hash(), cand.tokenizer_hash()
    if rt and ct and rt != ct:
        raise ParityError("reference and candidate ship different tokenizer files", "compare artifacts of the same model")
    rw = (ref.find("source") or {}).get("weights_sha256")
    cw = (cand.find("source") or {}).get("weights_sha256")
    if rw and cw and rw != cw:
        notes.append("reference and candidate were exported from different weight files (source.weights_sha256)")
    return notes


# --------------------------------------------------------------------------- runners


def make_runner(side: ModelSide) -> tuple[Any, dict[str, Any]]:
    """A Polygraphy runner for the side and a description of how it computes (for the report)."""
    if isinstance(side.artifact, EngineArtifact):
        return _trt_runner(side)
    return _ort_runner(side)


def _ort_runner(side: ModelSide) -> tuple[Any, dict[str, Any]]:
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from trtforge.ort import EMULATION_CONFIG, session

    runtime = side.manifest.get("runtime") or {}  # a CPU build records how it must be run
    provider = runtime.get("provider") or "CPUExecutionProvider"
    config = {str(k): str(v) for k, v in (runtime.get("session_config") or {}).items()}
    level = _opt_level(runtime.get("graph_optimization_level"))
    try:
        sess = session(side.model_file, providers=[provider], config=config, optimization=level)
    except Exception as exc:  # ORT raises its own exception types for unloadable graphs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ParityError(f"ONNX Runtime cannot load the {side.role} {side.model_file}: {first[:300]}",
                          "check the artifact with 'onnx.checker' or re-run the stage that wrote it") from None
    desc: dict[str, Any] = {
        "runner": "polygraphy OnnxrtRunner",
        "engine": "onnxruntime",
        "providers": list(sess.get_providers()),
        "model_dtype": (side.manifest.get("model") or {}).get("dtype", side.precision),
        "session_config": {**EMULATION_CONFIG, **config},
        "graph_optimization_level": level or "ORT_ENABLE_ALL (default)",
        "from_build_runtime": bool(runtime),
    }
    if provider not in desc["providers"]:
        desc["note"] = f"{provider} (recorded by the build) is not available here; ran on {desc['providers'][0]}"
    desc.update(_execution_analysis(side, desc["providers"][0], {**EMULATION_CONFIG, **config}, level))
    return OnnxrtRunner(sess, name=side.role), desc


def _opt_level(value: Any) -> str | None:
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


def _execution_analysis(side: ModelSide, provider: str, config: dict[str, str], level: str | None) -> dict[str, Any]:
    """How ONNX Runtime really executes the graph: FP16 ops it runs through FP32 casts, and the
    quantized kernels it fuses Q/DQ into. Read from the graph ORT saves after partitioning."""
    ext = (side.manifest.get("model") or {}).get("external_data")
    size = side.model_file.stat().st_size + (
        (side.artifact.path / ext).stat().st_size if ext and (side.artifact.path / ext).is_file() else 0)
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


def _trt_runner(side: ModelSide) -> tuple[Any, dict[str, Any]]:
    from trtforge.env import gpus, tensorrt_status

    status = tensorrt_status()
    if not status["available"] or not gpus():
        raise ParityError(
            f"the {side.role} is a TensorRT engine, which needs TensorRT and an NVIDIA GPU "
            f"({'no GPU found' if status['available'] else status['reason']})",
            "run parity on the GPU machine the engine was built for (pip install 'trtforge[gpu]')",
        )
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    engine = EngineFromBytes(side.model_file.read_bytes())
    g = gpus()[0]
    return TrtRunner(engine, name=side.role), {
        "runner": "polygraphy TrtRunner",
        "engine": "tensorrt",
        "tensorrt": status.get("version"),
        "gpu": f"{g.name} (compute capability {g.compute_capability})",
        "model_dtype": side.precision,
    }
