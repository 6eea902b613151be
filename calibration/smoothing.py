"""The per-channel rescaling SmoothQuant and AWQ share: fold a factor into the float graph.

For a group of GEMMs reading one activation X, a factor s (one per input channel) moves range
from X to the weights: X' = X / s, W' = diag(s) W, so X' W' = X W exactly. s is folded where it
costs nothing (see patterns.py): into the norm's scale and bias, or into the output columns of
the GEMM that produced X; elsewhere an explicit Mul(X, 1/s) is inserted on the GEMM branch.
How s is chosen is the method's business (calibration/methods/smoothquant.py, awq.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trtforge.calibration.patterns import Gemm, Group
from trtforge.errors import QuantizationError
from trtforge.graph import GraphIndex
from trtforge.onnx_io import Weights


@dataclass
class Smoothing:
    group: Group
    s: np.ndarray  # [channels], float64
    alpha: float | None  # SmoothQuant's alpha, or AWQ's exponent
    error: float | None = None  # relative output error of the chosen alpha (searched only)


def tie_shared_columns(grp: Group, vec: np.ndarray, how: str = "max") -> np.ndarray:
    """With GQA several act channels read one value column (9 query heads on 3 value heads: 3
    channels per column): give them one value, the largest or the mean, so any per-channel
    function of it is equal across them and the fold into that column stays exact. Every
    statistic a fold="gemm" factor is computed from must go through here."""
    if grp.fold != "gemm" or grp.prev_cols is None:
        return vec
    cols = grp.prev_cols
    vec = np.asarray(vec, np.float64)
    if how == "max":
        out = np.full(int(cols.max()) + 1, -np.inf)
        np.maximum.at(out, cols, vec)
    elif how == "mean":
        out = np.bincount(cols, weights=vec) / np.maximum(np.bincount(cols), 1)
    else:
        raise ValueError(f"how must be 'max' or 'mean', not {how!r}")
    return out[cols]


def check_tied(grp: Group, s: np.ndarray) -> None:
    """A fold="gemm" factor must be equal on channels sharing a column of the producing GEMM:
    one column can take only one factor, and anything else changes the float function."""
    if grp.fold != "gemm" or grp.prev_cols is None:
        return
    cols = grp.prev_cols
    hi = np.full(int(cols.max()) + 1, -np.inf)
    lo = np.full(int(cols.max()) + 1, np.inf)
    np.maximum.at(hi, cols, s)
    np.minimum.at(lo, cols, s)
    used = np.isfinite(hi)
    if np.any(hi[used] > lo[used] * (1 + 1e-9)):  # rounding of pow() may differ between SIMD lanes
        raise QuantizationError(
            f"the smoothing factor of GEMM group {', '.join(grp.gemms)} differs between channels that read one "
            f"column of {grp.prev} (up to {float(np.max(hi[used] / lo[used])):.4g}x), so it cannot fold there exactly",
            "this is a trtforge bug; report it, and quantize without smoothing meanwhile",
        )


def apply_smoothing(model: onnx.ModelProto, smoothings: list[Smoothing], idx: GraphIndex,
                    gemms: dict[str, Gemm]) -> onnx.ModelProto:
    """Rescale weights and fold 1/s, editing ``model`` in place (prepare's private copy: one copy
    of the weights, never two); returns it. ``idx`` and ``gemms`` describe ``model`` as it is on
    entry and are stale afterwards. The function the model computes is unchanged.

    Weights are rescaled through ``idx.weights`` (trtforge.onnx_io.Weights): in place where the
    graph holds them, as recorded edits applied when they are written where they are in
    external data, so smoothing a 10 GB model holds no second copy of its weights."""
    out = model
    weights = idx.weights or Weights(model)
    inits = {t.name: t for t in out.graph.initializer}
    uses = {name: len(idx.consumers.get(name, [])) for name in inits}
    new_nodes: list[tuple[str, onnx.NodeProto]] = []  # (insert before node name, node)

    def private(name: str, user: str) -> onnx.TensorProto:
        """The initializer ``name`` as only ``user`` sees it (cloned if shared)."""
        t = inits[name]
        if uses.get(name, 1) <= 1:
            return t
        clone = weights.clone(t, idx.unique(f"{name}_{user.strip('/').replace('/', '_')}"))
        inits[clone.name] = clone
        uses[name] -= 1
        uses[clone.name] = 1
        node = next(n for n in out.graph.node if n.name == user)
        for k, i in enumerate(node.input):
            if i == name:
                node.input[k] = clone.name
        return clone

    def scale_tensor(t: onnx.TensorProto, fn) -> None:
        weights.transform(t, fn)

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
            check_tied(grp, s)
            col_s = np.ones(prev.n)
            col_s[cols] = s  # equal for channels sharing a column (see tie_shared_columns)
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
