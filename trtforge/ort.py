"""ONNX Runtime sessions the way every stage needs them (CPU by default, CUDA where asked)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import tempfile
from pathlib import Path

import onnx

from trtforge._deps import require
from trtforge.errors import InputError
from trtforge.onnx_io import Weights, embedded_bytes, has_external_data, save_streaming, write_model

# ONNX Runtime fuses DequantizeLinear(int4, block) + MatMul into MatMulNBits and, at its default
# accuracy level 4, quantizes the activations to int8 on the fly: W4A16 would then be measured
# as W4A8 (max error 0.6 instead of 2e-5 on a 96x40 test GEMM). Level 0 keeps the activations in
# float, which is what TensorRT's weight-only GEMMs compute.
#
# Q/DQ graphs are run as what they say (DequantizeLinear, then float GEMMs): with its QDQ fusion
# ONNX Runtime would instead run INT8 GEMMs in its integer kernels, whose U8S8 path saturates
# int16 pair sums on x86 CPUs without VNNI (an AVX2 EPYC: 18% error on uniform int8 operands,
# engines/cpu.py). Emulation must be exact on every CPU; the CPU target's own fused artifact is
# a separate, self-checked build.
EMULATION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0", "session.disable_quant_qdq": "1"}
# where a model given as bytes finds its external data (ONNX Runtime refuses absolute locations,
# and locations outside the model's folder, symbolic links included)
EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"
# Weights used as they are in their files (memory-mapped external data), with no packed second
# copy: a quantize process opens the float model up to three times (calibration and checks), and
# prepacking held every GEMM weight twice while a session loaded (+400 MB for a 49k x 2048 lm_head).
NO_PREPACKING = {"session.disable_prepacking": "1"}
# a graph with more embedded data than this is written to a file instead of serialized in memory
_SERIALIZE_LIMIT = 64 << 20


def session(
    model: str | Path | bytes,
    *,
    providers: list[str] | None = None,
    config: dict[str, str] | None = None,
    threads: int | None = None,
    optimization: str | None = None,
    arena: bool = True,
):
    """An InferenceSession; ``config`` entries default to EMULATION_CONFIG. ``arena=False``: no CPU
    memory arena, so large outputs (calibration's probe) are freed between runs instead of kept."""
    ort = require("onnxruntime")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = arena
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


def graph_session(model: onnx.ModelProto, base_dir: str | Path | None = None, **kw):
    """A session over an in-memory graph whose weights stay where they are.

    A graph loaded without its external data (``base_dir``: the folder its data locations are
    relative to) is handed to ONNX Runtime as its own small serialization, and ONNX Runtime reads
    the weights from their files; the weights are never copied. A graph that holds its weights
    is written to a temporary file tensor by tensor (no whole-model serialization) and loaded
    from there. ``kw``: as for :func:`session`.
    """
    external = has_external_data(model)
    if external and base_dir is not None and embedded_bytes(model) <= _SERIALIZE_LIMIT:
        config = {**(kw.pop("config", None) or {}), EXTERNAL_FOLDER: str(Path(base_dir).resolve())}
        return session(model.SerializeToString(), config=config, **kw)
    with tempfile.TemporaryDirectory(prefix="trtforge-graph-") as d:
        path = Path(d) / "model.onnx"
        if external:
            write_model(model, path, Weights(model, base_dir), external=True, link=True)
        else:
            save_streaming(model, path)
        return session(path, **kw)


def release_memory() -> None:
    """Give freed memory back to the system after a big session is gone.

    glibc's malloc raises its mmap threshold after large blocks are freed, so later large blocks
    (ONNX Runtime's activations, numpy's arrays) come from the heap and stay in the process when
    freed: after calibration a quantize process kept 500 MB it no longer used (1.1B slice), on top
    of which the checks opened the float model again. ``malloc_trim`` returns them."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _unreadable(msg: str) -> bool:
    m = msg.lower()
    return any(w in m for w in ("protobuf", "parse", "external data", "no such file", "load model", "corrupt"))


def default_providers() -> list[str]:
    """CUDA first where onnxruntime-gpu and a GPU are present, else CPU."""
    ort = require("onnxruntime")
    avail = ort.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in avail else []) + ["CPUExecutionProvider"]
