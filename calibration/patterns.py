"""Where the GEMMs are and how their inputs can be rescaled exactly.

``find_gemms`` lists MatMul/Gemm nodes whose second input is a 2-D float weight. ``find_groups``
groups them by the activation they read and says where a per-channel factor on that activation
can be folded without changing the function:

* ``norm``  into the scale (and bias) of the normalization that produced it (pre-norm models:
  LLaMA, GPT-2), when every consumer of the norm output is one of the group's GEMMs;
* ``gemm``  into the output columns (and bias) of the GEMM that produced it through linear ops:
  v_proj -> attention -> o_proj (not with a KV cache: it would change ``present.*.value``),
  and up_proj -> act(gate) * up -> down_proj; for fused projections (Phi-3's qkv_proj and
  gate_up_proj, GPT-2's c_attn) into the columns of the piece the output splits into (v, up),
  found through a Split or Slices with bounds known before run time (:func:`column_pieces`);
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
    """One fused GEMM whose output splits into three pieces (q, k, v): GPT-2's c_attn (Split),
    Phi-3's qkv_proj (three Slices). A fused gate_up_proj splits into two."""
    nodes = {n.name: n for n in idx.graph.node}
    for m in members:
        t = nodes[m.node].output[0]
        for _ in range(3):
            c = idx.consumers.get(t, [])
            if any(x.op_type == "Split" and len(x.output) >= 3 for x in c):
                return True
            if sum(x.op_type == "Slice" for x in c) >= 3 and column_pieces(idx, t, m.n) is not None:
                return True
            if len(c) != 1 or c[0].op_type not in PASSTHROUGH:
                break
            t = c[0].output[0]
    return False


INT64_MAX = np.iinfo(np.int64).max


def _eval_index(idx: GraphIndex, name: str, last: dict[str, int], depth: int = 0) -> np.ndarray | None:
    """The value of a small integer tensor computed in the graph from constants and from
    ``Shape(t)[-1]`` of tensors whose last dimension is known (``last``: tensor -> size): the
    bounds torch.chunk exports for gate_up_proj (Shape -> Gather(-1) -> Add -> Div -> Mul).
    None when it depends on anything else."""
    v = idx.const_value(name)
    if v is not None or depth > 12:
        return None if v is None else np.asarray(v)
    p = idx.producer.get(name)
    if p is None:
        return None
    if p.op_type == "Gather" and _attr(p, "axis", 0) == 0:
        shape = idx.producer.get(p.input[0])
        i = idx.const_value(p.input[1])
        if (shape is not None and shape.op_type == "Shape" and shape.input[0] in last and i is not None
                and _attr(shape, "end") is None and int(_attr(shape, "start", 0)) == 0 and np.all(np.asarray(i) == -1)):
            return np.full(np.shape(i), last[shape.input[0]], np.int64)
        return None
    args = [_eval_index(idx, i, last, depth + 1) for i in p.input]
    if any(a is None for a in args):
        return None
    if p.op_type in ("Cast", "Identity"):
        return args[0].astype(np.int64) if args[0].dtype.kind in "iu" else None
    if p.op_type in ("Unsqueeze", "Squeeze", "Reshape"):
        return args[0].reshape(-1) if args[0].size == 1 else None
    if p.op_type == "Concat":
        return np.concatenate([a.reshape(-1) for a in args])
    ops = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}
    if p.op_type in ops:
        return ops[p.op_type](*args)
    if p.op_type == "Div" and all(a.dtype.kind in "iu" for a in args) and np.all(args[1] > 0) and np.all(args[0] >= 0):
        return args[0] // args[1]
    return None


def _keeps_last_dim(idx: GraphIndex, node: onnx.NodeProto, n: int) -> bool:
    """A Cast/Identity, or a Reshape whose target shape ends in n (GPT-2's Gemm [B*S, n] ->
    Reshape [B, S, n]: the target is Concat(batch, seq, n))."""
    if node.op_type != "Reshape":
        return True
    shape = idx.const_value(node.input[1])
    if shape is None:
        cat = idx.producer.get(node.input[1])
        if cat is None or cat.op_type != "Concat" or not cat.input:
            return False
        shape = idx.const_value(cat.input[-1])
    return shape is not None and np.asarray(shape).size >= 1 and int(np.asarray(shape).reshape(-1)[-1]) == n


