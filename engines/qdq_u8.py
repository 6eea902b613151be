"""Rewrite symmetric INT8 activation Q/DQ pairs to UINT8 with zero point 128 (same values).

In:  a ModelProto with TensorRT-style activation quantization: ``QuantizeLinear(x, s, zp=int8 0)``
     whose output feeds only ``DequantizeLinear(., s, zp)``.
Out: the same graph with those zero points replaced by a uint8 128 (same shape), and the number
     of pairs rewritten. Weights (constant int8 -> DequantizeLinear) are left alone, and so are
     FP8 and INT4 nodes.

Why: ONNX Runtime's CPU kernels are fast for unsigned 8-bit activations with signed 8-bit
weights (U8S8); with signed activations its QDQ fusions are skipped on x86 and the graph runs
slower than FP32. The values are identical: QuantizeLinear computes
``saturate(round(x / s) + zp)``, so for int8 ``q = clamp(r, -128, 127)`` and for uint8 with
zp 128 ``q' = clamp(r + 128, 0, 255) = q + 128``; DequantizeLinear gives ``(q' - 128) * s = q * s``.

GEMM weights: :func:`int8_weights_to_uint8` stores constant INT8 weights that feed a MatMul/Gemm
through their DequantizeLinear as UINT8 ``w + 128`` with zero point 128 (same values again:
``(w + 128 - 128) * s``), so ONNX Runtime fuses U8U8 integer GEMMs instead of U8S8. Why: MLAS's
x86 U8S8 kernel for CPUs without VNNI (AVX2, AVX-512 without VNNI) multiplies with
``vpmaddubsw``, which adds two u8*s8 products into a *saturating* int16; a u8 activation of 200
(a value of 72 after the zero point 128) times an s8 weight of 100, twice, is 40000 > 32767.
Measured on an AMD EPYC with AVX2 and no VNNI (onnxruntime 1.32): a 16x256x64 MatMulInteger
with uniform random int8 operands is off by up to 18% of the output range in 99% of its
elements, and with N(0,30) activations x N(0,40) weights by 7.5% in 1.4% of them; the U8U8
kernel (int16 operands, ``vpmaddwd``, which does not saturate) is exact on the same data. On
VNNI CPUs (``vpdpbusd``) both are exact, so U8U8 is the choice that is exact on every x86-64
CPU an artifact may be moved to (and on ARM, whose U8U8 kernels are exact too).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from trtforge.onnx_io import Weights

U8_SUFFIX = "_u8zp128"
U8_WEIGHT_SUFFIX = "_u8"
GEMM_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1}


def _target(model: onnx.ModelProto, weights: Weights | None) -> tuple[onnx.ModelProto, Weights]:
    """The graph a pass edits: a copy of an in-memory model (pure pass), or, given ``weights``
    (bound to ``model``, whose data may be external), ``model`` itself: no copy of the weights."""
    if weights is None:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out, Weights(out)
    if weights.model is not model:
        raise ValueError("weights must belong to the model being rewritten")
    return model, weights


def symmetric_int8_to_uint8(model: onnx.ModelProto, *, weights: Weights | None = None) -> tuple[onnx.ModelProto, int]:
    """Returns the rewritten graph (a copy, or ``model`` itself when ``weights`` is given) and
    the number of Q/DQ groups changed."""
    out, weights = _target(model, weights)
    g = out.graph

    def _array(t: onnx.TensorProto) -> np.ndarray:
        return weights.array(t)

    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    new_inits: dict[str, onnx.TensorProto] = {}
    replaced: set[str] = set()
    changed = 0
    for q in g.node:
        if q.op_type != "QuantizeLinear" or len(q.input) < 3 or not q.input[2]:
            continue
        if any(a.name == "output_dtype" for a in q.attribute):
            continue
        zt = inits.get(q.input[2])
        if zt is None or zt.data_type != TensorProto.INT8:
            continue
        zp = _array(zt)
        if zp is None or np.any(zp != 0):
            continue
        users = consumers.get(q.output[0], [])
        if not users or q.output[0] in outputs:
            continue
        if any(u.op_type != "DequantizeLinear" or len(u.input) < 3 or u.input[1] != q.input[1]
               or u.input[2] != q.input[2] for u in users):
            continue
        name = q.input[2] + U8_SUFFIX
        if name not in new_inits:
            new_inits[name] = numpy_helper.from_array(np.full(zp.shape, 128, np.uint8), name)
        replaced.add(q.input[2])
        q.input[2] = name
        for u in users:
            u.input[2] = name
        changed += 1
    if not changed:
        return out, 0
    still_used = _used_names(g) | outputs
    keep = [t for t in g.initializer if t.name not in replaced or t.name in still_used]
    del g.initializer[:]
    g.initializer.extend(keep + list(new_inits.values()))
    return out, changed


def int8_weights_to_uint8(model: onnx.ModelProto, *, weights: Weights | None = None) -> tuple[onnx.ModelProto, int]:
    """Constant INT8 GEMM weights (zero point 0) become UINT8 ``w + 128`` with zero point 128.

    A weight qualifies when it is an initializer read only by DequantizeLinear nodes (per tensor
    or per axis, not blocked) with no or an all-zero INT8 zero point, each of whose outputs feeds
    only the weight input of MatMul/Gemm nodes. Returns the rewritten graph (a copy, or ``model``
    itself when ``weights`` is given: the weights are then read from their files one at a time
    and the new ones written through ``weights.put``) and the number of DequantizeLinear nodes
    changed.
    """
    out, weights = _target(model, weights)
    g = out.graph

    def _array(t: onnx.TensorProto) -> np.ndarray:
        return weights.array(t)

    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in g.node:
        for k, i in enumerate(n.input):
            consumers.setdefault(i, []).append((n, k))
    outputs = {o.name for o in g.output}
    candidates: dict[str, list[onnx.NodeProto]] = {}
    for dq in g.node:
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or dq.input[1] not in inits:
            continue
        w = inits[dq.input[0]]
        if w.data_type != TensorProto.INT8 or any(a.name == "block_size" and a.i for a in dq.attribute):
            continue
        if len(dq.input) > 2 and dq.input[2]:
            zt = inits.get(dq.input[2])
            zp = _array(zt) if zt is not None else None
            if zp is None or zt.data_type != TensorProto.INT8 or np.any(zp != 0):
                continue
        users = consumers.get(dq.output[0], [])
        if not users or dq.output[0] in outputs or any(GEMM_WEIGHT_INPUT.get(u.op_type) != k for u, k in users):
            continue
        candidates.setdefault(w.name, []).append(dq)
    new_inits: list[onnx.TensorProto] = []
    replaced: set[str] = set()
    changed = 0
    for name, dqs in candidates.items():
        if len(consumers.get(name, [])) != len(dqs) or name in outputs:
            continue  # the int8 tensor is also read as int8 elsewhere
        q = _array(inits[name])
        u8 = name + U8_WEIGHT_SUFFIX
        new_inits.append(weights.put((q.astype(np.int16) + 128).astype(np.uint8), u8))
        del q
        for dq in dqs:
            zp_name = f"{dq.name or dq.output[0]}_zp{U8_SUFFIX}"  # shaped like the scale (per tensor or axis)
            new_inits.append(numpy_helper.from_array(np.full(tuple(inits[dq.input[1]].dims), 128, np.uint8), zp_name))
            dq.input[0] = u8
            if len(dq.input) > 2:
                if dq.input[2]:
                    replaced.add(dq.input[2])
                dq.input[2] = zp_name
            else:
                dq.input.append(zp_name)
            changed += 1
        replaced.add(name)
    if not changed:
        return out, 0
    still_used = _used_names(g) | outputs
    keep = [t for t in g.initializer if t.name not in replaced or t.name in still_used]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    return out, changed


def _used_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node reads, subgraphs (If/Loop/Scan bodies) included."""
    used = set()
    for n in graph.node:
        used.update(n.input)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used |= _used_names(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sg in a.graphs:
                    used |= _used_names(sg)
    return used
