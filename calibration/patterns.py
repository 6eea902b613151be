"""Where the GEMMs are and how their inputs can be rescaled exactly.

``find_gemms`` lists MatMul/Gemm nodes whose second input is a 2-D float weight. ``find_groups``
groups them by the activation they read and says where a per-channel factor on that activation
can be folded without changing the function:

* ``norm``  into the scale (and bias) of the normalization that produced it (pre-norm models:
  LLaMA, GPT-2), when every consumer of the norm output is one of the group's GEMMs;
* ``gemm``  into the output columns (and bias) of the GEMM that produced it through linear ops:
  v_proj -> attention -> o_proj (not with a KV cache: it would change ``present.*.value``),
  and up_proj -> act(gate) * up -> down_proj;
* ``mul``   nowhere exact: an explicit per-channel Mul is inserted on the GEMM branch
  (post-norm BERT, whose norm output is also the residual; GELU outputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from trtforge.graph import GraphIndex, NormMatch, find_norms

PASSTHROUGH = {"Reshape", "Cast", "Identity"}
# Readers that see only a tensor's shape, never its values: rescaling cannot affect them.
SHAPE_ONLY = {"Shape", "Size"}


@dataclass
class Gemm:
    node: str
    op: str
    act: str  # activation input (input 0)
    weight: str  # initializer name
    k: int
    n: int
    trans_b: bool = False
    bias: str | None = None  # Gemm's C, or the initializer of an Add right after a MatMul
    bias_add: str | None = None  # that Add's node name (MatMul case)

    def weight_kn(self, model_idx: GraphIndex) -> np.ndarray:
        w = model_idx.array(self.weight).astype(np.float32)
        return w.T if self.trans_b else w


@dataclass
class Group:
    """GEMMs sharing one activation, and where a per-channel input factor can be folded."""

    act: str
    gemms: list[str]
    channels: int
    fold: str  # "norm" | "gemm" | "mul"
    norm: NormMatch | None = None
    prev: str | None = None  # producing GEMM (fold == "gemm")
    prev_cols: np.ndarray | None = None  # prev GEMM output column feeding each act channel
    why: str = ""
    role: str = ""  # "attn-in", "attn-out", "mlp-in", "mlp-out", "other"
    acts: list[str] = field(default_factory=list)  # distinct activation tensors of the members
    notes: list[str] = field(default_factory=list)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def find_gemms(model: onnx.ModelProto, idx: GraphIndex | None = None) -> list[Gemm]:
    idx = idx or GraphIndex(model)
    out = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        w = node.input[1]
        t = idx.initializers.get(w)
        if t is None or len(t.dims) != 2 or t.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            continue
        trans_b = False
        bias = bias_add = None
        if node.op_type == "Gemm":
            if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
                continue
            trans_b = bool(_attr(node, "transB", 0))
            if len(node.input) > 2 and node.input[2] in idx.initializers:
                bias = node.input[2]
        else:
            c = idx.single_consumer(node.output[0])
            if c is not None and c.op_type == "Add":
                other = c.input[0] if c.input[1] == node.output[0] else c.input[1]
                if other in idx.initializers and len(idx.initializers[other].dims) == 1:
                    bias, bias_add = other, c.name
        k, n = (t.dims[1], t.dims[0]) if trans_b else (t.dims[0], t.dims[1])
        out.append(Gemm(node.name, node.op_type, node.input[0], w, int(k), int(n), trans_b, bias, bias_add))
    return out


def attention_bmm_inputs(model: onnx.ModelProto, idx: GraphIndex | None = None) -> dict[str, list[str]]:
    """Inputs of MatMuls whose operands are both activations (Q.K^T and P.V): {tensor: [nodes]}."""
    idx = idx or GraphIndex(model)
    out: dict[str, list[str]] = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and not any(idx.is_const(i) for i in n.input):
            for i in n.input:
                out.setdefault(i, []).append(n.name)
    return out


def watched_tensors(model: onnx.ModelProto, idx: GraphIndex | None = None) -> list[str]:
    """Every GEMM activation input and attention BMM input: ranges serve any later recipe."""
    idx = idx or GraphIndex(model)
    names = {g.act for g in find_gemms(model, idx)} | set(attention_bmm_inputs(model, idx))
    return sorted(names)


def _upstream(idx: GraphIndex, name: str) -> tuple[str, list[onnx.NodeProto]]:
    """Walk up through channel-preserving ops; returns (source tensor, ops passed)."""
    passed = []
    while True:
        p = idx.producer.get(name)
        if p is None or p.op_type not in PASSTHROUGH:
            return name, passed
        passed.append(p)
        name = p.input[0]


def find_groups(model: onnx.ModelProto, dims: dict | None = None, idx: GraphIndex | None = None) -> list[Group]:
    """Group GEMMs by the tensor their inputs come from (through Reshape/Cast) and decide the fold."""
    idx = idx or GraphIndex(model)
    gemms = find_gemms(model, idx)
    by_node = {g.node: g for g in gemms}
    norms = {n.output: n for n in find_norms(model, idx)}
    sources: dict[str, list[Gemm]] = {}
    for g in gemms:
        sources.setdefault(_upstream(idx, g.act)[0], []).append(g)
    groups: list[Group] = []
    for src, members in sources.items():
        ch = members[0].k
        if any(m.k != ch for m in members):
            continue
        grp = Group(members[0].act, [m.node for m in members], ch, "mul")
        grp.acts = sorted({m.act for m in members})
        norm = norms.get(src)
        if norm is not None and norm.scale is not None:
            grp.norm = norm
            grp.role = "attn-in" if len(members) >= 3 or _feeds_attention(idx, members) else "mlp-in"
            readers = _readers_through_passthrough(idx, src)
            if all(r.name in by_node for r in readers):
                grp.fold = "norm"
            else:
                grp.why = "the norm output also feeds the residual or another non-GEMM op (post-norm model)"
        else:
            _match_gemm_fold(idx, grp, src, by_node, dims or {})
        groups.append(grp)
    return groups


def _feeds_attention(idx: GraphIndex, members: list[Gemm]) -> bool:
    """GPT-2's fused c_attn: one GEMM whose output is split into q, k, v."""
    nodes = {n.name: n for n in idx.graph.node}
    for m in members:
        t = nodes[m.node].output[0]
        for _ in range(3):
            c = idx.consumers.get(t, [])
            if any(x.op_type == "Split" for x in c):
                return True
            if len(c) != 1 or c[0].op_type not in PASSTHROUGH:
                break
            t = c[0].output[0]
    return False


