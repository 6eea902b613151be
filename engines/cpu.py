"""CPU target: an ONNX artifact optimized offline for ONNX Runtime's CPU provider.

In:  an FP32/FP16 export or a Q/DQ artifact, its :class:`PrecisionInfo`, a temporary output folder.
Out: ``model.onnx`` (+ ``model.onnx.data`` for large models) written by ONNX Runtime itself
     (``SessionOptions.optimized_model_filepath``), and the manifest entries ``runtime`` (the
     session options to load it with, which the parity stage reproduces), ``target`` and
     ``build`` (rewrites, fused operator counts, a self-check against the input model).

Steps: (1) symmetric INT8 activation Q/DQ pairs become UINT8 with zero point 128, and INT8 GEMM
weights UINT8 ``w + 128`` with zero point 128 (same values, see qdq_u8.py), so ONNX Runtime fuses
its U8U8 integer GEMMs; (2) the graph is optimized at
ORT_ENABLE_EXTENDED, which fuses DequantizeLinear + MatMul into MatMulIntegerToFloat (INT8)
or MatMulNBits (INT4), and is saved; the hardware-specific layout pass (NCHWc, ORT_ENABLE_ALL)
is left to load time, so the file stays portable between CPUs; (3) the saved model is loaded
with the recorded options and compared with the input model on synthetic inputs.

Why U8U8 and not the faster U8S8 (unsigned activations x signed weights): MLAS's U8S8 kernel on
x86 CPUs without VNNI adds pairs of u8*s8 products in a saturating int16 (``vpmaddubsw``); on an
AVX2-only AMD EPYC that made the optimized all-MiniLM-L6-v2 differ from its Q/DQ input by 12%
(relative RMS) and a 16x256x64 GEMM of uniform random int8 values by up to 18%. U8U8 is exact on
every x86-64 CPU (int16 operands and ``vpmaddwd`` without VNNI, ``vpdpbusd`` with it), so the
artifact stays correct wherever it is moved; the price on AVX2 is speed (docs/engines.md).
``build.int8_gemm`` records the choice, the weight types the optimized graph's integer GEMMs read,
and a probe of both kernels on the build machine.

Per-precision session options (measured, see docs/engines.md and docs/benchmarks.md):
* INT8 in an FP32 graph: QDQ fusions on -> MatMulIntegerToFloat (U8U8).
* INT4 weight-only: MatMulNBits with ``session.qdq_matmulnbits_accuracy_level=0`` (activations
  stay float, as TensorRT's W4A16 GEMMs compute); level 4 quantizes activations to int8 on the
  fly (W4A8) and was only ~10% faster on the FP32 100M LLaMA-like graph, so it is not used.
* FP8, and INT8 in an FP16 graph: ONNX Runtime has no fused CPU kernels for these and would
  dequantize every weight on every call; trtforge folds the weight DequantizeLinear nodes into
  float initializers first (bit-exact, see qdq_fold.py), activation Q/DQ stay in the graph.
  These get ``session.disable_prepacking=1``: a prepacked constant weight makes MLAS's float GEMM
  sum in another order than the input model's run-time dequantized weight (for K > 256), and the
  1e-7 differences cross rounding boundaries of later QuantizeLinear nodes (FP8 steps are 6-12%
  wide) and grow through the layers: 4.3% relative RMS on the 24-layer llama-100m FP8 graph
  (33% was reported on a real 135M LLaMA). Unpacked, the folded graph computes what the input
  graph computes (0 to 3e-7); the latency cost was within the noise of a shared 2-core machine.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from trtforge._deps import require
from trtforge.engines.cpu_gemm import check_gemms, summary
from trtforge.engines.cpu_lm_head import INT8_LM_HEAD, find_lm_head, quantize_lm_head
from trtforge.engines.feeds import synthetic_feeds
from trtforge.engines.precision import PrecisionInfo
from trtforge.engines.profiles import BATCH, PAST, SEQ, TOTAL, ShapeProfile
from trtforge.engines.qdq_fold import fold_weight_dequantize
from trtforge.engines.qdq_u8 import U8_WEIGHT_SUFFIX, int8_weights_to_uint8, symmetric_int8_to_uint8
from trtforge.engines.targets import FP8, FP32, INT8
from trtforge.env import cpu_name
from trtforge.errors import BuildError, OptionError
from trtforge.manifest import Manifest
from trtforge.onnx_io import DATA_FILE, DataFile, Weights, load_graph, write_model

log = logging.getLogger(__name__)

PROVIDER = "CPUExecutionProvider"
OFFLINE_LEVEL = "ORT_ENABLE_EXTENDED"
LOAD_LEVEL = "ORT_ENABLE_ALL"
FUSED_OPS = ("MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulNBits",
             "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "MatMul", "Gemm")
# integer GEMMs of the optimized graph and the input that holds their (constant) weight
INTEGER_GEMM_WEIGHT = {"MatMulIntegerToFloat": 1, "MatMulInteger": 1, "DynamicQuantizeMatMul": 1,
                       "QLinearMatMul": 3, "QGemm": 3}
DISABLE_PREPACKING = "session.disable_prepacking"
# CPU features that decide which MLAS integer GEMM kernel runs (recorded with the build)
INT8_CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class CpuRuntime:
    """How to load the CPU artifact: recorded in the manifest under ``runtime``."""

    session_config: dict[str, str]
    graph_optimization_level: str = LOAD_LEVEL
    offline_optimization_level: str = OFFLINE_LEVEL
    provider: str = PROVIDER
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict:
        return {"provider": self.provider, "session_config": dict(self.session_config),
                "graph_optimization_level": self.graph_optimization_level,
                "offline_optimization_level": self.offline_optimization_level, "notes": list(self.notes)}


def runtime_for(info: PrecisionInfo) -> CpuRuntime:
    """Session options per precision (see module docstring for the measurements behind them)."""
    config = {"session.qdq_matmulnbits_accuracy_level": "0"}
    notes = ["session.qdq_matmulnbits_accuracy_level=0: INT4 weight-only GEMMs keep float activations (W4A16)"]
    if fold_types(info):
        config[DISABLE_PREPACKING] = "1"
        notes.append("constant weight DequantizeLinear folded into float initializers (bit-exact): no fused CPU "
                     "kernel for this Q/DQ flavour; activation Q/DQ stay")
        notes.append(f"{DISABLE_PREPACKING}=1: prepacked float weights sum in another order than the input model and "
                     "the differences flip later quantizers; unpacked, the artifact computes what its input computes")
    if INT8 in info.needs and info.float_dtype != FP32:
        notes.append(f"INT8 Q/DQ in a {info.float_dtype} graph has no fused ONNX Runtime CPU kernel; quantize the "
                     "fp32 export for a fast CPU artifact")
    return CpuRuntime(config, notes=tuple(notes))


def fold_types(info: PrecisionInfo) -> set[int]:
    """Weight types to fold before optimizing: those with no fused ONNX Runtime CPU kernel."""
    from onnx import TensorProto

    types = set()
    if FP8 in info.needs:
        types.add(TensorProto.FLOAT8E4M3FN)
    if INT8 in info.needs and info.float_dtype != FP32:
        types.add(TensorProto.INT8)
    return types


def _level(ort, name: str):
    return getattr(ort.GraphOptimizationLevel, name)


def session(path: Path, runtime: CpuRuntime, *, level: str | None = None, optimized_to: Path | None = None,
            external_data: str | None = None, threads: int | None = None):
    """An ONNX Runtime session with the runtime's options (optionally writing the optimized model)."""
    ort = require("onnxruntime")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = _level(ort, level or runtime.graph_optimization_level)
    for k, v in runtime.session_config.items():
        so.add_session_config_entry(k, str(v))
    if threads:
        so.intra_op_num_threads = threads
    if optimized_to is not None:
        so.optimized_model_filepath = str(optimized_to)
        if external_data:
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", external_data)
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        return ort.InferenceSession(str(path), so, providers=[runtime.provider])
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, NotImplemented)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BuildError(f"ONNX Runtime cannot load {path.name} for the CPU target: {first[:300]}",
                         "check the artifact with onnx.checker, or report the graph") from exc


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    c = Counter(n.op_type for n in model.graph.node)
    return {k: c[k] for k in FUSED_OPS if c.get(k)}


