"""Q/DQ insertion for TensorRT explicit quantization (INT8, FP8) and INT4 weight-only.

Placement follows TensorRT's documented rules (developer guide, "Q/DQ Layer-Placement
Recommendations"): quantize the inputs of GEMMs, per-tensor for activations and per output
channel for weights, symmetric (zero point 0); do not quantize GEMM outputs, residual adds,
norms or softmax (an extra Q/DQ pair TensorRT cannot fuse forces an FP16 reformat and makes the
engine slower than FP16, the complaint users have about other tools).

* activation: X -> QuantizeLinear(scale, zp=0) -> DequantizeLinear -> GEMM input 0; one pair
  per tensor, shared by the GEMMs that read it (q/k/v stay one horizontal-fusion group);
* weights: stored quantized (INT8 or FP8 E4M3 initializer) -> DequantizeLinear(axis = output
  channel) -> GEMM input 1, so the file shrinks and TensorRT reads the integers directly;
* INT4 weight-only: packed INT4 initializer -> DequantizeLinear(axis = K, block_size) (opset 21).

Scales have the graph's float type: in a strongly typed TensorRT network the DequantizeLinear
output type is the scale's type, so FP16 scales keep the rest of an FP16 graph in FP16.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trtforge.calibration.patterns import Gemm
from trtforge.graph import GraphIndex
from trtforge.numerics import (
    QMAX,
    as_scale,
    int4_block_scales,
    int4_quantize,
    quantize,
    weight_scales,
)
from trtforge.onnx_io import Weights
from trtforge.progress import progress
from trtforge.vocab import Granularity, Precision

ZP_TYPE = {Precision.INT8: TensorProto.INT8, Precision.FP8: TensorProto.FLOAT8E4M3FN}
MIN_OPSET = {Precision.INT8: 13, Precision.FP8: 19, Precision.INT4: 21}


@dataclass
class WeightPlan:
    """How one GEMM's weight is stored (a QuantMethod's plan; calibration/methods/)."""

    gemm: Gemm
    granularity: Granularity = Granularity.CHANNEL  # BLOCK for INT4
    block: int | None = None  # INT4 only
    clip: np.ndarray | None = None  # INT4 clip ratios [K/B, N] (AWQ)
    # per-tensor INT8/FP8: the amax shared by the GEMMs reading one input (q/k/v, gate/up), as
    # TensorRT-LLM's loader rescales their fused weights to one scale anyway
    shared_amax: float | None = None
    # a method that changes the weight itself (GPTQ's error feedback): the [K, N] weight to
    # quantize instead of the graph's, and optionally its scales (INT4 [K/B, N], channel [N])
    weight: np.ndarray | None = None
    scales: np.ndarray | None = None
    info: dict | None = None  # the method's record for the manifest's node entry (GPTQ: its errors, fallbacks)


class PlanStream:
    """Weight plans made one at a time as they are iterated (once), with their number known: a
    method whose plans hold new weights (GPTQ) hands them to :func:`quantize_weights` this way,
    so that each is written and freed before the next is made."""

    def __init__(self, count: int, plans: Iterator[WeightPlan]) -> None:
        self._count, self._plans = count, plans

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[WeightPlan]:
        return self._plans


def float_type(model: onnx.ModelProto) -> tuple[int, type]:
    for t in model.graph.initializer:
        if len(t.dims) == 2 and t.data_type == TensorProto.FLOAT16:
            return TensorProto.FLOAT16, np.float16
    return TensorProto.FLOAT, np.float32


def insert_activation_qdq(
    model: onnx.ModelProto, acts: dict[str, tuple[float, list[str]]], precision: Precision,
    idx: GraphIndex | None = None,
) -> dict[str, float]:
    """Insert a shared Q/DQ pair on each activation ``{tensor: (amax, [reader nodes])}``.

    Edits ``model`` in place; returns the stored scale of each tensor. ``idx`` (of ``model``)
    is used for new names only, so it may be shared with :func:`quantize_weights`.
    """
    idx = idx or GraphIndex(model)
    _, np_dtype = float_type(model)
    zp_name = idx.unique(f"zero_point_{precision.value.replace('-', '_')}")
    if precision == Precision.INT8:
        zp = numpy_helper.from_array(np.zeros((), np.int8), zp_name)
    else:
        zp = helper.make_tensor(zp_name, ZP_TYPE[precision], [], [0.0])
    model.graph.initializer.append(zp)
    scales: dict[str, float] = {}
    inserts: dict[str, list[onnx.NodeProto]] = {}
    nodes = {n.name: n for n in model.graph.node}
    for tensor, (amax, readers) in acts.items():
        scale = as_scale(amax, QMAX[precision], np_dtype)
        sname = idx.unique(f"{tensor}_scale")
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(scale, np_dtype), sname))
        q_out, dq_out = idx.unique(f"{tensor}_quantized"), idx.unique(f"{tensor}_dequantized")
        q = helper.make_node("QuantizeLinear", [tensor, sname, zp_name], [q_out], name=idx.unique(f"{tensor}_QuantizeLinear"))
        dq = helper.make_node("DequantizeLinear", [q_out, sname, zp_name], [dq_out], name=idx.unique(f"{tensor}_DequantizeLinear"))
        first = None
        for r in readers:
            node = nodes[r]
            for k, i in enumerate(node.input):
                if i == tensor and (k == 0 or node.op_type == "MatMul"):
                    node.input[k] = dq_out
                    first = first or r
        if first is not None:
            inserts.setdefault(first, []).extend([q, dq])
        scales[tensor] = float(scale)
    insert_before(model, inserts)
    return scales


def quantize_weights(
    model: onnx.ModelProto, plans: list[WeightPlan] | PlanStream, precision: Precision, idx: GraphIndex | None = None,
) -> dict[str, dict]:
    """Replace each GEMM's float weight by a quantized initializer behind a DequantizeLinear.

    By each plan's granularity: INT4 blocks along K, or INT8/FP8 one scale per output channel
    or one per tensor (what TensorRT-LLM's FP8 checkpoints store). ``idx``: of ``model`` (names,
    and who reads each weight: unchanged by activation Q/DQ).
    """
    idx = idx or GraphIndex(model)
    weights = idx.weights or Weights(model)
    _, np_dtype = float_type(model)
    nodes = {n.name: n for n in model.graph.node}
    inserts: dict[str, list[onnx.NodeProto]] = {}
    info: dict[str, dict] = {}
    dropped: set[str] = set()
    for plan in progress(plans, len(plans), f"{precision.value} weights"):
        g = plan.gemm
        w = idx.array(g.weight).astype(np.float32)
        w_kn = w.T if g.trans_b else w
        if plan.weight is not None:
            w_kn = plan.weight.astype(np.float32)
        base = g.weight
        qname, sname = idx.unique(f"{base}_quantized"), idx.unique(f"{base}_scale")
        if plan.granularity == Granularity.BLOCK:
            scales = plan.scales if plan.scales is not None else int4_block_scales(w_kn, plan.block, np_dtype, plan.clip)
            q = int4_quantize(w_kn, scales, plan.block)
            if g.trans_b:  # stored [N, K]: blocks along the last axis
                q, scales, axis = q.T.copy(), scales.T.copy(), 1
            else:
                axis = 0
            attrs = {"axis": axis, "block_size": plan.block}
            deq = q.astype(np.float32) * np.repeat(scales.astype(np.float32), plan.block, axis=axis)
        else:
            if plan.granularity == Granularity.TENSOR:
                amax = plan.shared_amax if plan.shared_amax is not None else np.abs(w_kn).max()
                scales = plan.scales if plan.scales is not None else as_scale(amax, QMAX[precision], np_dtype)
                q = quantize(w_kn, scales, precision)
                q = q.T.copy() if g.trans_b else q
                attrs = {}
                deq = q.astype(np.float32) * scales.astype(np.float32)
            else:
                scales = plan.scales if plan.scales is not None else weight_scales(w_kn, precision, np_dtype)
                q = quantize(w_kn, scales[None, :], precision)
                if g.trans_b:
                    q = q.T.copy()
                axis = 0 if g.trans_b else 1
                attrs = {"axis": axis}
                deq = q.astype(np.float32) * (scales[:, None] if g.trans_b else scales[None, :]).astype(np.float32)
        # written as produced (to the output's data file, when the stage has one)
        model.graph.initializer.append(weights.put(q, qname))
        # keep a per-tensor scale 0-d: a [1] scale reads as per-axis (np.ascontiguousarray makes 0-d arrays 1-d)
        scale_arr = np.asarray(scales, np_dtype)
        scale_arr = scale_arr.copy() if scale_arr.ndim == 0 else np.ascontiguousarray(scale_arr)
        model.graph.initializer.append(weights.put(scale_arr, sname))
        out = idx.unique(f"{base}_dequantized")
        dq = helper.make_node("DequantizeLinear", [qname, sname], [out], name=idx.unique(f"{base}_DequantizeLinear"), **attrs)
        node = nodes[g.node]
        node.input[1] = out
        inserts.setdefault(g.node, []).append(dq)
        if len(idx.consumers.get(g.weight, [])) <= 1:
            dropped.add(g.weight)
            weights.drop(g.weight)
        err = float(np.abs(deq - w).max() / max(np.abs(w).max(), 1e-12))
        del w, w_kn, deq, q
        info[g.node] = {
            "weight_dtype": {Precision.INT8: "int8", Precision.FP8: "float8_e4m3fn", Precision.INT4: "int4"}[precision],
            "scale_shape": list(scales.shape),
            "scale_min": float(np.min(scales)),
            "scale_max": float(np.max(scales)),
            "weight_rel_err": err,
            **({"block_size": plan.block} if plan.granularity == Granularity.BLOCK else {}),
            **(plan.info or {}),
        }
    keep = [t for t in model.graph.initializer if t.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    insert_before(model, inserts)
    return info


def insert_before(model: onnx.ModelProto, inserts: dict[str, list[onnx.NodeProto]]) -> None:
    """Put each ``inserts[name]`` list of nodes just before the node called ``name`` (order kept)."""
    if not inserts:
        return
    order = []
    for node in model.graph.node:
        order += inserts.get(node.name, [])
        order.append(node)
    del model.graph.node[:]
    model.graph.node.extend(order)


def ensure_opset(model: onnx.ModelProto, precision: Precision, *, fp16: bool = False) -> onnx.ModelProto:
    """Convert to the opset the Q/DQ flavour needs (FP8: 19, INT4 blocks: 21; FP16 Q/DQ: 19)."""
    need = max(MIN_OPSET[precision], 19 if fp16 else 0)
    cur = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if cur >= need:
        return model
    from onnx import version_converter

    return version_converter.convert_version(model, need)
