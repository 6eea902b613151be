"""SmoothQuant on the ONNX graph (and the same per-channel rescaling for AWQ).

For a group of GEMMs reading one activation X, a factor s (one per input channel) moves range
from X to the weights: X' = X / s, W' = diag(s) W, so X' W' = X W exactly. s is folded where it
costs nothing (see patterns.py): into the norm's scale and bias, or into the output columns of
the GEMM that produced X; elsewhere an explicit Mul(X, 1/s) is inserted on the GEMM branch.

SmoothQuant: s_j = max|X_j|^alpha / max|W_j|^(1-alpha), alpha per recipe or chosen per group
from a grid by the error of the group's quantized GEMMs on the calibration rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trtforge.calibration.patterns import Gemm, Group
from trtforge.calibration.recipe import Precision
from trtforge.graph import GraphIndex
from trtforge.numerics import QMAX, as_scale, fake_quant, weight_scales


@dataclass
class Smoothing:
    group: Group
    s: np.ndarray  # [channels], float64
    alpha: float | None
    error: float | None = None  # relative output error of the chosen alpha (auto only)


def weight_kn(idx: GraphIndex, g: Gemm) -> np.ndarray:
    w = numpy_helper.to_array(idx.initializers[g.weight]).astype(np.float32)
    return w.T if g.trans_b else w


def _shared_columns_max(grp: Group, vec: np.ndarray) -> np.ndarray:
    """With GQA several act channels read one value column: give them one (the largest) value,
    so their factors are equal and the fold into that column stays exact."""
    if grp.fold != "gemm" or grp.prev_cols is None:
        return vec
    cols = grp.prev_cols
    out = np.full(int(cols.max()) + 1, -np.inf)
    np.maximum.at(out, cols, vec)
    return out[cols]


def smooth_factor(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    x = np.maximum(x_max.astype(np.float64), 1e-5)
    w = np.maximum(w_max.astype(np.float64), 1e-5)
    s = x**alpha / w ** (1.0 - alpha)
    s = np.clip(s, 1e-4, 1e4)
    s[(x_max <= 0) | (w_max <= 0)] = 1.0
    return s


def relative_gemm_error(x: np.ndarray, ws: list[np.ndarray], s: np.ndarray, precision: Precision, x_amax: float) -> float:
    """||Q(X/s) Q(diag(s) W) - X W||^2 / ||X W||^2 summed over the group's GEMMs."""
    xs = x / s[None, :]
    act_scale = as_scale(x_amax, QMAX[precision], np.float32)
    xq = fake_quant(xs, act_scale, precision)
    num = den = 0.0
    for w in ws:
        ref = x @ w
        w2 = w * s[:, None]
        wq = fake_quant(w2, weight_scales(w2, precision, np.float32)[None, :], precision)
        num += float(np.square(xq @ wq - ref).sum())
        den += float(np.square(ref).sum())
    return num / max(den, 1e-30)


def choose_smoothing(
    grp: Group,
    idx: GraphIndex,
    x_max: np.ndarray,
    sample: np.ndarray | None,
    precision: Precision,
    alpha: float | None,
    grid: tuple[float, ...],
) -> Smoothing:
    gemms = [g for g in _gemms(idx, grp)]
    ws = [weight_kn(idx, g) for g in gemms]
    w_max = np.max([np.abs(w).max(axis=1) for w in ws], axis=0)
    x_max = _shared_columns_max(grp, x_max)
    w_max = _shared_columns_max(grp, w_max)
    if alpha is not None or sample is None:
        a = 0.5 if alpha is None else alpha
        return Smoothing(grp, smooth_factor(x_max, w_max, a), a)
    x = sample.astype(np.float32)
    best = None
    for a in grid:
        s = smooth_factor(x_max, w_max, a)
        err = relative_gemm_error(x, ws, s, precision, float(np.max(x_max / s)))
        if best is None or err < best.error:
            best = Smoothing(grp, s, a, err)
    return best


def _gemms(idx: GraphIndex, grp: Group) -> list[Gemm]:
    from trtforge.calibration.patterns import find_gemms

    by = {g.node: g for g in find_gemms(idx.model, idx)}
    return [by[n] for n in grp.gemms]


