"""Fold constant weight DequantizeLinear nodes into float initializers, bit for bit.

In:  a ModelProto and the quantized weight types to fold (FP8, or INT8 in FP16 graphs: the
     flavours ONNX Runtime's CPU provider has no fused kernel for).
Out: the graph with ``DequantizeLinear(W_q, s)`` of constant ``W_q`` replaced by the float
     initializer it computes, and the number of nodes folded. Activation Q/DQ are kept, so the
     graph still rounds activations to the quantization grid.

Exactness: the DQ computes ``float(q) * s`` (zero point 0) and rounds once to the scale's type.
An FP8 E4M3 (4 significant bits) or INT8 (8 bits) value times an FP16 scale (11 bits) is exact
in float32, so the single rounding to FP16 is the only one; with an FP32 scale both sides do one
float32 multiply. Tests compare the folded model with the original (np.array_equal).

(ONNX Runtime folds them itself with ``session.disable_quant_qdq=1``, but that switch also turns
off its other QDQ handling; doing it here keeps the rule in one visible place.)

Every weight is bit-identical, but with ONNX Runtime's default prepacking the network's output
is not: a prepacked constant MatMul weight is summed in another order than a weight computed at
run time (measured for K > 256), and a float difference of 1e-7 can move an activation across a
rounding boundary of a later QuantizeLinear (FP8 steps are 6-12% wide). Those flips grow through
the layers: 1.7% relative RMS on an 8-layer K=320 FP8 chain, 4.3% on the random 24-layer
llama-100m (33% was reported on a real 135M LLaMA). So the CPU target loads folded graphs with
``session.disable_prepacking=1`` (engines/cpu.py), which sums as the input graph does (0 to 3e-7).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from trtforge.onnx_io import Weights

FOLDABLE = {TensorProto.FLOAT8E4M3FN: "fp8", TensorProto.INT8: "int8"}


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return a.i
    return default


def fold_weight_dequantize(model: onnx.ModelProto, types: set[int], *, weights: Weights | None = None,
                           only: set[str] | None = None) -> tuple[onnx.ModelProto, int]:
    """Returns the folded graph (a copy of an in-memory model, or, given ``weights`` bound to
    ``model``, ``model`` itself: each weight read from its file and its float value written
    through ``weights.put`` as it is folded) and the number of nodes folded. ``only``: fold just
    the DequantizeLinear nodes of these weight initializers (the CPU target's per-GEMM float
    fallback)."""
    if weights is None:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        weights = Weights(out)
    elif weights.model is not model:
        raise ValueError("weights must belong to the model being folded")
    else:
        out = model
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    keep, new_inits, folded = [], [], 0
    for node in g.node:
        ok = (node.op_type == "DequantizeLinear" and node.input[0] in inits and node.input[1] in inits
              and inits[node.input[0]].data_type in types and _attr(node, "block_size", 0) == 0
              and (only is None or node.input[0] in only))
        if ok and len(node.input) > 2 and node.input[2]:
            zp = inits.get(node.input[2])
            ok = zp is not None and not np.any(weights.array(zp).astype(np.float32) != 0)
        if not ok:
            keep.append(node)
            continue
        q = weights.array(inits[node.input[0]]).astype(np.float32)
        s = weights.array(inits[node.input[1]])
        s32 = s.astype(np.float32)
        if s32.ndim == 1 and s32.size > 1:
            axis = _attr(node, "axis", 1) % q.ndim
            shape = [1] * q.ndim
            shape[axis] = -1
            s32 = s32.reshape(shape)
        out_type = _attr(node, "output_dtype", 0) or inits[node.input[1]].data_type
        value = (q * s32).astype(helper.tensor_dtype_to_np_dtype(out_type))
        new_inits.append(weights.put(value, node.output[0]))
        del q, value
        folded += 1
    if not folded:
        return out, 0
    del g.node[:]
    g.node.extend(keep)
    used = {i for n in keep for i in n.input} | {o.name for o in g.output}
    for sub in keep:
        for a in sub.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used |= {i for n in a.g.node for i in n.input}
    remaining = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(remaining + new_inits)
    return out, folded
