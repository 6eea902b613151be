"""SmoothQuant (Xiao et al., 2022) for INT8/FP8 W8A8: migrate activation range into the weights.

For a group of GEMMs reading one activation X: s_j = max|X_j|^alpha / max|W_j|^(1-alpha), folded
into the graph by calibration/smoothing.py. Alpha is the recipe's, or (``alpha = None``) chosen
per group from ``alpha_grid`` by the relative error of the group's quantized GEMMs on the kept
calibration rows. Selected by ``smoothquant = true`` on an INT8/FP8 recipe; which groups are
smoothed follows ``smooth_attention_output``, ``smooth_mlp_down`` and ``smooth_with_mul``.
"""

from __future__ import annotations

import numpy as np

from trtforge.calibration.methods.base import PlanContext, QuantMethod, Role, Stat, weight_granularity
from trtforge.calibration.patterns import Group
from trtforge.calibration.recipe import CalibMethod, QuantRecipe
from trtforge.calibration.smoothing import Smoothing, tie_shared_columns
from trtforge.calibration.stats import amax_from_rows
from trtforge.numerics import QMAX, as_scale, fake_quant, weight_scales
from trtforge.registry import QUANT_METHODS
from trtforge.vocab import Granularity, Precision

PRECISIONS = (Precision.INT8, Precision.FP8)


def smooth_factor(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    x = np.maximum(x_max.astype(np.float64), 1e-5)
    w = np.maximum(w_max.astype(np.float64), 1e-5)
    s = x**alpha / w ** (1.0 - alpha)
    s = np.clip(s, 1e-4, 1e4)
    s[(x_max <= 0) | (w_max <= 0)] = 1.0
    return s


def relative_gemm_error(x: np.ndarray, ws: list[np.ndarray], s: np.ndarray, precision: Precision, x_amax: float,
                        per_tensor: bool = False, refs: list[np.ndarray] | None = None) -> float:
    """||Q(X/s) Q(diag(s) W) - X W||^2 / ||X W||^2 summed over the group's GEMMs; weights scaled per
    output channel, or (``per_tensor``) with one scale shared by the group, as they will be stored.
    ``refs``: the X W of each GEMM, when the caller computed them once for several s."""
    xs = x / s[None, :]
    act_scale = as_scale(x_amax, QMAX[precision], np.float32)
    xq = fake_quant(xs, act_scale, precision)
    del xs
    shared = as_scale(max(float(np.abs(w * s[:, None]).max()) for w in ws), QMAX[precision], np.float32) if per_tensor else None
    num = den = 0.0
    for k, w in enumerate(ws):
        ref = refs[k] if refs is not None else x @ w
        w2 = w * s[:, None]  # one GEMM's scaled weight at a time
        wq = fake_quant(w2, shared if per_tensor else weight_scales(w2, precision, np.float32)[None, :], precision)
        del w2
        num += float(np.square(xq @ wq - ref).sum())
        den += float(np.square(ref).sum())
    return num / max(den, 1e-30)


def choose_smoothing(
    grp: Group,
    ws: list[np.ndarray],
    x_max: np.ndarray,
    sample: np.ndarray | None,
    precision: Precision,
    alpha: float | None,
    grid: tuple[float, ...],
    *,
    per_tensor: bool = False,
    range_method: str = "max",
    percentile: float = 99.99,
) -> Smoothing | None:
    """The group's factor; ``ws``: its GEMMs' weights as [K, N].

    Each candidate is scored with the activation range the recipe will give X / s
    (``range_method``: ``max`` is max(x_max / s); another method is taken on the kept rows, as
    ranges.activation_amax takes it), so alpha and the range are chosen together.

    FP8 searches leaving the group unsmoothed (s = 1) too, and returns None when that is best:
    E4M3's relative rounding error is the same at every scale, so smoothing helps FP8 only where
    the range (subnormals, flush to zero) limits it, and a factor fitted to the kept rows can
    otherwise only add error. INT8's uniform grid always pays for the range, so it always smooths."""
    w_max = np.max([np.abs(w).max(axis=1) for w in ws], axis=0)
    x_max = tie_shared_columns(grp, x_max)
    w_max = tie_shared_columns(grp, w_max)
    if alpha is not None or sample is None:
        a = 0.5 if alpha is None else alpha
        return Smoothing(grp, smooth_factor(x_max, w_max, a), a)
    x = sample.astype(np.float32)
    qmax = QMAX[precision]

    def amax_of(s: np.ndarray) -> float:
        exact = float(np.max(x_max / s))
        if range_method == "max":
            return exact
        return min(amax_from_rows(x / s[None, :], range_method, percentile, qmax), exact)

    refs = [x @ w for w in ws]  # the float outputs, the same for every alpha
    best = None
    for a in grid:
        s = smooth_factor(x_max, w_max, a)
        err = relative_gemm_error(x, ws, s, precision, amax_of(s), per_tensor, refs)
        if best is None or err < best.error:
            best = Smoothing(grp, s, a, err)
    if precision == Precision.FP8:
        ones = np.ones_like(x_max, dtype=np.float64)
        if relative_gemm_error(x, ws, ones, precision, amax_of(ones), per_tensor, refs) <= best.error:
            return None
    return best


class SmoothQuant(QuantMethod):
    name = "smoothquant"
    roles = frozenset({Role.SMOOTHING})

    def selected(self, recipe: QuantRecipe) -> bool:
        return recipe.precision in PRECISIONS and recipe.smoothquant

    def statistics(self, recipe: QuantRecipe) -> frozenset[Stat]:
        # rows: automatic alpha searches on them; a non-max range of a smoothed tensor is taken on them
        rows = recipe.alpha is None or recipe.calib_method != CalibMethod.MAX
        return frozenset({Stat.CHANNEL_ABSMAX, *((Stat.ROWS,) if rows else ())})

    def smooth(self, ctx: PlanContext, group: Group) -> Smoothing | None:
        r = ctx.recipe
        if group.fold == "gemm" and group.role == "attn-out" and not r.smooth_attention_output:
            return None
        if group.fold == "gemm" and group.role == "mlp-out" and not r.smooth_mlp_down:
            return None
        if group.fold == "mul" and not r.smooth_with_mul:
            return None
        st = ctx.stats(group.act)
        ws = [ctx.weight(n) for n in group.gemms]
        return choose_smoothing(group, ws, st.channel_absmax, st.sample, r.precision, r.alpha, r.alpha_grid,
                                per_tensor=weight_granularity(r) == Granularity.TENSOR,
                                range_method=r.calib_method.value, percentile=r.percentile)


QUANT_METHODS.register(SmoothQuant())
