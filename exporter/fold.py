"""Constant folding of a traced graph that holds no weights.

The TorchScript exporter's own folding (``do_constant_folding=True``) also folds expressions of
parameters, and computes each: the transpose of every Linear weight, a second copy of nearly all
the weights in memory while it exports. trtforge traces with ``do_constant_folding=False`` and
folds here instead, on the small graph: chains of ``Constant`` nodes (the shape arithmetic of
Unsqueeze/Concat and friends) are evaluated with ``onnx.reference``, and ``Transpose`` of a
parameter becomes a transposed initializer when the parameter is attached (``_torch``), one
tensor at a time. The graph then matches the exporter's folded one node for node.
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

# ops folded when every input is a constant (what the exporter folds in these graphs)
FOLDABLE = {"Unsqueeze", "Squeeze", "Concat", "Cast", "Reshape", "Transpose", "Slice", "Gather", "Add", "Sub",
            "Mul", "Div", "Neg", "Sqrt", "Shape", "Identity", "Equal", "Where", "Range", "ConstantOfShape"}
_MAX_ELEMENTS = 1 << 16  # never fold into a big constant (there are none in these graphs)


def fold_constants(model: onnx.ModelProto) -> int:
    """Fold nodes whose inputs are all ``Constant`` outputs into ``Constant`` nodes, in place;
    returns how many were folded. Constants nobody reads any more are removed."""
    from onnx.reference import ReferenceEvaluator

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    g = model.graph
    values: dict = {}
    out_nodes: list[onnx.NodeProto] = []
    folded = 0
    for node in g.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            out_nodes.append(node)
            continue
        if (node.op_type in FOLDABLE and node.domain in ("", "ai.onnx") and len(node.output) == 1
                and all(i == "" or i in values for i in node.input)
                and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)):
            one = helper.make_model(
                helper.make_graph([node], "fold", [], [helper.make_tensor_value_info(node.output[0], 0, None)]),
                opset_imports=[helper.make_opsetid("", opset)])
            try:
                (result,) = ReferenceEvaluator(one).run(None, {i: values[i] for i in node.input if i})
            except Exception:  # an op the reference cannot run: leave it to the runtime
                out_nodes.append(node)
                continue
            if result.size <= _MAX_ELEMENTS:
                values[node.output[0]] = result
                const = helper.make_node("Constant", [], [node.output[0]], name=node.name,
                                         value=numpy_helper.from_array(result, node.output[0]))
                out_nodes.append(const)
                folded += 1
                continue
        out_nodes.append(node)
    used = {i for n in out_nodes for i in n.input} | {o.name for o in g.output}
    kept = [n for n in out_nodes if n.op_type != "Constant" or n.output[0] in used]
    del g.node[:]
    g.node.extend(kept)
    return folded
