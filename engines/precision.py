"""What an ONNX artifact computes in, and whether TensorRT can take its Q/DQ nodes.

In:  an :class:`OnnxArtifact` (its manifest and graph; weights are not needed).
Out: :class:`PrecisionInfo` (the precisions the graph needs: float type plus each quantized
     type found), and a list of Q/DQ problems TensorRT would reject.

The manifest's ``quantization.precision`` names the recipe, but the graph is what a builder
sees, so both are read: FP8 (FLOAT8E4M3FN) / INT8 / INT4 DequantizeLinear inputs, blocked
DequantizeLinear (``block_size``), and FP16/BF16 initializers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from trtforge.engines.targets import (
    BF16,
    FP4,
    FP8,
    FP16,
    FP32,
    INT4,
    INT8,
    QUANTIZED,
    Target,
    check_supported,
)
from trtforge.manifest import Manifest
from trtforge.vocab import Precision

_Q_TYPES = {
    TensorProto.INT8: INT8,
    TensorProto.UINT8: INT8,
    TensorProto.FLOAT8E4M3FN: FP8,
    TensorProto.FLOAT8E4M3FNUZ: FP8,
    TensorProto.FLOAT8E5M2: FP8,
    TensorProto.FLOAT8E5M2FNUZ: FP8,
    TensorProto.INT4: INT4,
    TensorProto.UINT4: INT4,
}
if hasattr(TensorProto, "FLOAT4E2M1"):
    _Q_TYPES[TensorProto.FLOAT4E2M1] = FP4



@dataclass(frozen=True)
class PrecisionInfo:
    """``precision``: the headline (recipe) precision; ``needs``: everything the target must run."""

    precision: str
    float_dtype: str  # fp32 | fp16 | bf16: what the unquantized parts compute in
    needs: frozenset[str]
    source: str  # "manifest" | "graph"
    qdq: dict[str, int] = field(default_factory=dict)  # e.g. {"int8": 42, "int4-weight-only(block)": 12}

    @property
    def quantized(self) -> bool:
        return self.precision in QUANTIZED

    def to_json(self) -> dict:
        return {"precision": self.precision, "float_dtype": self.float_dtype, "needs": sorted(self.needs),
                "source": self.source, "qdq_dequantize_nodes": dict(self.qdq)}


def _elem_type(model: onnx.ModelProto, name: str, inits: dict, producers: dict) -> int | None:
    """Element type of a tensor feeding DequantizeLinear: an initializer, or a QuantizeLinear's output."""
    if name in inits:
        return inits[name].data_type
    prod = producers.get(name)
    if prod is None:
        return None
    if prod.op_type == "QuantizeLinear":
        for a in prod.attribute:
            if a.name == "output_dtype" and a.i:
                return a.i
        if len(prod.input) > 2 and prod.input[2] in inits:
            return inits[prod.input[2]].data_type
        return TensorProto.UINT8  # ONNX default without a zero point
    if prod.op_type == "Constant":
        for a in prod.attribute:
            if a.name == "value":
                return a.t.data_type
    return None