def gemm_weight_types(model: onnx.ModelProto) -> dict[str, int]:
    """How many integer GEMMs of an (optimized) graph read uint8 / int8 weights: the MLAS kernel chosen."""
    inits = {t.name: t.data_type for t in model.graph.initializer}
    names = {onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT8: "int8"}
    c: Counter = Counter()
    for n in model.graph.node:
        k = INTEGER_GEMM_WEIGHT.get(n.op_type)
        if k is not None and len(n.input) > k:
            c[names.get(inits.get(n.input[k]), "not constant")] += 1
    return dict(sorted(c.items()))


def cpu_flags() -> tuple[str, ...] | None:
    """This CPU's flags among INT8_CPU_FLAGS (Linux /proc/cpuinfo), None where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return tuple(f for f in INT8_CPU_FLAGS if f in have)
    return None


def probe_int8_gemm() -> dict[str, float]:
    """Run ONNX Runtime's U8S8 and U8U8 MatMulIntegerToFloat on this CPU against exact int64 math.

    Operands near the int8 extremes, where U8S8's saturating int16 pair sums (x86 without VNNI)
    go wrong. Returns the max error of each kernel relative to the largest exact output.
    """
    from onnx import TensorProto, helper, numpy_helper

    ort = require("onnxruntime")
    rng = np.random.default_rng(0)
    m, k, n = 4, 64, 16
    a = rng.integers(-128, 128, (m, k))
    a[0] = 127  # a row of the largest activations against same-sign large weights
    w = rng.integers(-127, 128, (k, n))
    w[:, 0] = 127
    ref = (a @ w).astype(np.float64)
    out = {}
    for name, wq, zp in (("u8s8", w.astype(np.int8), np.zeros(n, np.int8)),
                         ("u8u8", (w + 128).astype(np.uint8), np.full(n, 128, np.uint8))):
        graph = helper.make_graph(
            [helper.make_node("MatMulIntegerToFloat", ["a", "w", "sa", "sw", "za", "zw"], ["y"], domain="com.microsoft")],
            "probe", [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
            [numpy_helper.from_array(wq, "w"), numpy_helper.from_array(np.array(1.0, np.float32), "sa"),
             numpy_helper.from_array(np.ones(n, np.float32), "sw"),
             numpy_helper.from_array(np.array(128, np.uint8), "za"), numpy_helper.from_array(zp, "zw")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])
        so = ort.SessionOptions()
        so.log_severity_level = 3
        y = ort.InferenceSession(model.SerializeToString(), so, providers=[PROVIDER]).run(
            None, {"a": (a + 128).astype(np.uint8)})[0]
        out[f"{name}_max_rel_err"] = float(np.abs(y - ref).max() / np.abs(ref).max())
    return out


def _int8_gemm_record(weights_u8: int, types: dict[str, int], fallback: list[dict]) -> dict:
    """What runs the INT8 GEMMs. An inexact kernel on this CPU no longer fails the build by itself:
    the per-GEMM check (engines/cpu_gemm.py) finds the GEMMs it gets wrong on this model and those
    fall back to float (``float_fallback``, each with its error)."""
    probe = probe_int8_gemm()
    signed = types.get("int8", 0)
    return {
        "kernel": "U8S8" if signed and not types.get("uint8") else "U8U8" if not signed else "U8U8 + U8S8",
        "activations": "uint8, zero point 128",
        "weights": "uint8 w + 128, zero point 128" if not signed else f"{signed} GEMMs on int8 weights",
        "uint8_weight_dequantize": weights_u8,
        "weight_types_after": types,
        "float_fallback": fallback,
        "why": "exact on every x86-64 CPU; U8S8 saturates int16 pair sums (vpmaddubsw) on CPUs without VNNI",
        "build_machine": {"cpu": cpu_name(), "flags": list(cpu_flags() or ()), **probe},
    }


def _self_check_sizes(profile: ShapeProfile) -> dict[str, int]:
    sizes = {}
    for name, r in profile.symbols:
        if name == TOTAL:  # past + sequence, derived by the feeds
            continue
        want = {BATCH: 2, SEQ: 8, PAST: 4}.get(name, r.opt)
        sizes[name] = min(max(want, r.min), r.max)
    return sizes


def _identical(source: Path, rewritten: Path, manifest: dict, profile: ShapeProfile) -> bool:
    plain = CpuRuntime({"session.qdq_matmulnbits_accuracy_level": "0"})
    feeds = synthetic_feeds(manifest, _self_check_sizes(profile), seed=2)
    a = session(source, plain, level="ORT_DISABLE_ALL").run(None, feeds)
    b = session(rewritten, plain, level="ORT_DISABLE_ALL").run(None, feeds)
    if not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)):
        raise BuildError("rewriting INT8 activation Q/DQ to UINT8 changed the model's outputs",
                         "report this trtforge bug with the model; --target cpu cannot be trusted for it")
    return True


def _rel_rms(got: list, ref: list) -> tuple[float, float]:
    """(largest relative RMS error, largest max error / max |ref|) over the outputs."""
    worst, rms = 0.0, 0.0
    for a, b in zip(got, ref, strict=True):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a64.shape != b64.shape:
            raise BuildError(f"the optimized CPU model returns shape {a64.shape}, the input model {b64.shape}",
                             "report this ONNX Runtime optimization problem")
        d = a64 - b64
        worst = max(worst, float(np.abs(d).max()) / max(float(np.abs(b64).max()), 1e-6))
        rms = max(rms, float(np.sqrt((d ** 2).mean() / max(float((b64 ** 2).mean()), 1e-12))))
    return rms, worst


QUANTIZED_TOLERANCE = 6e-2  # end-to-end relative RMS of a quantized artifact vs its input (see self_check)
FLIP_FACTOR = 2.0  # the artifact may differ from its input by this many times the input's own flip floor


def flip_floor(source: Path, work: Path, feeds: dict, names: list[str], ref: list) -> dict | None:
    """How far the input model moves from itself when only its float summation order changes.

    The input graph with its INT8/FP8 weight DequantizeLinear folded to float (bit-exact values,
    qdq_fold.py) and ONNX Runtime's default prepacking (another summation order for K > 256), run
    unoptimized, against the input run as it is: every difference is a rounding flip grown through
    the layers, none a wrong value. None when there is nothing to fold (INT4 blocks, float graphs)."""
    from onnx import TensorProto

    work.mkdir(parents=True, exist_ok=True)
    model = load_graph(source)
    external = any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
    data = DataFile(work / "floor.data") if external else None
    weights = Weights(model, source.parent, out=data)
    try:
        folded = fold_weight_dequantize(model, {TensorProto.INT8, TensorProto.FLOAT8E4M3FN}, weights=weights)[1]
        if not folded:
            return None
        path = work / "floor.onnx"
        write_model(model, path, weights, external=external, data=data, link=True)
    finally:
        if data is not None:
            data.close()
    del model, weights
    got = session(path, CpuRuntime({"session.qdq_matmulnbits_accuracy_level": "0"}), level="ORT_DISABLE_ALL").run(names, feeds)
    rms, worst = _rel_rms(got, ref)
    shutil.rmtree(work, ignore_errors=True)
    return {"relative_rms_err": rms, "max_normalized_err": worst, "folded_weights": folded,
            "what": "input model, weights folded to float (same values) and prepacked (another summation order), "
                    "vs the input model: rounding flips only"}


def self_check(source: Path, built: Path, runtime: CpuRuntime, manifest: dict, profile: ShapeProfile,
               info: PrecisionInfo, *, gemms: list[dict] | None = None, work: Path | None = None) -> dict:
    """Run the input model (plain ONNX semantics) and the built artifact on the same inputs,
    one session at a time (a model over 2 GB is in memory once, never twice).

    A quantized artifact over the tolerance whose integer GEMMs were each exact on their own
    (``gemms``, engines/cpu_gemm.py) is measured against the input's own flip floor
    (:func:`flip_floor`): within FLIP_FACTOR times it, the difference is rounding flips, and the
    build passes with the floor recorded; beyond it, it fails as before."""
    plain = CpuRuntime({"session.qdq_matmulnbits_accuracy_level": "0"})
    sizes = _self_check_sizes(profile)
    feeds = synthetic_feeds(manifest, sizes, seed=1)
    ref_sess = session(source, plain, level="ORT_DISABLE_ALL")
    names = [o.name for o in ref_sess.get_outputs()]
    ref = ref_sess.run(names, feeds)
    del ref_sess
    got = session(built, runtime).run(names, feeds)
    rms, worst = _rel_rms(got, ref)
    del got
    # Fused integer GEMMs sum exactly, the plain graph's float GEMMs on dequantized values round:
    # a 1e-7 difference can move an activation across a rounding boundary of a later
    # QuantizeLinear, and such flips grow through the layers (U8U8: 2.3% on all-MiniLM-L6-v2,
    # 1.2% on the random 24-layer llama-100m; FP8 and FP16-INT8 run unpacked, 3e-7). So the
    # relative RMS is gated loosely for quantized graphs: it catches a broken rewrite or a
    # saturating kernel (a wrong zero point is ~100%, U8S8 on AVX2 was 12% on MiniLM), not
    # rounding flips. The max error is recorded too.
    tol = QUANTIZED_TOLERANCE if info.quantized else 1e-2 if info.float_dtype != FP32 else 1e-4
    floor = None
    exact = gemms is not None and all(r["passed"] for r in gemms)
    if np.isfinite(rms) and rms > tol and info.quantized and exact:
        floor = flip_floor(source, (work or built.parent) / "flip-floor", feeds, names, ref)
        if floor is not None:
            log.info("cpu target: %.3g relative RMS from the input model, over the %g tolerance; the input model "
                     "moves %.3g from itself when only its summation order changes (rounding flips)",
                     rms, tol, floor["relative_rms_err"])
    limit = max(tol, FLIP_FACTOR * floor["relative_rms_err"]) if floor else tol
    if not np.isfinite(rms) or rms > limit:
        why = (f"; every integer GEMM is exact on its own and the input model moves only "
               f"{floor['relative_rms_err']:.3g} from itself under another summation order") if floor else ""
        raise BuildError(f"the optimized CPU model differs from the input model by {rms:.3g} (relative RMS error, "
                         f"tolerance {limit:.3g}){why}", "report this ONNX Runtime optimization problem")
    return {"shapes": sizes, "relative_rms_err": rms, "max_normalized_err": worst, "tolerance": tol,
            "limit": limit, "flip_floor": floor, "reference": "input model, ORT_DISABLE_ALL",
            "passed_by": "tolerance" if rms <= tol else f"within {FLIP_FACTOR:g}x the input's flip floor"}


def _stage(source_model: Path, source_manifest: dict, work: Path, info: PrecisionInfo, profile: ShapeProfile, *,
           external: bool, float_weights: set[str], lm_head: str = "float") -> tuple[Path, dict]:
    """Rewrite the input graph for ONNX Runtime (UINT8, folds) into ``work``; the staged model and counts.

    ``float_weights``: INT8 GEMM weights folded to float (the per-GEMM fallback) instead of
    becoming UINT8, so those GEMMs run in float on the rounded activations. ``lm_head="int8"``:
    the float lm_head becomes an INT8 GEMM (cpu_lm_head.py), after the UINT8 rewrite's check."""
    model = load_graph(source_model)  # weights held in model.onnx become references into it
    data = DataFile(work / "rewritten.data") if external else None
    weights = Weights(model, source_model.parent, out=data)
    try:
        before = op_counts(model)
        pairs = symmetric_int8_to_uint8(model, weights=weights)[1] if INT8 in info.needs else 0
        fallback = fold_weight_dequantize(model, {onnx.TensorProto.INT8}, weights=weights,
                                          only=float_weights)[1] if float_weights else 0
        weights_u8 = 0  # INT8 GEMM weights -> UINT8 + 128 (U8U8 kernel), unless they are folded to float
        if INT8 in info.needs and onnx.TensorProto.INT8 not in fold_types(info):
            weights_u8 = int8_weights_to_uint8(model, weights=weights)[1]
        rewrite_check = None
        if pairs or weights_u8:
            # The UINT8 rewrite must not change a single value: run both graphs unoptimized (same
            # kernels apart from the Q/DQ types) and demand identical outputs.
            u8 = work / "u8.onnx"
            write_model(model, u8, weights, external=external, data=data, link=True)
            rewrite_check = _identical(source_model, u8, source_manifest, profile) if not fallback else None
        folded = fold_weight_dequantize(model, fold_types(info), weights=weights)[1]
        lm = quantize_lm_head(model, weights, _vocab_size(source_manifest)) \
            if lm_head == INT8_LM_HEAD else None
        staged = work / "model.onnx"
        write_model(model, staged, weights, external=external, data=data, link=True)
    finally:
        if data is not None:
            data.close()
    return staged, {"before": before, "pairs": pairs, "weights_u8": weights_u8, "folded": folded,
                    "float_fallback": fallback, "rewrite_check": rewrite_check, "lm_head": lm}


