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
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

U8_SUFFIX = "_u8zp128"


def _array(t: onnx.TensorProto) -> np.ndarray | None:
    if t.data_location == TensorProto.EXTERNAL:
        return None
    return numpy_helper.to_array(t)


def symmetric_int8_to_uint8(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Pure pass: returns a rewritten copy and the number of Q/DQ groups changed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
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
