"""Small helpers over ONNX graphs shared by the stages: indexes, pattern matches, edits.

Passes elsewhere are pure functions ``ModelProto -> ModelProto``; this module holds what they
share: who produces and who consumes a tensor, where the normalizations are (LayerNormalization
nodes, and RMSNorm as the Pow/ReduceMean/Add/Sqrt/Div/Mul chain the TorchScript exporter
writes for LLaMA-family models, Gemma's (1 + w) variant and the per-head QK-norms of Gemma 3 and
Qwen3 included), and unique-name generation.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trtforge.errors import InputError
from trtforge.onnx_io import Weights, copy_fields, is_external


class GraphIndex:
    """Producer/consumer maps of a graph. Rebuild it after structural edits.

    ``weights`` reads initializer values (trtforge.onnx_io.Weights): needed for graphs whose
    weights are in external data; without it, an external initializer has no known value."""

    def __init__(self, model: onnx.ModelProto, weights: Weights | None = None) -> None:
        g = model.graph
        self.model = model
        self.weights = weights
        self.graph = g
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in g.node:
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers[i].append(node)
        self.initializers: dict[str, TensorProto] = {t.name: t for t in g.initializer}
        self.graph_inputs = {i.name for i in g.input}
        self.graph_outputs = {o.name for o in g.output}
        self._names = {n.name for n in g.node} | set(self.producer) | set(self.initializers) | self.graph_inputs

    def array(self, name: str) -> np.ndarray:
        """An initializer's value, read through ``weights`` (from external data, edits applied)."""
        t = self.initializers[name]
        if self.weights is not None:
            return self.weights.array(t)
        if is_external(t):
            raise InputError(f"initializer {name} is in external data and this pass was given no folder to read it from",
                             "report this trtforge bug")
        return numpy_helper.to_array(t)

    def const_value(self, name: str) -> np.ndarray | None:
        """Value of an initializer or Constant node output, else None (also for an external
        initializer when the index has no ``weights`` to read it)."""
        if name in self.initializers:
            if self.weights is None and is_external(self.initializers[name]):
                return None
            return self.array(name)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name == "value_float":
                    return np.array(a.f, dtype=np.float32)
                if a.name == "value_floats":
                    return np.array(list(a.floats), dtype=np.float32)
                if a.name == "value_int":
                    return np.array(a.i, dtype=np.int64)
                if a.name == "value_ints":
                    return np.array(list(a.ints), dtype=np.int64)
        if node is not None and node.op_type == "Identity":
            return self.const_value(node.input[0])
        return None

    def is_const(self, name: str) -> bool:
        """Whether ``name`` is a constant (never reads an initializer's data)."""
        if name in self.initializers:
            return True
        node = self.producer.get(name)
        if node is not None and node.op_type == "Identity":
            return self.is_const(node.input[0])
        return node is not None and node.op_type == "Constant" and self.const_value(name) is not None

    def unique(self, base: str) -> str:
        name, k = base, 0
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

    def single_consumer(self, name: str) -> onnx.NodeProto | None:
        c = self.consumers.get(name, [])
        return c[0] if len(c) == 1 and name not in self.graph_outputs else None


@dataclass
class NormMatch:
    """One normalization whose output feeds GEMMs.

    ``scale`` / ``bias`` are initializer names multiplied/added last (the place SmoothQuant
    folds its factor into). ``nodes`` are all nodes of the pattern (kept in FP32 by the
    FP16 conversion).
    """

    kind: str  # "layernorm" | "rmsnorm"
    input: str
    output: str
    scale: str | None
    bias: str | None
    nodes: list[str] = field(default_factory=list)
    # the node whose input is the scale (LayerNormalization itself, or the final Mul)
    scale_node: str = ""
    # Gemma's RMSNorm, x / rms(x) * (1 + w). As trtforge exports it, ``scale`` is the initializer
    # ``<module>.weight_plus_one`` holding the sum (a fold is ``S / s``, as for any RMSNorm; the
    # Hugging Face weight is ``S - 1``). In a graph that keeps ``Add(1, w)``, ``scale`` is w and
    # ``scale_add`` that Add node (a fold is then ``w' = (1 + w) / s - 1``).
    plus_one: bool = False
    scale_add: str = ""
    # QK-norm (Gemma 3, Qwen3): normalizes each head of a q or k projection over head_dim; its
    # output feeds RoPE and the attention matmuls, never a weight GEMM.
    per_head: bool = False