def _optimize(staged: Path, dest: Path, runtime: CpuRuntime, *, external: bool) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    for f in (dest, dest.with_name(DATA_FILE)):
        f.unlink(missing_ok=True)
    session(staged, runtime, level=runtime.offline_optimization_level, optimized_to=dest,
            external_data=DATA_FILE if external else None)
    if not dest.exists():
        raise BuildError("ONNX Runtime did not write the optimized model", "check free disk space")


def _original_weight(name: str) -> str:
    return name[: -len(U8_WEIGHT_SUFFIX)] if name.endswith(U8_WEIGHT_SUFFIX) else name


def _vocab_size(man: Manifest | dict) -> int | None:
    """The vocabulary size a manifest (typed, or its JSON form) records."""
    if isinstance(man, Manifest):
        return man.dims.vocab_size if man.dims else None
    return ((man or {}).get("dims") or {}).get("vocab_size")


def check_lm_head_option(source_model: Path, source_manifest: dict, info: PrecisionInfo, lm_head: str) -> None:
    """Refuse ``cpu_lm_head="int8"`` where it cannot apply (before any work)."""
    if lm_head != INT8_LM_HEAD:
        return
    if info.float_dtype != FP32:
        raise OptionError(f"cpu_lm_head=int8 needs an FP32 graph; this artifact's graph is {info.float_dtype}",
                          "quantize the fp32 export (ONNX Runtime has no fast CPU kernels for FP16 graphs), "
                          "or drop cpu_lm_head", fields=("cpu_lm_head",))
    vocab = _vocab_size(source_manifest)
    if find_lm_head(onnx.load(str(source_model), load_external_data=False), vocab) is None:
        raise OptionError(f"cpu_lm_head=int8: the graph has no float lm_head (a MatMul onto the {vocab}-token "
                          "vocabulary that gives the logits)", "drop cpu_lm_head for this model (encoders and "
                          "quantized lm_heads have none)", fields=("cpu_lm_head",))