def _attr(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    for a in node.attribute:
        if a.name == name:
            return a.i
    return default


def scan_graph(model: onnx.ModelProto) -> tuple[str, Counter]:
    """(float dtype, counts of DequantizeLinear per quantized type) of a graph."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    floats = Counter(t.data_type for t in g.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16,
                                                                            TensorProto.BFLOAT16))
    floats.update(v.type.tensor_type.elem_type for v in list(g.input) + list(g.output))
    float_dtype = FP16 if floats[TensorProto.FLOAT16] else BF16 if floats[TensorProto.BFLOAT16] else FP32
    counts: Counter = Counter()
    for node in g.node:
        if node.op_type != "DequantizeLinear":
            continue
        et = _elem_type(model, node.input[0], inits, producers)
        kind = _Q_TYPES.get(et) if et is not None else None
        if kind is not None:
            counts[kind] += 1
    return float_dtype, counts


def recipe_precision(manifest: Manifest | dict) -> Precision | None:
    """The quantize recipe's precision a manifest records (typed, or its JSON form), if any."""
    if isinstance(manifest, Manifest):
        return manifest.quantization.precision if manifest.quantization is not None else None
    q = dict(manifest).get("quantization") or {}  # the JSON form (tests, scripts)
    return Precision.lookup(q.get("precision", "")) if q else None


def detect_precision(manifest: Manifest | dict, model: onnx.ModelProto) -> PrecisionInfo:
    """Precision of an artifact: the manifest's recipe precision if it has one, else the graph's
    strongest quantized type, else its float type. ``needs`` always comes from both."""
    float_dtype, counts = scan_graph(model)
    needs = {float_dtype} | set(counts)
    named = recipe_precision(manifest)
    if named:
        needs.add(named)
        return PrecisionInfo(named, float_dtype, frozenset(needs), "manifest", dict(counts))
    for p in (FP4, FP8, INT8, INT4):  # strongest hardware requirement first
        if counts.get(p):
            return PrecisionInfo(p, float_dtype, frozenset(needs), "graph", dict(counts))
    return PrecisionInfo(float_dtype, float_dtype, frozenset(needs), "graph", {})


def check_target(target: Target, info: PrecisionInfo) -> None:
    """Refuse (TargetError naming the alternative) when ``target`` cannot run what the graph needs."""
    order = [info.precision] + sorted(info.needs - {info.precision})
    for p in order:
        check_supported(target, p)


def tensorrt_qdq_problems(model: onnx.ModelProto) -> list[str]:
    """Q/DQ nodes the TensorRT ONNX parser rejects, checked before any build.

    TensorRT supports symmetric quantization only (zero points must be 0), strictly positive
    scales, per-tensor activation scales (per-channel only for constant weights), FP8 as E4M3
    only, and INT4 only with an even last dimension (onnx-tensorrt onnxOpImporters.cpp,
    NvInfer.h IDequantizeLayer).
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    problems: list[str] = []

    def value(name: str) -> np.ndarray | None:
        t = inits.get(name)
        if t is None or t.data_location == TensorProto.EXTERNAL:
            return None
        try:
            return numpy_helper.to_array(t).astype(np.float32)
        except (ValueError, TypeError):
            return None

    for node in g.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        label = f"{node.op_type} {node.name or node.output[0]!r}"
        if node.op_type == "QuantizeLinear" and (len(node.input) < 3 or not node.input[2]) \
                and not any(a.name == "output_dtype" for a in node.attribute):
            problems.append(f"{label} has no zero point, so it quantizes to uint8; TensorRT needs a signed int8 "
                            "or FP8 zero point of 0")
        if len(node.input) > 2 and node.input[2]:
            zp = value(node.input[2])
            zt = inits.get(node.input[2])
            if zt is not None and zt.data_type in (TensorProto.UINT8, TensorProto.UINT4):
                problems.append(f"{label} uses an unsigned zero point; TensorRT only supports signed symmetric "
                                "quantization")
            elif zp is not None and np.any(zp != 0):
                problems.append(f"{label} has a non-zero zero point; TensorRT only supports symmetric quantization")
            if zt is not None and zt.data_type in (TensorProto.FLOAT8E5M2, TensorProto.FLOAT8E4M3FNUZ,
                                                   TensorProto.FLOAT8E5M2FNUZ):
                problems.append(f"{label} uses an FP8 type other than E4M3FN, which TensorRT does not support")
        scale = value(node.input[1])
        if scale is not None and np.any(scale <= 0):
            problems.append(f"{label} has scales <= 0; TensorRT needs strictly positive scales")
        if node.op_type == "DequantizeLinear":
            x = node.input[0]
            constant = x in inits or (producers.get(x) is not None and producers[x].op_type == "Constant")
            if not constant and scale is not None and scale.size > 1:
                problems.append(f"{label} dequantizes an activation per channel; TensorRT supports per-channel "
                                "scales only for weights")
            t = inits.get(x)
            if t is not None and t.data_type in (TensorProto.INT4, TensorProto.UINT4) and t.dims and t.dims[-1] % 2:
                problems.append(f"{label}: INT4 weights with an odd last dimension ({t.dims[-1]}) are not supported "
                                "by TensorRT")
    return problems
