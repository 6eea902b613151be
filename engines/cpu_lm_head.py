"""CPU target, opt-in (``cpu_lm_head = "int8"``): a decoder's float lm_head as an INT8 GEMM.

In:  the staged graph of a CPU build (FP32, quantized or not) and the vocabulary size.
Out: the same graph with the lm_head ``MatMul(x, W[K, vocab])`` replaced by per-token dynamic
     INT8 activations times per-channel INT8 weights, summed exactly in int32 by ONNX Runtime's
     U8U8 kernel (``MatMulIntegerToFloat``), and a record of what was done.

Why: the quantize presets keep the lm_head in float (TensorRT-LLM and Model Optimizer do too),
and for a large vocabulary it is most of a small decoder's arithmetic: Gemma 3 270M's is
640 x 262,144, 168M of its 268M parameters, so the 18 INT8 layers barely move the CPU
artifact's latency while the FP32 lm_head is there (docs/benchmarks.md, "CPU target on a real
decoder"). ONNX Runtime has no per-token dynamic quantizer (DynamicQuantizeLinear is per
tensor; MatMulIntegerToFloat scales A per column, not per row), so the activation side is
written out as plain ops: ``s = max|x| / 127`` per token, ``q = clip(round(x / s) + 128, 0, 255)``
as uint8, then ``MatMulIntegerToFloat(q, W_u8, 1, w_scale, 128, 128) * s``.

Why opt-in: it changes what the artifact computes (every other CPU rewrite keeps the Q/DQ
input's values, see cpu.py). Measured on the real Gemma 3 270M's final hidden states (6 held-out
windows of 256 tokens, numpy, /work/out/lead/lmhead_err.py-style): per-token INT8 lm_head alone
+0.60% perplexity, top-1 agreement 0.962, KL 0.0046; per-tensor dynamic (DynamicQuantizeLinear,
ONNX Runtime's quantize_dynamic) +0.76%, 0.947, 0.0083; weight-only INT8 +0.36%, 0.981.

Why U8U8 (weights stored ``w + 128``): the same reason as the other INT8 GEMMs of the CPU target
(qdq_u8.py): exact on every x86-64 CPU, where U8S8 saturates without VNNI.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trtforge.engines.targets import INT8
from trtforge.onnx_io import Weights

log = logging.getLogger(__name__)

INT8_LM_HEAD = INT8.value
FLOAT_LM_HEAD = "float"
CHOICES = (FLOAT_LM_HEAD, INT8_LM_HEAD)
MS_DOMAIN = "com.microsoft"
_TINY = np.float32(1e-30)


def find_lm_head(model: onnx.ModelProto, vocab_size: int | None) -> onnx.NodeProto | None:
    """The float MatMul whose constant 2-D weight is [K, vocab] and whose output is a graph output
    or feeds one through elementwise ops only (logit soft-capping); None if there is none."""
    if not vocab_size:
        return None
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    floats = (TensorProto.FLOAT,)
    outputs = {o.name for o in g.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def reaches_output(name: str, depth: int = 0) -> bool:
        if name in outputs:
            return True
        users = consumers.get(name, [])
        return depth < 4 and len(users) == 1 and users[0].op_type in ("Div", "Tanh", "Mul", "Cast") \
            and reaches_output(users[0].output[0], depth + 1)

    for n in g.node:
        if n.op_type != "MatMul" or n.input[1] not in inits:
            continue
        w = inits[n.input[1]]
        if w.data_type in floats and len(w.dims) == 2 and int(w.dims[1]) == int(vocab_size) \
                and reaches_output(n.output[0]):
            return n
    return None


def quantize_lm_head(model: onnx.ModelProto, weights: Weights, vocab_size: int | None) -> dict | None:
    """Rewrite the lm_head in place (``weights`` bound to ``model``); the build record, or None
    when the graph has no float lm_head (an encoder, or one already quantized)."""
    node = find_lm_head(model, vocab_size)
    if node is None:
        return None
    g = model.graph
    w_init = next(t for t in g.initializer if t.name == node.input[1])
    w = weights.array(w_init).astype(np.float32)  # [K, N]
    k, n = w.shape
    scale = np.abs(w).max(axis=0) / np.float32(127.0)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    q = np.empty((k, n), np.uint8)
    for c in range(0, n, 16384):  # a slab of columns at a time: no float64 copy of the whole weight
        sl = slice(c, c + 16384)
        q[:, sl] = (np.clip(np.rint(w[:, sl] / scale[sl]), -127, 127) + 128).astype(np.uint8)
    err = float(np.sqrt(np.mean(((q[:, :4096].astype(np.float32) - 128) * scale[:4096] - w[:, :4096]) ** 2))
                / max(np.sqrt(np.mean(w[:, :4096] ** 2)), 1e-30))
    del w
    base = (node.name or node.output[0]).replace("/", "_").strip("_") + "_int8"
    x, y = node.input[0], node.output[0]
    t = {s: f"{base}/{s}" for s in ("abs", "amax", "amax_safe", "s", "xs", "r", "r128", "clip", "q", "acc")}
    consts = [
        numpy_helper.from_array(np.array([-1], np.int64), f"{base}/axes"),
        numpy_helper.from_array(np.array(127.0, np.float32), f"{base}/qmax"),
        numpy_helper.from_array(np.array(_TINY, np.float32), f"{base}/tiny"),
        numpy_helper.from_array(np.array(128.0, np.float32), f"{base}/f128"),
        numpy_helper.from_array(np.array(0.0, np.float32), f"{base}/f0"),
        numpy_helper.from_array(np.array(255.0, np.float32), f"{base}/f255"),
        numpy_helper.from_array(np.array(1.0, np.float32), f"{base}/one"),
        numpy_helper.from_array(np.array(128, np.uint8), f"{base}/zp_a"),
        numpy_helper.from_array(np.full(n, 128, np.uint8), f"{base}/zp_w"),
        numpy_helper.from_array(scale, f"{base}/w_scale"),
        weights.put(q, f"{node.input[1]}_u8_lm_head"),
    ]
    del q
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    reduce = helper.make_node("ReduceMax", [t["abs"], f"{base}/axes"], [t["amax"]], keepdims=1, name=f"{base}/ReduceMax") \
        if opset >= 18 else helper.make_node("ReduceMax", [t["abs"]], [t["amax"]], axes=[-1], keepdims=1,
                                             name=f"{base}/ReduceMax")  # axes became an input in opset 18
    if opset < 18:
        consts = [c for c in consts if c.name != f"{base}/axes"]
    new_nodes = [
        helper.make_node("Abs", [x], [t["abs"]], name=f"{base}/Abs"),
        reduce,
        helper.make_node("Max", [t["amax"], f"{base}/tiny"], [t["amax_safe"]], name=f"{base}/Max"),
        helper.make_node("Div", [t["amax_safe"], f"{base}/qmax"], [t["s"]], name=f"{base}/Scale"),
        helper.make_node("Div", [x, t["s"]], [t["xs"]], name=f"{base}/Div"),
        helper.make_node("Round", [t["xs"]], [t["r"]], name=f"{base}/Round"),
        helper.make_node("Add", [t["r"], f"{base}/f128"], [t["r128"]], name=f"{base}/Add"),
        helper.make_node("Clip", [t["r128"], f"{base}/f0", f"{base}/f255"], [t["clip"]], name=f"{base}/Clip"),
        helper.make_node("Cast", [t["clip"]], [t["q"]], to=TensorProto.UINT8, name=f"{base}/Cast"),
        helper.make_node("MatMulIntegerToFloat",
                         [t["q"], f"{node.input[1]}_u8_lm_head", f"{base}/one", f"{base}/w_scale",
                          f"{base}/zp_a", f"{base}/zp_w"], [t["acc"]], domain=MS_DOMAIN, name=f"{base}/MatMul"),
        helper.make_node("Mul", [t["acc"], t["s"]], [y], name=f"{base}/Rescale"),
    ]
    at = list(g.node).index(node)
    g.node.remove(node)
    for i, nn in enumerate(new_nodes):
        g.node.insert(at + i, nn)
    if not any(w_init.name in nd.input for nd in g.node):
        g.initializer.remove(w_init)
        weights.drop(w_init.name)
    g.initializer.extend(consts)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    rec = {"node": node.name or y, "weight": w_init.name, "shape": [int(k), int(n)],
           "scheme": "per-token dynamic INT8 activations x per-channel INT8 weights (U8U8, int32 sum)",
           "weight_relative_rms_err": round(err, 6)}
    log.info("cpu target: lm_head %s (%dx%d) as an INT8 GEMM (per-token dynamic activations, per-channel weights; "
             "--cpu-lm-head float keeps it in float)", rec["node"], k, n)
    return rec