def _skip_cast_forward(idx: GraphIndex, name: str) -> tuple[str, list[str]]:
    """Follow single-consumer Cast nodes downstream; returns (tensor, cast node names)."""
    casts = []
    while True:
        c = idx.single_consumer(name)
        if c is None or c.op_type != "Cast":
            return name, casts
        casts.append(c.name)
        name = c.output[0]


def find_norms(model: onnx.ModelProto, idx: GraphIndex | None = None) -> list[NormMatch]:
    idx = idx or GraphIndex(model)
    found: list[NormMatch] = []
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            scale = node.input[1] if len(node.input) > 1 else None
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            found.append(
                NormMatch("layernorm", node.input[0], node.output[0], scale, bias, [node.name], node.name)
            )
        elif node.op_type == "Pow":
            m = _match_rmsnorm(idx, node)
            if m is not None:
                found.append(m)
    return found


def _match_rmsnorm(idx: GraphIndex, pow_node: onnx.NodeProto) -> NormMatch | None:
    """x -> Pow(2) -> ReduceMean(-1) -> Add(eps) -> Sqrt -> Div(1, .) | Reciprocal -> Mul(x, .) -> [Cast] -> Mul(w)."""
    e = idx.const_value(pow_node.input[1])
    if e is None or float(np.asarray(e).reshape(-1)[0]) != 2.0:
        return None
    x = pow_node.input[0]
    nodes = [pow_node.name]
    rm = idx.single_consumer(pow_node.output[0])
    if rm is None or rm.op_type != "ReduceMean":
        return None
    add = idx.single_consumer(rm.output[0])
    if add is None or add.op_type != "Add":
        return None
    sq = idx.single_consumer(add.output[0])
    if sq is None or sq.op_type != "Sqrt":
        return None
    inv = idx.single_consumer(sq.output[0])
    if inv is None:
        return None
    nodes += [rm.name, add.name, sq.name]
    if inv.op_type == "Reciprocal":
        nodes.append(inv.name)
        rs = inv.output[0]
        mul = idx.single_consumer(rs)
        if mul is None or mul.op_type != "Mul" or x not in mul.input:
            return None
    elif inv.op_type == "Div":
        one = idx.const_value(inv.input[0])
        if one is None or inv.input[1] != sq.output[0]:
            # x / sqrt(...) form
            if inv.input[0] == x and inv.input[1] == sq.output[0]:
                mul = inv
            else:
                return None
        else:
            nodes.append(inv.name)
            mul = idx.single_consumer(inv.output[0])
            if mul is None or mul.op_type != "Mul" or x not in mul.input:
                return None
    else:
        return None
    nodes.append(mul.name)
    out, casts = _skip_cast_forward(idx, mul.output[0])
    nodes += casts
    wmul = idx.single_consumer(out)
    scale = None
    scale_node = scale_add = ""
    plus_one = False
    if wmul is not None and wmul.op_type == "Mul":
        other = wmul.input[1] if wmul.input[0] == out else wmul.input[0]
        if _is_float_initializer(idx, other):
            scale = other
            scale_node = wmul.name
            nodes.append(wmul.name)
            out = wmul.output[0]
            plus_one = other.endswith(PLUS_ONE_SUFFIX)
        else:
            w = _plus_one_operand(idx, other)
            if w is not None:  # Mul(normed, Add(1, w)): Gemma's norm with the sum left unfolded
                scale, scale_node, scale_add, plus_one = w, wmul.name, idx.producer[other].name, True
                nodes.append(wmul.name)
                out = wmul.output[0]
    # The input may arrive through a Cast (x.to(float32)); the pattern's input is the Cast's input.
    prod = idx.producer.get(x)
    if prod is not None and prod.op_type == "Cast" and len(idx.consumers[x]) == 2:
        nodes.insert(0, prod.name)
        x = prod.input[0]
    return NormMatch("rmsnorm", x, out, scale, None, nodes, scale_node, plus_one=plus_one, scale_add=scale_add,
                     per_head=_is_per_head(idx, x, scale))


