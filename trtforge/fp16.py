"""FP32 -> FP16 graph conversion that keeps numerically sensitive regions in FP32.

TensorRT 10/11 strongly typed networks run each op in the type the graph gives it; there are
no builder precision flags any more. The FP16 reference engine is built from exactly this
graph, so the graph itself must be safe in FP16. Kept in FP32:

* LayerNormalization, and the RMSNorm chain Pow/ReduceMean/Add/Sqrt/Div/Mul up to (not
  including) the multiply by the learned scale: the mean of squares of a hidden state
  overflows FP16's 65504 as soon as one channel exceeds 256. The per-head QK-norms (Gemma 3,
  Qwen3) are RMSNorms too; Gemma's (1 + w) norms keep their scale multiply in FP32 as well,
  as transformers computes them (``(x * (1 + w)).to(float16)``, not ``x.to(float16) * w``).
* Softmax and the additive mask feeding it (exp and the row sum).
* The rotary-embedding cone from ``position_ids`` to Cos/Sin: positions beyond 2048 are not
  representable in FP16 and the angle products lose all precision.
Everything else, the GEMMs above all, is FP16. Casts are inserted only where an FP32 region
meets an FP16 one. Constants beyond FP16's range (the -3.4e38 attention-mask fill) are
clipped to +-65504 so fully masked rows stay finite instead of becoming NaN.

Why not ONNX Runtime's converter (onnxruntime.transformers.float16): with a node block list
it casts the output of every blocked node to FP16 and back before the next blocked node, so
the RMSNorm's x**2 still passes through FP16 and overflows (seen with onnxruntime 1.32 on the
tiny LLaMA in tests: Pow -> Cast(fp16) -> Cast(fp32) -> ReduceMean). Model Optimizer's
AutoCast does this properly but is not a dependency we can require (see docs/notes).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trtforge.graph import GraphIndex, find_norms, tensor_types, topological_sort

FP32_OPS = {"Softmax", "LayerNormalization", "Range", "Cos", "Sin"}
F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
_MAX16 = float(np.finfo(np.float16).max)


def fp32_node_names(model: onnx.ModelProto, idx: GraphIndex | None = None) -> set[str]:
    idx = idx or GraphIndex(model)
    names: set[str] = {n.name for n in model.graph.node if n.op_type in FP32_OPS}
    for norm in find_norms(model, idx):
        # Gemma's (1 + w) scale multiplies in FP32 too, as its reference does ((x * w).to(fp16))
        names |= {n for n in norm.nodes if n != norm.scale_node or norm.kind == "layernorm" or norm.plus_one}
    for node in model.graph.node:
        if node.op_type == "Softmax":
            prod = idx.producer.get(node.input[0])
            if prod is not None and prod.op_type == "Add":
                names.add(prod.name)
    names |= _rotary_cone(model, idx)
    # Constants read only by FP32 nodes stay FP32 (an epsilon of 1e-6 is subnormal in FP16).
    for node in model.graph.node:
        if node.op_type in ("Constant", "ConstantOfShape"):
            users = [u for o in node.output for u in idx.consumers.get(o, [])]
            if users and all(u.name in names for u in users):
                names.add(node.name)
    return names


def _rotary_cone(model: onnx.ModelProto, idx: GraphIndex) -> set[str]:
    """Nodes on a path from position_ids to a Cos/Sin output."""
    if "position_ids" not in idx.graph_inputs:
        return set()
    down: set[str] = set()
    frontier = ["position_ids"]
    seen_t: set[str] = set()
    while frontier:
        t = frontier.pop()
        if t in seen_t:
            continue
        seen_t.add(t)
        for c in idx.consumers.get(t, []):
            if c.name not in down:
                down.add(c.name)
                if c.op_type not in ("Cos", "Sin"):
                    frontier += list(c.output)
    # keep only nodes from which a Cos/Sin is reachable (walk back from Cos/Sin)
    by_name = {n.name: n for n in model.graph.node}
    cone: set[str] = set()
    stack = [n for n in by_name if n in down and by_name[n].op_type in ("Cos", "Sin")]
    while stack:
        n = stack.pop()
        if n in cone:
            continue
        cone.add(n)
        for i in by_name[n].input:
            p = idx.producer.get(i)
            if p is not None and p.name in down:
                stack.append(p.name)
    return cone


def _to16(arr: np.ndarray) -> np.ndarray:
    return np.clip(arr, -_MAX16, _MAX16).astype(np.float16)


def convert_to_fp16(model: onnx.ModelProto, *, initializer_to16=None) -> onnx.ModelProto:
    """``initializer_to16(t)``: casts one FP32 initializer in place (default: from its embedded data;
    the quantize stage passes one that records the cast for weights left in external data)."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in model.graph.node for a in n.attribute):
        raise NotImplementedError("FP16 conversion of graphs with subgraphs (If/Loop) is not supported")
    idx = GraphIndex(model)
    keep32 = fp32_node_names(model, idx)
    types = tensor_types(model)
    g = model.graph

    def is_float(name: str) -> bool:
        return types.get(name) == F32

    # Home precision of each float tensor: where its producer runs.
    home: dict[str, int] = {}
    for node in g.node:
        prec = F32 if node.name in keep32 else F16
        for o in node.output:
            if is_float(o) or (node.op_type == "Cast" and _cast_to(node) == F32):
                home[o] = prec
    for i in g.input:
        if i.type.tensor_type.elem_type == F32:
            home[i.name] = F16
            i.type.tensor_type.elem_type = F16
    for t in g.initializer:
        if t.data_type == F32:
            users = idx.consumers.get(t.name, [])
            if users and all(u.name in keep32 for u in users):
                home[t.name] = F32
            else:
                (initializer_to16 or _initializer_to16)(t)
                home[t.name] = F16

    # Nodes: retype attributes of FP16 nodes, then insert boundary casts.
    casts: dict[tuple[str, int], str] = {}
    new_nodes: list[onnx.NodeProto] = []
    for node in g.node:
        prec = F32 if node.name in keep32 else F16
        if prec == F16:
            if node.op_type == "Cast" and _cast_to(node) == F32:
                _set_cast_to(node, F16)
            elif node.op_type == "Constant":
                _constant_to16(node)
            elif node.op_type == "ConstantOfShape":
                _constant_of_shape_to16(node)
        for k, name in enumerate(node.input):
            h = home.get(name)
            if h is None or h == prec:
                continue
            key = (name, prec)
            if key not in casts:
                cname = idx.unique(f"{name}_to_{'fp32' if prec == F32 else 'fp16'}")
                new_nodes.append(helper.make_node("Cast", [name], [cname], name=cname + "_cast", to=prec))
                casts[key] = cname
            node.input[k] = casts[key]
        new_nodes.append(node)
    # Graph outputs are FP16.
    for out in g.output:
        if out.type.tensor_type.elem_type != F32:
            continue
        out.type.tensor_type.elem_type = F16
        if home.get(out.name) == F32:
            prod = idx.producer[out.name]
            inner = idx.unique(out.name + "_fp32")
            for k, o in enumerate(prod.output):
                if o == out.name:
                    prod.output[k] = inner
            for n in new_nodes:
                for k, i in enumerate(n.input):
                    if i == out.name:
                        n.input[k] = inner
            new_nodes.append(helper.make_node("Cast", [inner], [out.name], name=out.name + "_cast_fp16", to=F16))
    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]  # stale FP32 types; re-inferred by whoever needs them
    return topological_sort(model)


def _initializer_to16(t: onnx.TensorProto) -> None:
    t.CopyFrom(numpy_helper.from_array(_to16(numpy_helper.to_array(t)), t.name))


def _cast_to(node: onnx.NodeProto) -> int | None:
    for a in node.attribute:
        if a.name == "to":
            return a.i
    return None


def _set_cast_to(node: onnx.NodeProto, to: int) -> None:
    for a in node.attribute:
        if a.name == "to":
            a.i = to


def _constant_to16(node: onnx.NodeProto) -> None:
    for a in node.attribute:
        if a.name == "value" and a.t.data_type == F32:
            a.t.CopyFrom(numpy_helper.from_array(_to16(numpy_helper.to_array(a.t)), a.t.name))
        elif a.name in ("value_float", "value_floats"):
            raise NotImplementedError("Constant value_float(s) in FP16 region")


def _constant_of_shape_to16(node: onnx.NodeProto) -> None:
    for a in node.attribute:
        if a.name == "value" and a.t.data_type == F32:
            a.t.CopyFrom(numpy_helper.from_array(_to16(numpy_helper.to_array(a.t)), a.t.name))
    if not any(a.name == "value" for a in node.attribute):
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16))))
