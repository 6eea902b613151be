"""AWQ for INT4 weight-only (W4A16): the activation-aware scale and the clip search.

AWQ (Lin et al., 2023): weights that meet large activations matter more, so scale input
channel j by s_j = mean|X_j|^a (normalised), quantize diag(s) W, and divide X by s (folded into
the previous op like SmoothQuant's factor, or an explicit Mul where it cannot fold). ``a`` is
searched on a grid per group of GEMMs sharing an input, by the error of the group's outputs on
the calibration rows. Then each (block, output channel) gets the clip ratio of its amax that
minimises that block's output error (AutoAWQ's ``auto_clip``; Model Optimizer's "awq_clip").

Selected by ``int4_method = "awq"`` on an INT4 recipe (options ``awq_grid``, ``awq_clip``,
``awq_clip_grid``); block sizes and the rest of the weight plan are RTN's (rtn.py).
"""

from __future__ import annotations

import numpy as np

from trtforge.calibration.methods.base import Decision, PlanContext, Role, Stat, weight_granularity
from trtforge.calibration.methods.rtn import RoundToNearest
from trtforge.calibration.patterns import Group
from trtforge.calibration.qdq import WeightPlan
from trtforge.calibration.recipe import Int4Method, QuantRecipe
from trtforge.calibration.smoothing import Smoothing, tie_shared_columns
from trtforge.errors import QuantizationError
from trtforge.numerics import int4_fake
from trtforge.progress import progress
from trtforge.registry import QUANT_METHODS
from trtforge.vocab import Granularity, Precision


def awq_scale(
    x: np.ndarray, x_absmean: np.ndarray, ws: list[np.ndarray], block: int, grid: int
) -> tuple[np.ndarray, float, float]:
    """Best s for a group: returns (s, ratio, relative error). x: [T, K]; ws: [K, N] each."""
    x = x.astype(np.float32)
    refs = [x @ w for w in ws]
    den = sum(float(np.square(r).sum()) for r in refs) or 1e-30
    mean = np.maximum(x_absmean.astype(np.float64), 1e-8)
    best = (np.ones_like(mean), 0.0, np.inf)
    for i in range(grid):
        ratio = i / grid
        s = mean**ratio
        s = s / np.sqrt(s.max() * s.min())
        s = np.clip(s, 1e-4, 1e4)
        xs = (x / s[None, :]).astype(np.float32)
        err = 0.0
        for w, ref in zip(ws, refs):
            wq = int4_fake((w * s[:, None]).astype(np.float32), block)
            err += float(np.square(xs @ wq - ref).sum())
        if err / den < best[2]:
            best = (s, ratio, err / den)
    return best


def awq_clip(x: np.ndarray, w: np.ndarray, block: int, grid: tuple[float, ...], max_rows: int = 256) -> np.ndarray:
    """Clip ratio per (block, output channel) minimising ||X_b (W_b - Q_r(W_b))||^2.

    x: [T, K] (already divided by the AWQ scale), w: [K, N] (already multiplied by it).
    Returns [K/B, N] ratios.
    """
    k, n = w.shape
    nb = k // block
    x = x[:max_rows].astype(np.float32).reshape(-1, nb, block)  # [T, nb, B]
    wb = w.astype(np.float32).reshape(nb, block, n)  # [nb, B, N]
    amax = np.abs(wb).max(axis=1)  # [nb, N]
    best_err = np.full((nb, n), np.inf)
    best_r = np.ones((nb, n))
    for r in grid:
        scale = np.maximum(amax * r / 7.0, 1e-12)  # [nb, N]
        q = np.clip(np.rint(wb / scale[:, None, :]), -8, 7) * scale[:, None, :]
        diff = wb - q  # [nb, B, N]
        # per block: X_b @ diff_b -> [T, N]; error summed over rows
        err = _block_err(x, diff)
        better = err < best_err
        best_err[better] = err[better]
        best_r[better] = r
    return best_r


def _block_err(x: np.ndarray, diff: np.ndarray) -> np.ndarray:
    """sum_t (x[t, b, :] @ diff[b, :, n])^2 for every block b and column n -> [nb, N]."""
    nb = diff.shape[0]
    out = np.empty((nb, diff.shape[2]))
    for b in range(nb):
        y = x[:, b, :] @ diff[b]  # [T, N]
        out[b] = np.einsum("tn,tn->n", y, y)
    return out


class AWQ(RoundToNearest):
    name = "awq"
    roles = frozenset({Role.SMOOTHING, Role.WEIGHTS})
    fallback = False

    def selected(self, recipe: QuantRecipe) -> bool:
        return recipe.precision == Precision.INT4 and recipe.int4_method == Int4Method.AWQ

    def statistics(self, recipe: QuantRecipe) -> frozenset[Stat]:
        return frozenset({Stat.CHANNEL_ABSMEAN, Stat.ROWS})

    def smooth(self, ctx: PlanContext, group: Group) -> Smoothing | None:
        st = ctx.stats(group.act)
        if st.sample is None:
            raise QuantizationError("AWQ needs the calibration rows (ranges.samples.npz)",
                                    "calibrate again instead of reusing ranges saved without their rows")
        q = [d for d in (ctx.decisions[n] for n in group.gemms) if d.quantize]
        if len({d.block for d in q}) != 1:
            return None
        ws = [ctx.weight(d.gemm.node) for d in q]
        # v -> o_proj under GQA: the query heads reading one value head must get one factor, or
        # the fold into v_proj's columns is inexact. Their mean |x| is that of the value channel.
        x_absmean = tie_shared_columns(group, st.channel_absmean, "mean")
        s, ratio, err = awq_scale(st.sample, x_absmean, ws, q[0].block, ctx.recipe.awq_grid)
        return Smoothing(group, s, ratio, err) if ratio > 0 else None

    def plan_weights(self, ctx: PlanContext) -> list[WeightPlan]:
        if not ctx.recipe.awq_clip:
            return super().plan_weights(ctx)
        todo = ctx.quantized()  # INT4 blocks: no shared per-tensor amax
        return [self.plan_weight(ctx, d, weight_granularity(ctx.recipe), None)
                for d in progress(todo, len(todo), "awq clip search (GEMMs)")]

    def plan_weight(self, ctx: PlanContext, d: Decision, granularity: Granularity,
                    shared_amax: float | None) -> WeightPlan:
        plan = super().plan_weight(ctx, d, granularity, shared_amax)
        if ctx.recipe.awq_clip:
            sm = ctx.smoothing_of(d.gemm.node)
            x = ctx.stats(d.gemm.act).sample.astype(np.float32) / (sm.s[None, :] if sm else 1.0)
            plan.clip = awq_clip(x, ctx.weight(d.gemm.node), d.block, ctx.recipe.awq_clip_grid)
        return plan


QUANT_METHODS.register(AWQ())