def column_pieces(idx: GraphIndex, out: str, n: int) -> dict[str, tuple[int, int]] | None:
    """How a fused GEMM's output ``out`` (n columns) is cut into pieces: {piece tensor: (start,
    stop)} on the last axis, from one Split or from Slices whose bounds are known before run time.
    None when the cut is not known, or when anything other than the pieces (and shape-only ops)
    reads ``out``, or when the pieces overlap: then a factor on one piece's columns could reach
    another reader."""
    if out in idx.graph_outputs:
        return None
    readers = [c for c in idx.consumers.get(out, []) if c.op_type not in SHAPE_ONLY]
    pieces: dict[str, tuple[int, int]] = {}
    axes: set[int] = set()
    for r in readers:
        if r.op_type == "Split" and len(readers) == 1:
            sizes = idx.const_value(r.input[1]) if len(r.input) > 1 and r.input[1] else None
            if sizes is None or int(np.sum(sizes)) != n:
                return None
            axes.add(int(_attr(r, "axis", 0)))
            ends = np.cumsum(np.asarray(sizes, np.int64))
            for o, start, stop in zip(r.output, ends - sizes, ends):
                pieces[o] = (int(start), int(stop))
            continue
        if r.op_type != "Slice" or len(r.input) < 4 or r.input[0] != out:
            return None
        starts, ends, ax = (_eval_index(idx, r.input[k], {out: n}) for k in (1, 2, 3))
        steps = _eval_index(idx, r.input[4], {out: n}) if len(r.input) > 4 and r.input[4] else np.ones(1, np.int64)
        if any(a is None or a.size != 1 for a in (starts, ends, ax, steps)) or int(steps[0]) != 1:
            return None
        start, stop = (int(x[0]) + n if int(x[0]) < 0 else min(int(x[0]), n) for x in (starts, ends))
        axes.add(int(ax[0]))
        pieces[r.output[0]] = (start, stop)
    if not pieces or len(axes) != 1:
        return None
    spans = sorted(pieces.values())
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:])) or any(lo >= hi for lo, hi in spans):
        return None
    # the last axis: -1, or a positive axis whose pieces cover exactly the n columns of the GEMM
    if axes != {-1} and not (spans[0][0] == 0 and spans[-1][1] == n and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))):
        return None
    return pieces


def _fused_piece(idx: GraphIndex, tensor: str, by_node: dict[str, Gemm]) -> tuple[Gemm, int, int] | None:
    """The GEMM and its column range [start, stop) when ``tensor`` is one piece of a fused
    GEMM's output (cut by a Split or a Slice, after the bias and channel-preserving ops)."""
    p = idx.producer.get(tensor)
    if p is None or p.op_type not in ("Slice", "Split"):
        return None
    passed: list[onnx.NodeProto] = []
    name = p.input[0]
    while True:
        src = idx.producer.get(name)
        if src is None:
            return None
        if src.name in by_node:
            gemm = by_node[src.name]
            if gemm.bias_add is not None:
                return None  # the cut reads the GEMM before its bias Add
            break
        if src.op_type == "Add":  # the bias Add of a MatMul
            gemm = next((g for g in by_node.values() if g.bias_add == src.name), None)
            if gemm is None:
                return None
            break
        if src.op_type not in PASSTHROUGH or not _only_feeds(idx, src.input[0], src.name):
            return None
        passed.append(src)
        name = src.input[0]
    if not all(_keeps_last_dim(idx, x, gemm.n) for x in passed):
        return None
    pieces = column_pieces(idx, p.input[0], gemm.n)
    if pieces is None or tensor not in pieces:
        return None
    return gemm, *pieces[tensor]


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
                cands.append((by_node[p.name], s, 0, by_node[p.name].n))
            elif not passed and (piece := _fused_piece(idx, s, by_node)) is not None:
                cands.append((piece[0], s, piece[1], piece[2]))  # Phi-3: up = gate_up_proj[..., I:2I]
        if len(cands) == 1:
            up, s, start, stop = cands[0]
            if stop - start == grp.channels and up.bias is None and _only_feeds(idx, s, prod.name):
                grp.fold, grp.prev, grp.prev_cols = "gemm", up.node, start + np.arange(grp.channels)
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
        if p.op_type in ("Split", "Slice"):  # fused QKV: GPT-2's c_attn (Split), Phi-3's qkv_proj (Slices)
            piece = _fused_piece(idx, name, by_node)
            if piece is None:
                grp.why = f"fused QKV cut by {p.op_type} with bounds not known before run time"
                return
            gemm, offset, stop = piece
            vcols = stop - offset
            break
        if p.op_type == "Expand":
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
