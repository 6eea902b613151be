"""Export stage: Hugging Face model folder -> validated ONNX artifact.

In:  a local model folder (config.json, weights, tokenizer files) and ExportOptions.
Out: OUT_DIR with ``model.onnx`` (+ ``model.onnx.data`` for large models), the tokenizer and
     config files, and ``manifest.json`` (source hashes, I/O with dynamic axes, versions,
     timings, validation figures). Written to a temporary folder and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import onnx

from trtforge.architectures import Architecture
from trtforge.artifacts import OnnxArtifact, copy_side_files, hash_files, sha256_file
from trtforge.errors import InputError, TrtforgeError
from trtforge.exporter.validate import Case, validate
from trtforge.fp16 import convert_to_fp16
from trtforge.graph import GraphIndex, describe_io
from trtforge.inputs import (
    IOSpec,
    decoder_prefill_feeds,
    dummy_inputs,
    encoder_feeds,
    io_spec,
    pad_sequences,
    positions_from_mask,
    tokenize_batch,
)
from trtforge.manifest import IOInfo, ModelDims, ModelFile, SourceInfo, TensorInfo
from trtforge.onnx_io import (
    DATA_FILE,
    MODEL_FILE,
    DataFile,
    Weights,
    check_onnx,
    external_info,
    is_external,
    needs_external,
    tensor_nbytes,
    write_model,
)
from trtforge.ort import release_memory
from trtforge.registry import ARCHITECTURES
from trtforge.sample_text import SENTENCES
from trtforge.stage import StageOutput
from trtforge.vocab import Task

log = logging.getLogger(__name__)

# The export wrappers hold the Hugging Face model as attribute ``model``.
WRAPPER_PREFIX = "model."
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
_MAX16 = float(np.finfo(np.float16).max)


class DType(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"


OPSETS = range(14, 21)  # opsets the exporter writes: 14 to 20


@dataclass(frozen=True)
class ExportOptions:
    task: Task | None = None  # None: from config.json's architectures
    dtype: DType = DType.FP32
    opset: int = 17
    external_data: bool = False  # force external data even for small models
    validate: bool = True
    tolerance: float | None = None  # None: validate.TOLERANCE[dtype]
    seed: int = 0

    def __post_init__(self) -> None:
        # errors name the field; the CLI and recipe layers say which flag or key set it
        if self.task is not None and not isinstance(self.task, Task):
            object.__setattr__(self, "task", _enum(Task, self.task, "task"))
        if not isinstance(self.dtype, DType):
            object.__setattr__(self, "dtype", _enum(DType, self.dtype, "dtype"))
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or self.opset not in OPSETS:
            raise InputError(f"opset {self.opset} is not supported by the exporter",
                             f"use an opset from {OPSETS[0]} to {OPSETS[-1]} (default 17)")
        if self.tolerance is not None and not self.tolerance > 0:
            raise InputError(f"tolerance {self.tolerance} must be a positive number",
                             "leave tolerance unset for the dtype's default")

    def to_json(self) -> dict:
        d = asdict(self)
        d["task"] = self.task.value if self.task else None
        d["dtype"] = self.dtype.value
        return d


def _enum(cls: type[Enum], value: object, field: str):
    try:
        return cls(value)
    except ValueError:
        raise InputError(f"{field} {value!r} is not one the exporter knows",
                         f"use one of: {', '.join(str(m.value) for m in cls)}") from None


@dataclass(frozen=True)
class ModelSource:
    """A checked Hugging Face model folder: its config, architecture entry, task and weights."""

    folder: Path
    config: dict
    arch: Architecture
    task: Task
    weight_files: list[Path]


def inspect_source(folder: str | Path, task: Task | None = None) -> ModelSource:
    """Check a model folder before any heavy work; every problem is a one-line InputError."""
    folder = Path(folder).expanduser().resolve()
    if not folder.exists():
        raise InputError(f"model folder {folder} does not exist", "pass the folder that holds config.json and the weights")
    if not folder.is_dir():
        raise InputError(f"{folder} is a file, not a model folder", "pass the folder that holds config.json and the weights")
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise InputError(
            f"{folder} has no config.json, so it is not a Hugging Face model folder",
            "pass the folder written by save_pretrained()",
        )
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{cfg_path} is not valid JSON: {exc}", "restore the file from the model's source") from None
    model_type = config.get("model_type")
    arch = ARCHITECTURES.find(model_type) if isinstance(model_type, str) else None
    if arch is None:
        known = ", ".join(ARCHITECTURES.names())
        if config.get("auto_map"):
            raise InputError(
                f"model type {model_type!r} needs remote code from the model folder (auto_map in config.json), "
                "which trtforge never runs",
                f"use a model of a supported architecture: {known}",
            )
        raise InputError(
            f"unsupported architecture {model_type!r} ({', '.join(config.get('architectures') or []) or 'no architectures listed'})",
            f"supported model types: {known}",
        )
    if config.get("auto_map"):
        log.warning("config.json has auto_map; ignoring it and using transformers' own %s code", model_type)
    if task is None:
        task = arch.task_for(config.get("architectures"))
    elif task not in arch.tasks:
        raise InputError(
            f"task {task.value!r} is not supported for {model_type}",
            f"use one of: {', '.join(t.value for t in arch.tasks)}",
        )
    weights = sorted(p for pat in WEIGHT_PATTERNS for p in folder.glob(pat))
    if not weights:
        raise InputError(
            f"{folder} has no weight files (*.safetensors or pytorch_model*.bin)",
            "copy the weights into the folder",
        )
    return ModelSource(folder, config, arch, task, weights)


def pad_token_id(tokenizer, config: dict) -> int:
    for cand in (
        getattr(tokenizer, "pad_token_id", None),
        config.get("pad_token_id"),
        getattr(tokenizer, "eos_token_id", None),
        config.get("eos_token_id"),
    ):
        if isinstance(cand, list):
            cand = cand[0] if cand else None
        if cand is not None:
            return int(cand)
    return 0


def export_onnx(
    source: str | Path, out: str | Path, options: ExportOptions = ExportOptions(), *, force: bool = False
) -> OnnxArtifact:
    """Export ``source`` to ONNX in ``out``; returns the artifact. See module docstring."""
    src = inspect_source(source, options.task)
    stage = StageOutput(out, stage="export", kind="onnx", force=force)
    if src.folder == stage.path or src.folder in stage.path.parents:
        raise InputError(f"output folder {stage.path} is inside the model folder", "write the export somewhere else")

    from trtforge.exporter import _torch  # heavy: torch + transformers

    dims = ModelDims.from_config(src.config)
    tokenizer = _torch.load_tokenizer(src.folder)
    if tokenizer is None:
        log.warning("%s has no usable tokenizer: validation uses random token ids, and quantize and parity cannot "
                    "tokenize text for this artifact (they need pre-tokenized .npz data); copy the tokenizer files "
                    "into the model folder to fix it", src.folder)
    with_tt = (
        "token_type_ids" in getattr(tokenizer, "model_input_names", [])
        if tokenizer is not None
        else int(src.config.get("type_vocab_size", 0) or 0) > 1
    ) and not src.arch.is_decoder
    io = io_spec(src.task, dims, with_tt)

    with stage.timed("load_s"):
        model = _torch.load_model(src.folder, src.arch, src.task)
    wrapper = _torch.build_wrapper(model, src.arch, src.task, io.input_names, dims.num_layers)

    with stage.open() as tmp:
        raw_dir = tmp / "_raw"
        raw_dir.mkdir()
        # the attached weights go straight to a scratch data file, one tensor at a time: the
        # graph in memory refers to them and holds none
        scratch = DataFile(raw_dir / DATA_FILE)
        try:
            with stage.timed("export_s"):
                proto, weights_how = _torch.export(wrapper, dummy_inputs(src.task, dims, io, options.seed),
                                                   raw_dir / MODEL_FILE, io.output_names, io.dynamic_axes,
                                                   options.opset, data=scratch)
        finally:
            scratch.close()

        # PyTorch's outputs for validation now, then free the model: the weights are held once by
        # PyTorch, and once by ONNX Runtime after it, never both.
        expected: dict = {}
        cases: list[Case] = []
        if options.validate:
            with stage.timed("validate_s"):
                cases = validation_cases(src, io, dims, tokenizer)
                expected = {id(c.feeds): _torch.run(wrapper, c.feeds, io.output_names) for c in cases}
        del wrapper, model
        release_memory()

        with stage.timed("postprocess_s"):
            proto = name_weights(proto)
            weights = Weights(proto, raw_dir)
            if options.dtype == DType.FP16:
                proto = convert_to_fp16(proto, initializer_to16=_cast_to_fp16(weights))
                weights.rebind(proto)
            proto.producer_name = "trtforge"
            proto.doc_string = f"{src.config.get('model_type')} {src.task.value} exported by trtforge"
            external = _save(proto, weights, tmp, raw_dir, force_external=options.external_data)
            inputs, outputs = describe_io(proto.graph.input), describe_io(proto.graph.output)
            opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
            del proto, weights
            shutil.rmtree(raw_dir)

        with stage.timed("check_s"):
            check_onnx(tmp / MODEL_FILE)

        side = copy_side_files(src.folder, tmp)

        validation: dict = {"skipped": True}
        if options.validate:
            with stage.timed("validate_s"):
                validation = validate(tmp / MODEL_FILE, cases, expected, io.output_names, options.dtype.value,
                                      options.tolerance)
                validation["inputs"] = "real tokens" if tokenizer is not None else "random token ids (no tokenizer in folder)"

        m = stage.manifest
        m.source = SourceInfo(
            path=str(src.folder),
            architecture=(src.config.get("architectures") or [src.config["model_type"]])[0],
            model_type=src.config["model_type"],
            family=src.arch.family,
            task=src.task,
            weight_files=[p.name for p in src.weight_files],
            weights_sha256=hash_files(src.weight_files),
            config_sha256=sha256_file(src.folder / "config.json"),
        )
        m.model = ModelFile(
            file=MODEL_FILE,
            external_data=DATA_FILE if external else None,
            opset=opset,
            dtype=options.dtype.value,
            extra={"exporter": "torch.onnx.export(dynamo=False)", "weights": weights_how},
        )
        m.dims = dims
        m.io = IOInfo(
            inputs=[TensorInfo(**t) for t in inputs],
            outputs=[TensorInfo(**t) for t in outputs],
            dynamic_axes={n: {str(k): v for k, v in ax.items()} for n, ax in io.dynamic_axes.items()},
            padding_side=src.arch.padding_side,
            pad_token_id=pad_token_id(tokenizer, src.config),
        )
        m.set("tokenizer", {"files": [f for f in side if f != "config.json"], "loaded": tokenizer is not None})
        m.set("options", options.to_json())
        m.set("validation", validation)
        m.versions.update(_torch.library_versions())
    log.info("exported %s (%s, %s) to %s in %.1fs", src.folder.name, src.task.value, options.dtype.value, stage.path,
             m.timings["total_s"])
    return OnnxArtifact.open(stage.path)


def _cast_to_fp16(weights: Weights):
    """convert_to_fp16's initializer cast, recorded on ``weights`` (applied as each tensor is written)."""
    def cast(t: onnx.TensorProto) -> None:
        weights.transform(t, lambda a: np.clip(a, -_MAX16, _MAX16), np.float16)
    return cast


