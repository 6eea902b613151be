"""ONNX Runtime sessions the way every stage needs them (CPU by default, CUDA where asked)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from trtforge._deps import require
from trtforge.errors import InputError, OptionError
from trtforge.onnx_io import Weights, embedded_bytes, has_external_data, save_streaming, write_model
from trtforge.vocab import CalibDevice

log = logging.getLogger(__name__)
CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"

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
# CUDA execution provider options for calibration: statistics as close to the CPU path's as the
# GPU allows (names: onnxruntime/core/providers/cuda/cuda_execution_provider_info.cc).
# use_tf32=0: FP32 GEMMs in full FP32, not TF32's 10-bit mantissa (ORT's default is TF32 on
# Ampere and later, a ~1e-3 relative error on every GEMM output); strict SkipLayerNorm: FP32
# accumulation in that fused kernel; no tunable ops and cuDNN's default algorithm: the same
# kernels on every run; arena grown by what is asked (a session per layer, not powers of two).
CUDA_CALIB_OPTIONS = {
    "use_tf32": "0",
    "enable_skip_layer_norm_strict_mode": "1",
    "tunable_op_enable": "0",
    "cudnn_conv_algo_search": "DEFAULT",
    "arena_extend_strategy": "kSameAsRequested",
}
# ONNX Runtime (1.2x and later) records which execution provider runs each node when asked
RECORD_ASSIGNMENT = "session.record_ep_graph_assignment_info"
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
    # a provider is a name or (name, options), as InferenceSession takes them
    provs = [p for p in (providers or [CPU_EP]) if _provider_name(p) in available] or [CPU_EP]
    if any(_provider_name(p) == CUDA_EP for p in provs):
        so.add_session_config_entry(RECORD_ASSIGNMENT, "1")
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


def _provider_name(p) -> str:
    return p if isinstance(p, str) else p[0]


@dataclass(frozen=True)
class Device:
    """Where calibration runs: what was asked, what was chosen, and the providers a session gets."""

    requested: CalibDevice
    device: CalibDevice  # cpu or cuda
    providers: tuple  # names or (name, options), CUDA first with the CPU as fallback for its missing ops

    def describe(self, sess=None) -> dict:
        """The manifest's record; ``sess``: a session of this device, whose providers are what ran."""
        d = {"requested": self.requested.value, "device": self.device.value,
             "providers": list(sess.get_providers()) if sess is not None else [_provider_name(p) for p in self.providers]}
        opts = {_provider_name(p): dict(p[1]) for p in self.providers if not isinstance(p, str)}
        if opts:
            d["provider_options"] = opts
        return d


def calibration_device(requested: CalibDevice | str = CalibDevice.AUTO) -> Device:
    """The calibration device: CUDA (ONNX Runtime's CUDA execution provider, with
    CUDA_CALIB_OPTIONS, the CPU provider for the ops it lacks) when asked, or by default where
    onnxruntime-gpu sees a GPU; the CPU otherwise. Asking for cuda where it is missing is an
    error before any work."""
    requested = CalibDevice(requested)
    ort = require("onnxruntime")
    has_cuda = CUDA_EP in ort.get_available_providers()
    if requested == CalibDevice.CUDA and not has_cuda:
        raise OptionError(
            "calib_device = cuda, but ONNX Runtime has no CUDAExecutionProvider here "
            f"(onnxruntime {ort.__version__}: {', '.join(ort.get_available_providers())})",
            "install onnxruntime-gpu matching this machine's CUDA version in place of onnxruntime "
            "(pip uninstall onnxruntime; pip install onnxruntime-gpu), or calibrate on the CPU: calib_device=cpu",
            fields=("calib_device",))
    if requested != CalibDevice.CPU and has_cuda:
        return Device(requested, CalibDevice.CUDA, ((CUDA_EP, dict(CUDA_CALIB_OPTIONS)), CPU_EP))
    return Device(requested, CalibDevice.CPU, (CPU_EP,))


def nodes_by_provider(sess) -> dict[str, int] | None:
    """Nodes of a session's (optimized) graph per execution provider, where ONNX Runtime recorded
    them (CUDA sessions opened by :func:`session`); None where it did not."""
    get = getattr(sess, "get_provider_graph_assignment_info", None)
    if get is None:
        return None
    try:
        info = get()
    except Exception:  # noqa: BLE001 - not recorded for this session, or an older binding
        return None
    counts: dict[str, int] = {}
    for sub in info:
        counts[sub.ep_name] = counts.get(sub.ep_name, 0) + len(sub.get_nodes())
    return counts or None


def ran_on(sess, counts: dict[str, int] | None = None) -> dict:
    """What a calibration session ran on, for ranges.json's meta: the device, ONNX Runtime's
    providers, and (CUDA) the nodes per provider (``counts``: summed over several sessions)."""
    provs = list(sess.get_providers())
    d = {"device": (CalibDevice.CUDA if CUDA_EP in provs else CalibDevice.CPU).value, "providers": provs}
    counts = counts if counts is not None else nodes_by_provider(sess)
    if counts and CUDA_EP in provs:
        d["nodes_by_provider"] = dict(counts)
    return d


def log_fallback(what: str, meta: dict) -> None:
    """One line when a CUDA calibration ran some nodes on the CPU (ops the CUDA provider lacks)."""
    counts = meta.get("nodes_by_provider") or {}
    on_cpu, total = counts.get(CPU_EP, 0), sum(counts.values())
    if on_cpu:
        log.info("%s on CUDA: %d of %d nodes ran on the CPU provider (ops CUDA lacks; their inputs are copied to "
                 "the host)", what, on_cpu, total)


def default_providers() -> list[str]:
    """CUDA first where onnxruntime-gpu and a GPU are present, else CPU."""
    ort = require("onnxruntime")
    avail = ort.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in avail else []) + ["CPUExecutionProvider"]