# The initializer name trtforge's exporter gives the folded (1 + w) of a Gemma norm.
PLUS_ONE_SUFFIX = ".weight_plus_one"


def _is_float_initializer(idx: GraphIndex, name: str) -> bool:
    t = idx.initializers.get(name)
    return t is not None and t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)


def _plus_one_operand(idx: GraphIndex, name: str) -> str | None:
    """w when ``name`` is ``Add(1, w)`` (either order) of a float initializer w, else None."""
    add = idx.producer.get(name)
    if add is None or add.op_type != "Add" or len(add.input) != 2:
        return None
    for a, b in (add.input, add.input[::-1]):
        one = idx.const_value(a)
        if one is not None and one.size == 1 and float(one.reshape(-1)[0]) == 1.0 and _is_float_initializer(idx, b):
            return b
    return None


def _is_per_head(idx: GraphIndex, x: str, scale: str | None) -> bool:
    """True when ``x`` is a weight GEMM's output reshaped into heads (through Reshape, Transpose,
    Cast) and the norm's scale is narrower than that output: a QK-norm over head_dim. A norm on
    a GEMM output of its own width (Gemma's post-attention and post-feedforward norms) is not."""
    if scale is None or scale not in idx.initializers:
        return False
    width = int(np.prod(idx.initializers[scale].dims))
    reshaped = False
    for _ in range(8):
        p = idx.producer.get(x)
        if p is None:
            return False
        if p.op_type in ("MatMul", "Gemm"):
            w = idx.initializers.get(p.input[1]) if len(p.input) > 1 else None
            return reshaped and w is not None and len(w.dims) == 2 and width < max(w.dims)
        if p.op_type not in ("Reshape", "Transpose", "Cast", "Identity"):
            return False
        reshaped |= p.op_type == "Reshape"
        x = p.input[0]
    return False


def inline_identity_initializers(model: onnx.ModelProto, weights: Weights | None = None) -> onnx.ModelProto:
    """Point consumers of ``Identity(initializer)`` at a private copy of the initializer.

    The TorchScript exporter deduplicates equal initializers (e.g. the all-ones norm scales of
    a freshly initialized model) behind Identity nodes. Passes that rewrite one layer's weights
    (SmoothQuant, AWQ) must not change another's, so every consumer gets its own tensor.
    Edits ``model`` in place and returns it; an external tensor's copy is a second reference
    to the same bytes (``weights`` carries its recorded edits over), never a copy of the data.
    """
    weights = weights or Weights(model)
    idx = GraphIndex(model)
    keep = []
    found = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in idx.initializers and node.output[0] not in idx.graph_outputs:
            found.append(node)
            continue
        keep.append(node)
    if not found:
        return model
    for node in found:
        weights.clone(idx.initializers[node.input[0]], node.output[0])
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def set_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """Replace an initializer's value in place (same name, dtype may change)."""
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))
            return
    raise KeyError(name)


def onnx_dtype_name(elem_type: int) -> str:
    return helper.tensor_dtype_to_np_dtype(elem_type).name if elem_type not in _SPECIAL else _SPECIAL[elem_type]


_SPECIAL = {
    TensorProto.FLOAT8E4M3FN: "float8_e4m3fn",
    TensorProto.INT4: "int4",
    TensorProto.UINT4: "uint4",
    TensorProto.BFLOAT16: "bfloat16",
}


