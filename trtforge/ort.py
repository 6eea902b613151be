"""ONNX Runtime sessions the way every stage needs them (CPU by default, CUDA where asked)."""

from __future__ import annotations

import os
from pathlib import Path

from trtforge._deps import require
from trtforge.errors import InputError

# ONNX Runtime fuses DequantizeLinear(int4, block) + MatMul into MatMulNBits and, at its default
# accuracy level 4, quantizes the activations to int8 on the fly: W4A16 would then be measured
# as W4A8 (max error 0.6 instead of 2e-5 on a 96x40 test GEMM). Level 0 keeps the activations in
# float, which is what TensorRT's weight-only GEMMs compute.
EMULATION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}


def session(
    model: str | Path | bytes,
    *,
    providers: list[str] | None = None,
    config: dict[str, str] | None = None,
    threads: int | None = None,
    optimization: str | None = None,
):
    """An InferenceSession; ``config`` entries default to EMULATION_CONFIG."""
    ort = require("onnxruntime")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    for k, v in {**EMULATION_CONFIG, **(config or {})}.items():
        so.add_session_config_entry(k, str(v))
    if threads:
        so.intra_op_num_threads = threads
    if optimization:
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
    available = ort.get_available_providers()
    provs = [p for p in (providers or ["CPUExecutionProvider"]) if p in available] or ["CPUExecutionProvider"]
    src = model if isinstance(model, bytes) else os.fspath(model)
    try:
        return ort.InferenceSession(src, so, providers=provs)
    except Exception as exc:
        # A truncated or foreign file: ONNX Runtime raises InvalidProtobuf / Fail / NoSuchFile
        # (onnxruntime.capi.onnxruntime_pybind11_state); name the file, not the binding.
        kind = type(exc).__name__
        if kind in ("InvalidProtobuf", "NoSuchFile", "InvalidGraph") or (kind == "Fail" and _unreadable(str(exc))):
            where = "the given model bytes" if isinstance(model, bytes) else str(model)
            first = (str(exc).splitlines() or [""])[0][:160]
            raise InputError(f"ONNX Runtime cannot load {where} ({kind}: {first})",
                             "the file is truncated, corrupt or not ONNX; re-run the stage that wrote it") from None
        raise


def _unreadable(msg: str) -> bool:
    m = msg.lower()
    return any(w in m for w in ("protobuf", "parse", "external data", "no such file", "load model", "corrupt"))


def default_providers() -> list[str]:
    """CUDA first where onnxruntime-gpu and a GPU are present, else CPU."""
    ort = require("onnxruntime")
    avail = ort.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in avail else []) + ["CPUExecutionProvider"]
