"""FP32 -> FP16 graph conversion that keeps numerically sensitive ops in FP32.

TensorRT 10/11 strongly typed networks run each op in the type the graph gives it; there are
no builder precision flags any more. The FP16 reference engine is built from exactly this
graph, so the graph itself must be safe in FP16:

* LayerNormalization and the RMSNorm chain (Pow/ReduceMean/Add/Sqrt/Div/Mul) stay FP32: the
  mean of squares of 1000-wide hidden states overflows FP16's 65504 easily.
* Softmax stays FP32 (exp of large logits and the row sum), with its input mask.
* Everything else, the GEMMs above all, runs in FP16 with FP32 casts inserted at the edges.

Constants beyond FP16's range (the -3.4e38 attention-mask fill) are clipped to +-65504 by the
converter, so fully masked rows stay finite instead of becoming NaN.

We use ONNX Runtime's converter (``onnxruntime.transformers.float16``, shipped in the
onnxruntime wheel) and only choose the nodes it must keep in FP32.
"""

from __future__ import annotations

import onnx

from trtforge.graph import GraphIndex, find_norms, topological_sort

# Always FP32 by op type.
FP32_OPS = ("Softmax", "LayerNormalization", "Range", "Cos", "Sin")


def fp32_node_names(model: onnx.ModelProto) -> list[str]:
    idx = GraphIndex(model)
    names: list[str] = []
    for norm in find_norms(model, idx):
        nodes = list(norm.nodes)
        if norm.kind == "rmsnorm" and norm.scale_node:
            # The final multiply by the learned scale is safe in FP16 and lets the GEMM that
            # follows read an FP16 tensor without a cast.
            nodes.remove(norm.scale_node)
        names += nodes
    for node in model.graph.node:
        # The additive attention mask feeding a Softmax stays FP32 together with it.
        if node.op_type == "Softmax":
            prod = idx.producer.get(node.input[0])
            if prod is not None and prod.op_type == "Add":
                names.append(prod.name)
    return names


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    block = fp32_node_names(model)
    out = convert_float_to_float16(
        model,
        keep_io_types=False,
        op_block_list=list(FP32_OPS),
        node_block_list=block,
        disable_shape_infer=False,
    )
    return topological_sort(out)