def describe_io(values) -> list[dict]:
    """Names, dtypes and shapes (ints or symbols) of graph inputs/outputs."""
    out = []
    for v in values:
        tt = v.type.tensor_type
        shape = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                shape.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                shape.append(d.dim_param)
            else:
                shape.append(None)
        out.append({"name": v.name, "dtype": onnx_dtype_name(tt.elem_type), "shape": shape})
    return out


def topological_sort(model: onnx.ModelProto) -> onnx.ModelProto:
    """Reorder nodes so every input is produced before it is used (in place; returns model).

    ONNX Runtime's FP16 converter appends the casts it inserts at the end of the node list,
    which onnx.checker rejects; nothing in onnx itself re-sorts a graph.
    """
    g = model.graph
    available = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    nodes = list(g.node)
    producers: dict[str, int] = {}
    for k, n in enumerate(nodes):
        for o in n.output:
            producers[o] = k
    deps: list[set[int]] = []
    users: dict[int, list[int]] = defaultdict(list)
    for k, n in enumerate(nodes):
        d = {producers[i] for i in _all_inputs(n) if i not in available and i in producers}
        deps.append(d)
        for p in d:
            users[p].append(k)
    remaining = [len(d) for d in deps]
    ready = [k for k, r in enumerate(remaining) if r == 0]
    order: list[int] = []
    import heapq

    heapq.heapify(ready)  # keep the original order where it is free to
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for u in users[k]:
            remaining[u] -= 1
            if remaining[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise ValueError("graph has a cycle")
    sorted_nodes = [nodes[k] for k in order]
    del g.node[:]
    g.node.extend(sorted_nodes)
    return model



def needed_nodes(model: onnx.ModelProto, outputs: list[str]) -> set[int]:
    """Indices of the nodes that ``outputs`` depend on (inputs of subgraphs included)."""
    g = model.graph
    producer = {o: k for k, n in enumerate(g.node) for o in n.output}
    keep: set[int] = set()
    stack = [producer[o] for o in outputs if o in producer]
    while stack:
        k = stack.pop()
        if k in keep:
            continue
        keep.add(k)
        stack += [producer[i] for i in _all_inputs(g.node[k]) if i in producer and producer[i] not in keep]
    return keep


def needed_subgraph(model: onnx.ModelProto, outputs: list[str], make_outputs) -> onnx.ModelProto:
    """A new model computing only ``outputs``: the nodes they depend on and the initializers those
    read (copied as they are: for a graph loaded without its external data, references to the
    same bytes, never the data). ``make_outputs(repeated, known)`` fills the new graph's outputs
    (``known``: the model's own output infos by name). Graph inputs are all kept."""
    g = model.graph
    keep = needed_nodes(model, outputs)
    nodes = [g.node[k] for k in sorted(keep)]
    used = {i for n in nodes for i in _all_inputs(n)}
    out = onnx.ModelProto()
    copy_fields(model, out, skip="graph")
    copy_fields(g, out.graph, skip=("node", "initializer", "output", "value_info"))
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(t for t in g.initializer if t.name in used)
    make_outputs(out.graph.output, {o.name: o for o in g.output})
    return out


def _all_inputs(node: onnx.NodeProto) -> list[str]:
    """Inputs of a node including those its subgraphs (If/Loop) capture from outside."""
    names = list(node.input)
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            inner = {o for n in a.g.node for o in n.output} | {i.name for i in a.g.input} | {t.name for t in a.g.initializer}
            names += [i for n in a.g.node for i in _all_inputs(n) if i not in inner]
    return names


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor, inferred on a weight-free copy (works for >2 GB models)."""
    light = onnx.ModelProto()
    _copy_without_weights(model, light)  # never a full copy: the weights can be gigabytes
    for t in model.graph.initializer:
        light.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False)
    types = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        types[v.name] = v.type.tensor_type.elem_type
    return types


def _copy_without_weights(model: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    for attr in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(dst, attr, getattr(model, attr))
    dst.opset_import.extend(model.opset_import)
    g = dst.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