def apply_smoothing(model: onnx.ModelProto, smoothings: list[Smoothing]) -> onnx.ModelProto:
    """Rescale weights and fold 1/s; returns a new model computing the same function."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    idx = GraphIndex(out)
    from trtforge.calibration.patterns import find_gemms

    gemms = {g.node: g for g in find_gemms(out, idx)}
    inits = {t.name: t for t in out.graph.initializer}
    uses = {name: len(idx.consumers.get(name, [])) for name in inits}
    new_nodes: list[tuple[str, onnx.NodeProto]] = []  # (insert before node name, node)

    def private(name: str, user: str) -> onnx.TensorProto:
        """The initializer ``name`` as only ``user`` sees it (cloned if shared)."""
        t = inits[name]
        if uses.get(name, 1) <= 1:
            return t
        clone = onnx.TensorProto()
        clone.CopyFrom(t)
        clone.name = idx.unique(f"{name}_{user.strip('/').replace('/', '_')}")
        out.graph.initializer.append(clone)
        inits[clone.name] = clone
        uses[name] -= 1
        uses[clone.name] = 1
        node = next(n for n in out.graph.node if n.name == user)
        for k, i in enumerate(node.input):
            if i == name:
                node.input[k] = clone.name
        return clone

    def scale_tensor(t: onnx.TensorProto, fn) -> None:
        arr = numpy_helper.to_array(t)
        t.CopyFrom(numpy_helper.from_array(fn(arr.astype(np.float64)).astype(arr.dtype), t.name))

    for sm in smoothings:
        grp, s = sm.group, sm.s
        for name in grp.gemms:
            g = gemms[name]
            t = private(g.weight, g.node)
            if g.trans_b:
                scale_tensor(t, lambda w, s=s: w * s[None, :])
            else:
                scale_tensor(t, lambda w, s=s: w * s[:, None])
        if grp.fold == "norm":
            norm = grp.norm
            scale_tensor(private(norm.scale, norm.scale_node), lambda w, s=s: w / s)
            if norm.bias:
                scale_tensor(private(norm.bias, norm.scale_node), lambda b, s=s: b / s)
        elif grp.fold == "gemm":
            prev = gemms[grp.prev]
            cols = grp.prev_cols
            col_s = np.ones(prev.n)
            col_s[cols] = s  # equal for channels sharing a column (see _shared_columns_max)
            t = private(prev.weight, prev.node)
            if prev.trans_b:
                scale_tensor(t, lambda w, c=col_s: w / c[:, None])
            else:
                scale_tensor(t, lambda w, c=col_s: w / c[None, :])
            if prev.bias:
                user = prev.bias_add or prev.node
                scale_tensor(private(prev.bias, user), lambda b, c=col_s: b / c)
        else:  # explicit Mul on the branch, one per distinct activation tensor
            for act in grp.acts or [grp.act]:
                dtype = _elem_type(out, idx, act)
                inv = numpy_helper.from_array(
                    (1.0 / s).astype(np.float16 if dtype == TensorProto.FLOAT16 else np.float32),
                    idx.unique(f"{act}_smooth_inv"),
                )
                out.graph.initializer.append(inv)
                y = idx.unique(f"{act}_smoothed")
                mul = helper.make_node("Mul", [act, inv.name], [y], name=idx.unique(f"{act}_SmoothMul"))
                first = None
                for name in grp.gemms:
                    node = next(n for n in out.graph.node if n.name == name)
                    if node.input[0] == act:
                        node.input[0] = y
                        first = first or name
                new_nodes.append((first, mul))
    if new_nodes:
        order = []
        pending = {}
        for before, node in new_nodes:
            pending.setdefault(before, []).append(node)
        for node in out.graph.node:
            order += pending.get(node.name, [])
            order.append(node)
        del out.graph.node[:]
        out.graph.node.extend(order)
    return out


def _elem_type(model: onnx.ModelProto, idx: GraphIndex, tensor: str) -> int:
    """FP16 if the graph's GEMM weights are FP16 (the activations then are too)."""
    for t in model.graph.initializer:
        if len(t.dims) == 2 and t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
            return t.data_type
    return TensorProto.FLOAT