def _readers_through_passthrough(idx: GraphIndex, src: str) -> list[onnx.NodeProto]:
    out = []
    frontier = [src]
    while frontier:
        t = frontier.pop()
        if t in idx.graph_outputs:
            out.append(onnx.helper.make_node("Identity", [t], [t + "_out"], name="<graph output>"))
        for c in idx.consumers.get(t, []):
            if c.op_type in PASSTHROUGH:
                frontier.append(c.output[0])
            elif c.op_type not in SHAPE_ONLY:
                out.append(c)
    return out


def _only_feeds(idx: GraphIndex, tensor: str, consumer: str) -> bool:
    c = [x for x in idx.consumers.get(tensor, []) if x.op_type not in SHAPE_ONLY]
    return tensor not in idx.graph_outputs and len(c) == 1 and c[0].name == consumer


def _match_gemm_fold(idx: GraphIndex, grp: Group, src: str, by_node: dict[str, Gemm], dims: dict) -> None:
    prod = idx.producer.get(src)
    if prod is None:
        grp.why, grp.role = "the activation is a graph input", "other"
        return
    if prod.op_type == "Mul":  # act(gate) * up
        grp.role = "mlp-out"
        cands = []
        for i in prod.input:
            s, passed = _upstream(idx, i)
            p = idx.producer.get(s)
            if p is not None and p.name in by_node and not passed:
                cands.append((by_node[p.name], s))
        if len(cands) == 1:
            up, s = cands[0]
            if up.n == grp.channels and up.bias is None and _only_feeds(idx, s, prod.name):
                grp.fold, grp.prev, grp.prev_cols = "gemm", up.node, np.arange(grp.channels)
                return
        grp.why = "the MLP input is not act(gate) * up of one GEMM"
        return
    if prod.op_type == "Transpose":  # attention output: Reshape <- Transpose <- MatMul(P, V)
        bmm = idx.producer.get(prod.input[0])
        if bmm is not None and bmm.op_type == "MatMul" and bmm.input[1] not in idx.initializers:
            grp.role = "attn-out"
            _match_value_path(idx, grp, bmm.input[1], bmm.name, by_node, dims)
            return
    grp.role = "mlp-out" if prod.op_type in ("Mul", "Gelu", "Relu", "Tanh", "Erf", "Add") else "other"
    grp.why = f"produced by {prod.op_type}, which does not commute with a per-channel scale"


def _match_value_path(idx: GraphIndex, grp: Group, v: str, user: str, by_node: dict[str, Gemm], dims: dict) -> None:
    """From the V operand of the attention BMM back to the value projection."""
    repeated = False
    offset, vcols = 0, None
    name, consumer = v, user
    while True:
        if name in idx.graph_outputs:
            grp.why = f"the values are a graph output ({name}): smoothing would change the KV cache"
            return
        if not _only_feeds(idx, name, consumer):
            grp.why = "the values are read elsewhere too"
            return
        p = idx.producer.get(name)
        if p is None:
            grp.why = "the value path starts at a graph input"
            return
        if p.name in by_node:
            gemm = by_node[p.name]
            break
        if p.op_type == "Concat":
            grp.why = "the values are concatenated (KV cache): smoothing would change present.*.value"
            return
        if p.op_type == "Split":
            k = list(p.output).index(name)
            sizes = idx.const_value(p.input[1]) if len(p.input) > 1 and p.input[1] else None
            if sizes is None:
                grp.why = "fused QKV split without constant sizes"
                return
            offset, vcols = int(np.sum(sizes[:k])), int(sizes[k])
        elif p.op_type == "Expand":
            repeated = True
        elif p.op_type == "Add":
            a, b = p.input
            if b in idx.initializers:
                nxt = a
            elif a in idx.initializers:
                nxt = b
            else:
                grp.why = "the value path has a non-constant Add"
                return
            name, consumer = nxt, p.name
            continue
        elif p.op_type not in ("Reshape", "Transpose", "Cast", "Identity", "Unsqueeze"):
            grp.why = f"the value path passes {p.op_type}"
            return
        name, consumer = p.input[0], p.name
    vcols = gemm.n if vcols is None else vcols
    c = np.arange(grp.channels)
    if repeated or vcols != grp.channels:
        heads = int(dims.get("num_heads") or 0)
        kv = int(dims.get("num_kv_heads") or heads)
        hd = int(dims.get("head_dim") or 0)
        if not (heads and kv and hd) or heads * hd != grp.channels or kv * hd != vcols:
            grp.why = "cannot map attention heads to value columns"
            return
        c = (c // hd) // (heads // kv) * hd + c % hd
    grp.fold, grp.prev, grp.prev_cols = "gemm", gemm.node, c + offset