def _lm_head_reference(source_model: Path, source_manifest: dict, work: Path, *, external: bool) -> Path:
    """The input model with only the lm_head rewritten (what the self-check compares with)."""
    work.mkdir(parents=True, exist_ok=True)
    model = load_graph(source_model)
    data = DataFile(work / "reference.data") if external else None
    weights = Weights(model, source_model.parent, out=data)
    try:
        quantize_lm_head(model, weights, _vocab_size(source_manifest))
        path = work / "reference.onnx"
        write_model(model, path, weights, external=external, data=data, link=True)
    finally:
        if data is not None:
            data.close()
    return path


def build_cpu(source_model: Path, source_manifest: dict, work: Path, dest: Path, info: PrecisionInfo,
              profile: ShapeProfile, *, external: bool, lm_head: str = "float") -> dict:
    """Write the optimized model to ``dest``; returns the manifest's ``runtime`` and ``build`` parts.

    ``work`` is a scratch folder inside the temporary output folder (removed by the caller).
    The input's weights are never loaded whole: the graph is read without its external data, the
    rewrites read the weights they change one at a time and write the new ones to a scratch data
    file, and the staged graphs read the untouched weights through a hard link of the input's
    data file (copied only across file systems). ONNX Runtime alone holds the model in memory.

    Every integer GEMM of the optimized model is then checked on its own (engines/cpu_gemm.py);
    an INT8 GEMM whose kernel is not exact on this model falls back to a float GEMM (its weight
    folded to float, its activations still rounded to INT8), the graph is optimized again, and
    the fallback is logged and recorded (``build.int8_gemm.float_fallback``).

    ``lm_head="int8"`` (opt-in) also runs the float lm_head as an INT8 GEMM (cpu_lm_head.py); the
    self-check then compares with the input model with that one rewrite (``build.lm_head``);
    the backend's plan refuses it where it cannot apply (:func:`check_lm_head_option`).
    """
    work.mkdir(parents=True, exist_ok=True)
    runtime = runtime_for(info)
    feeds = synthetic_feeds(source_manifest, _self_check_sizes(profile), seed=1)
    float_weights: set[str] = set()
    fallback: list[dict] = []
    timings = {"rewrite_s": 0.0, "optimize_s": 0.0, "gemm_check_s": 0.0}
    for attempt in range(2):
        t = time.perf_counter()
        stage_dir = work / f"stage{attempt}"
        stage_dir.mkdir(parents=True, exist_ok=True)
        staged, counts = _stage(source_model, source_manifest, stage_dir, info, profile, external=external,
                                float_weights=float_weights, lm_head=lm_head)
        t1 = time.perf_counter()
        _optimize(staged, dest, runtime, external=external)
        t2 = time.perf_counter()
        records = check_gemms(dest, lambda p: session(p, runtime), feeds, work / "gemm-check")
        timings["rewrite_s"] += t1 - t
        timings["optimize_s"] += t2 - t1
        timings["gemm_check_s"] += time.perf_counter() - t2
        bad = [r for r in records if not r["passed"]]
        if not bad:
            break
        cannot = [r for r in bad if r["op"] != "MatMulIntegerToFloat" or attempt]
        if cannot:
            r = cannot[0]
            raise BuildError(f"ONNX Runtime's {r['op']} kernel for {r['node']} ({r['shape'][0]}x{r['shape'][1]}) "
                             f"differs from exact math by {r['max_rel_err']:.3g} of its output range on this CPU "
                             f"({cpu_name()}; tolerance {r['tolerance']:g}), and no float fallback is left",
                             "report this ONNX Runtime problem with the model")
        for r in bad:
            w = _original_weight(r["weight"])
            float_weights.add(w)
            fallback.append({"node": r["node"], "weight": w, "shape": r["shape"], "max_rel_err": r["max_rel_err"],
                             "why": f"{r['op']} is off by {r['max_rel_err']:.3g} of its output range on the "
                                    f"activations it sees (tolerance {r['tolerance']:g}): kernel not exact here"})
            log.warning("cpu target: %s (%dx%d) falls back to a float GEMM: ONNX Runtime's integer kernel is off by "
                        "%.3g of its output range on this CPU (tolerance %g)", r["node"], *r["shape"],
                        r["max_rel_err"], r["tolerance"])
        shutil.rmtree(stage_dir, ignore_errors=True)
    optimized = onnx.load(str(dest), load_external_data=False)
    after, types = op_counts(optimized), gemm_weight_types(optimized)
    del optimized
    int8_gemm = _int8_gemm_record(counts["weights_u8"], types, fallback) if types or fallback else None
    t3 = time.perf_counter()
    reference = source_model if counts["lm_head"] is None else \
        _lm_head_reference(source_model, source_manifest, work / "reference", external=external)
    check = self_check(reference, dest, runtime, source_manifest, profile, info, gemms=records, work=work)
    if counts["lm_head"] is not None:
        check["reference"] += ", its lm_head as the INT8 GEMM of build.lm_head"
    timings["self_check_s"] = time.perf_counter() - t3
    log.info("cpu target: %d INT8 activation Q/DQ groups -> UINT8, %d INT8 weights -> UINT8; ops %s; "
             "integer GEMM weights %s; %d integer GEMMs checked, %d fell back to float", counts["pairs"],
             counts["weights_u8"], after, types, len(records), len(fallback))
    return {
        "runtime": runtime.to_json(),
        "build": {
            "uint8_activation_groups": counts["pairs"],
            "uint8_weight_dequantize": counts["weights_u8"],
            "int8_gemm": int8_gemm,
            "folded_weight_dequantize": counts["folded"],
            "lm_head": counts["lm_head"],
            "ops_before": counts["before"],
            "ops_after": after,
            "gemm_check": summary(records),
            "self_check": {**check, "uint8_rewrite_identical": counts["rewrite_check"]},
            "timings": {k: round(v, 3) for k, v in timings.items()},
        },
    }