def _final_bytes(model: onnx.ModelProto) -> int:
    """Weight bytes as they will be written (a recorded FP16 cast halves an external FP32 tensor)."""
    total = 0
    for t in model.graph.initializer:
        if is_external(t) and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            total += int(np.prod(t.dims, dtype=np.int64)) * (2 if t.data_type == onnx.TensorProto.FLOAT16 else 4)
        else:
            total += tensor_nbytes(t)
    return total


def _save(model: onnx.ModelProto, weights: Weights, tmp: Path, raw_dir: Path, *, force_external: bool) -> bool:
    """Write ``tmp/model.onnx`` (+ ``model.onnx.data``) tensor by tensor from the scratch data in
    ``raw_dir``; returns whether the weights are external. An FP32 export whose weights are all in
    the scratch file keeps that file as its data file (renamed, not copied)."""
    external = force_external or needs_external(_final_bytes(model))
    scratch = raw_dir / DATA_FILE
    try:
        as_is = external and all(
            not weights.pending(t.name) and external_info(t).get("location") == DATA_FILE
            for t in model.graph.initializer if is_external(t))
        if as_is:
            os.replace(scratch, tmp / DATA_FILE)
            weights.base = tmp
            data = DataFile(tmp / DATA_FILE, append=True)  # small tensors the graph still holds go here
            try:
                write_model(model, tmp / MODEL_FILE, weights, external=True, data=data)
            finally:
                data.close()
        else:
            write_model(model, tmp / MODEL_FILE, weights, external=external)
    except OSError as exc:
        raise TrtforgeError(f"export: writing {tmp / MODEL_FILE} failed: {exc.strerror or exc}",
                            "check free disk space and permissions") from exc
    return external


