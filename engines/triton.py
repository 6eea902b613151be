"""Triton model repository layout: ``<name>/config.pbtxt`` and ``<name>/1/model.plan``.

In:  the model name, the artifact's I/O (names, dtypes, symbolic shapes from the manifest) and
     the optimization profile (its batch maximum becomes ``max_batch_size``).
Out: the text of ``config.pbtxt`` (platform ``tensorrt_plan``, or ``onnxruntime_onnx`` for the
     CPU target) and the relative paths of the model file and config.

Triton's rules (server docs, model_configuration.md): with ``max_batch_size > 0`` the full shape
is ``[-1] + dims``, so the batch axis must be the first axis of every input and output and is
left out of ``dims``; otherwise ``max_batch_size: 0`` and ``dims`` are the full shapes. Variable
dims are ``-1``. The TensorRT profile's batch max must cover ``max_batch_size``, so it is used
as is. Triton ignores files at the repository root, where trtforge keeps its manifest.
"""

from __future__ import annotations

import re

from trtforge.engines.profiles import BATCH, ShapeProfile
from trtforge.errors import InputError
from trtforge.manifest import IOInfo, Manifest

VERSION = "1"
PLATFORMS = {"tensorrt_plan": "model.plan", "onnxruntime_onnx": "model.onnx"}
DTYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
    "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int16": "TYPE_INT16", "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
}


def model_name_for(manifest: Manifest | dict, precision: str) -> str:
    """``llama-causal-lm-int8`` from the source model type, task and precision (typed manifest or JSON)."""
    if isinstance(manifest, Manifest):
        src = manifest.source
        parts = (src.model_type or "model", src.task) if src is not None else ("model", None)
    else:
        src_json = dict(manifest).get("source") or {}  # the JSON form (tests, scripts)
        parts = (src_json.get("model_type") or "model", src_json.get("task"))
    raw = "-".join(str(x) for x in (*parts, precision) if x)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", raw).strip("-.")
    return name or "model"


def model_file(name: str, platform: str) -> str:
    return f"{name}/{VERSION}/{PLATFORMS[platform]}"


def _dims(shape: list, skip_batch: bool) -> list[int]:
    dims = shape[1:] if skip_batch else shape
    return [d if isinstance(d, int) else -1 for d in dims]


def config_pbtxt(name: str, platform: str, io: IOInfo | dict, profile: ShapeProfile) -> str:
    if platform not in PLATFORMS:
        raise ValueError(platform)
    if not isinstance(io, IOInfo):
        io = IOInfo.from_json(io)
    tensors = list(io.inputs) + list(io.outputs)
    batched = bool(tensors) and all(t["shape"] and t["shape"][0] == BATCH for t in tensors)
    batch = profile.symbol(BATCH)
    max_batch = batch.max if batched and batch is not None else 0
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch}"]
    for section, items in (("input", io.inputs), ("output", io.outputs)):
        entries = []
        for t in items:
            dtype = DTYPES.get(t["dtype"])
            if dtype is None:
                raise InputError(f"{section} {t['name']} has dtype {t['dtype']}, which Triton has no type for",
                                 "export the model with float32/float16/int64/int32 I/O")
            dims = ", ".join(str(d) for d in _dims(t["shape"], max_batch > 0))
            entries.append(f'  {{\n    name: "{t["name"]}"\n    data_type: {dtype}\n    dims: [ {dims} ]\n  }}')
        lines.append(f"{section} [\n" + ",\n".join(entries) + "\n]")
    kind = "KIND_GPU" if platform == "tensorrt_plan" else "KIND_CPU"
    lines.append(f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]")
    if platform == "tensorrt_plan" and max_batch > 1:
        # Triton enables the dynamic batcher for TensorRT plans with max_batch_size > 1 anyway; say so.
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"