def name_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give initializers the names of the PyTorch state dict.

    GEMM weights get their module's name (``onnx::MatMul_648`` ->
    ``model.layers.0.mlp.up_proj.weight``) and the export wrapper's ``model.`` prefix is dropped,
    so manifests, exclusion patterns and per-layer reports speak the names users know.
    """
    idx = GraphIndex(model)
    rename: dict[str, str] = {}
    taken = set(idx.initializers)
    for name in idx.initializers:
        if name.startswith(WRAPPER_PREFIX) and name[len(WRAPPER_PREFIX):] not in taken:
            rename[name] = name[len(WRAPPER_PREFIX):]
            taken.add(rename[name])
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        w = node.input[1]
        if w in idx.initializers and w.startswith("onnx::") and len(idx.consumers[w]) == 1 and node.name:
            parts = [p for p in node.name.strip("/").split("/") if p]
            if parts and parts[0] + "." == WRAPPER_PREFIX:
                parts = parts[1:]
            if len(parts) < 2:
                continue
            new = ".".join(parts[:-1]) + ".weight"
            if new not in taken:
                rename[w] = new
                taken.add(new)
    if not rename:
        return model
    for t in model.graph.initializer:
        if t.name in rename:
            t.name = rename[t.name]
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    return model


def validation_cases(src: ModelSource, io: IOSpec, dims: ModelDims, tokenizer) -> list[Case]:
    """At least two shapes from real tokens: one row unpadded, then a padded batch of three
    (right-padded for encoders, left-padded for decoders); decoders with past also a decode step."""
    pad_id = pad_token_id(tokenizer, src.config)
    side = src.arch.padding_side
    max_len = min(dims.max_positions, 64)
    texts_a = [SENTENCES[0]]
    texts_b = [SENTENCES[4], SENTENCES[3], SENTENCES[1]]  # long, very short, medium: real padding
    if tokenizer is not None:
        a = tokenize_batch(tokenizer, texts_a, side, max_len, pad_id)
        b = tokenize_batch(tokenizer, texts_b, side, max_len, pad_id)
    else:
        rng = np.random.default_rng(0)
        hi = dims.vocab_size

        def rand(n):
            return [int(x) for x in rng.integers(0, hi, n)]

        a = pad_sequences([rand(9)], side, pad_id, [[0] * 9])
        b = pad_sequences([rand(14), rand(3), rand(8)], side, pad_id, [[0] * 14, [0] * 3, [0] * 8])
    cases = []
    if not src.task.is_decoder:
        for name, (ids, mask, tt) in (("unpadded-1", a), (f"{side}-padded-3", b)):
            cases.append(Case(name, encoder_feeds(ids, mask, tt, io)))
        return cases
    for name, (ids, mask, _tt) in (("unpadded-1", a), (f"{side}-padded-3", b)):
        feeds = decoder_prefill_feeds(ids, mask, io, dims)
        if src.task == Task.CAUSAL_LM:
            feeds = {k: feeds[k] for k in io.input_names}
        cases.append(Case(("prefill-" if io.past_names else "") + name, feeds))
    if io.past_names:
        # A decode step on the padded batch with a past of real keys/values: zeros would hide
        # errors, so use deterministic random ones of a plausible scale.
        ids, mask, _ = b
        rng = np.random.default_rng(1)
        past_len = mask.shape[1]
        new_mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
        feeds = {
            "input_ids": rng.integers(1, dims.vocab_size, (mask.shape[0], 1)).astype(np.int64),
            "attention_mask": new_mask,
            "position_ids": positions_from_mask(new_mask, 1),
        }
        for n in io.past_names:
            feeds[n] = rng.standard_normal((mask.shape[0], dims.num_kv_heads, past_len, dims.head_dim)).astype(np.float32)
        cases.append(Case("decode-1-after-padded", feeds))
    return cases
