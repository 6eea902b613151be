"""GPTQ for INT4 weight-only (W4A16): rounding with error feedback through the inverse Hessian.

GPTQ (Frantar et al., 2022): quantize a GEMM's weight one input channel (row k of W [K, N]) at a
time, and push each row's rounding error onto the rows not yet quantized along H^-1, where
H = X^T X / rows is the Hessian of the layer's output error in its input X. The result minimises
||X W - X Q||^2 far better than rounding each weight to nearest. As in the reference code
(IST-DASLab/gptq, AutoGPTQ's ``fasterquant``): dampening of ``gptq_damp`` x mean(diag H) on the
diagonal, input channels never active in calibration (diag 0) zeroed, the upper Cholesky factor
of H^-1, and lazy batch updates of 128 rows.

What is specific here:

* **Symmetric blocks, no zero point** (TensorRT's DequantizeLinear and TensorRT-LLM's W4A16_AWQ
  take none): each (block, output channel) scale is amax/7 of the block's *updated* weights,
  set when the pass reaches the block, rounded to the graph's float type before it is used, so
  the stored integers are exactly the ones GPTQ chose. Blocks and fallbacks are RTN's (rtn.py).
* **Act order with static groups** (``gptq_act_order``): rows go in order of decreasing diag(H);
  since a block DequantizeLinear cannot express a permuted group index (AutoGPTQ's g_idx /
  ``desc_act``, which TensorRT-LLM's GPTQ loader refuses too), every block's scale is fixed
  from the weights before the pass (AutoGPTQ's ``static_groups``) and the rows keep their place.
* **Hessians from one streaming pass** over the calibration data, of the float model (not
  re-collected layer by layer after quantizing the previous ones, as "true sequential" GPTQ
  does): calibration accumulates X^T X per GEMM input (calibration/collect.py); GEMMs reading one
  input share it, and its factorisation. Under AWQ's scale s (``int4_method = "awq-gptq"``) the
  GEMM reads X / s, so its Hessian is H / (s s^T), and AWQ's clip ratios shrink each block's amax.
* **Never worse than RTN on the proxy**: tr(D^T H D), D = W - Q, is computed for GPTQ's and
  RTN's result with the undamped H; if GPTQ's is not lower (a degenerate Hessian), the GEMM keeps
  RTN's weights and the manifest says so. A Hessian that dampening cannot make positive definite
  is retried with 10x the dampening (three times), then falls back to RTN the same way.

Selected by ``int4_method = "gptq"`` (preset ``int4-gptq``) or ``"awq-gptq"`` (``int4-awq-gptq``).

**INT8 / FP8 weights** (``weight_rounding = "gptq"`` on an INT8 or FP8 recipe, class
:class:`GPTQ8`): the same pass on the 8-bit grid (uniform INT8, or E4M3's floating-point one),
with the scales rounding to nearest would use (amax / qmax per output channel, or one per
tensor or group with ``weight_granularity = "tensor"``), fixed before the pass. Under
SmoothQuant's factor the GEMM reads X / s and its Hessian is H / (s s^T), as under AWQ's.
Inputs never active in calibration keep their weights rounded to nearest (nothing feeds back to
or from them), rather than zeroed: held-out text may use them. The same proxy check against
rounding to nearest keeps whichever is better per GEMM.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from trtforge.calibration.methods.awq import AWQ
from trtforge.calibration.methods.base import Decision, PlanContext, Role, Stat, weight_granularity
from trtforge.calibration.methods.rtn import RoundToNearest
from trtforge.calibration.patterns import Group
from trtforge.calibration.qdq import PlanStream, WeightPlan, float_type
from trtforge.calibration.recipe import Int4Method, QuantRecipe, WeightRounding
from trtforge.calibration.smoothing import Smoothing
from trtforge.errors import QuantizationError
from trtforge.numerics import QMAX, as_scale, fake_quant, int4_block_scales, weight_scales
from trtforge.registry import QUANT_METHODS
from trtforge.vocab import Granularity, Precision

log = logging.getLogger(__name__)
LAZY_ROWS = 128  # rows per lazy batch update (the reference's blocksize)
DAMP_RETRIES = 3


@dataclass
class HessianFactor:
    """What GPTQ needs from one input's Hessian, shared by the GEMMs reading that input."""

    dead: np.ndarray  # bool [K]: inputs never active in calibration (their weights are zeroed)
    perm: np.ndarray  # row order of the pass (act order: decreasing diag H)
    u: np.ndarray  # float32 upper Cholesky factor of (H + d I)^-1 in ``perm`` order (U^T U = H^-1)
    damp: float  # the dampening used (a fraction of mean diag H)
    act_order: bool


def factor_hessian(h: np.ndarray, damp: float = 0.01, act_order: bool = False) -> HessianFactor:
    """Dead inputs, the pass order and U, retrying with 10x the dampening where H + d I is not
    positive definite (float32, as the reference code computes it)."""
    h = np.array(h, np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(h.shape[0])
    hp = h[perm][:, perm]
    mean = float(np.mean(np.diag(hp))) or 1.0
    eye = np.eye(hp.shape[0])
    for attempt in range(DAMP_RETRIES + 1):
        frac = damp * 10**attempt
        try:
            u = np.linalg.cholesky(np.linalg.inv((hp + (frac * mean) * eye).astype(np.float32))).T
            if np.isfinite(u).all():
                return HessianFactor(dead, perm, np.ascontiguousarray(u), frac, act_order)
        except np.linalg.LinAlgError:
            pass
    raise np.linalg.LinAlgError(f"not positive definite with dampening {damp * 10**DAMP_RETRIES:g}")


def gptq_quantize(w_kn: np.ndarray, h: np.ndarray | HessianFactor, block: int, *, damp: float = 0.01,
                  act_order: bool = False, dtype=np.float32,
                  clip: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """GPTQ of one [K, N] weight with its input Hessian h [K, K], or that Hessian's
    :func:`factor_hessian` (then ``damp`` and ``act_order`` are the factor's).

    Returns (Q, scales, info): Q [K, N] float32 = integers x scales (exactly what the INT4 block
    DequantizeLinear gives back from ``scales``), scales [K/B, N] in ``dtype``, and what was done.
    ``clip``: [K/B, N] ratios applied to each block's amax (AWQ's clip search)."""
    k, n = w_kn.shape
    if k % block:
        raise ValueError(f"K={k} is not a multiple of block {block}")
    f = h if isinstance(h, HessianFactor) else factor_hessian(h, damp, act_order)
    act_order = f.act_order
    w = np.array(w_kn, np.float32)
    w[f.dead, :] = 0.0
    nblocks = k // block
    ratio = np.ones((nblocks, n), np.float32) if clip is None else np.asarray(clip, np.float32)
    scales = np.empty((nblocks, n), dtype)
    if act_order:  # static groups: every scale from the weights as they are before the pass
        scales[:] = int4_block_scales(w, block, dtype, ratio)
    perm, u = f.perm, f.u
    w = w[perm]
    q = np.empty_like(w)
    lazy = max(LAZY_ROWS, block) if not act_order else LAZY_ROWS
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1 = w[i1:i2].copy()
        err = np.empty_like(w1)
        for i in range(i2 - i1):
            row = perm[i1 + i]  # the row's index in the original order (its block)
            b = row // block
            if not act_order and row % block == 0:  # a new block: its scale from the updated weights
                amax = np.abs(w1[i : i + block]).max(axis=0) * ratio[b]
                scales[b] = as_scale(amax, 7.0, dtype)
            s = scales[b].astype(np.float32)
            qi = np.clip(np.rint(w1[i] / s), -8, 7) * s
            q[i1 + i] = qi
            e = (w1[i] - qi) / u[i1 + i, i1 + i]
            w1[i:] -= np.outer(u[i1 + i, i1 + i : i2], e)
            err[i] = e
        w[i2:] -= u[i1:i2, i2:].T @ err
    out = np.empty_like(q)
    out[perm] = q
    return out, scales, {"damp": f.damp, "dead_inputs": int(f.dead.sum()), "act_order": act_order}


def gptq_fixed_scales(w_kn: np.ndarray, h: np.ndarray | HessianFactor, scales: np.ndarray, precision: Precision, *,
                      damp: float = 0.01, act_order: bool = False) -> tuple[np.ndarray, dict]:
    """GPTQ of one [K, N] weight onto the INT8 or FP8 grid of fixed ``scales`` (per output
    channel [N], or one per tensor), with its input Hessian h [K, K] or its factor.

    Returns (Q, info): Q [K, N] float32 on the grid (``fake_quant(W, scales)`` of the updated
    weights, exactly what the stored 8-bit values and scales dequantize to). Dead inputs (diag H
    = 0) are decoupled by :func:`factor_hessian` and so end up rounded to nearest."""
    k, n = w_kn.shape
    f = h if isinstance(h, HessianFactor) else factor_hessian(h, damp, act_order)
    s = np.broadcast_to(np.asarray(scales, np.float32).reshape(-1), (n,)).copy()
    perm, u = f.perm, f.u
    w = np.array(w_kn, np.float32)[perm]
    q = np.empty_like(w)
    for i1 in range(0, k, LAZY_ROWS):
        i2 = min(i1 + LAZY_ROWS, k)
        w1 = w[i1:i2].copy()
        q1 = q[i1:i2]
        err = np.empty_like(w1)
        for i in range(i2 - i1):
            q1[i] = fake_quant(w1[i], s, precision)
            e = (w1[i] - q1[i]) / u[i1 + i, i1 + i]
            w1[i:] -= np.outer(u[i1 + i, i1 + i : i2], e)
            err[i] = e
        w[i2:] -= u[i1:i2, i2:].T @ err
    out = np.empty_like(q)
    out[perm] = q
    return out, {"damp": f.damp, "dead_inputs": int(f.dead.sum()), "act_order": f.act_order}


def proxy_loss(w_kn: np.ndarray, q_kn: np.ndarray, h: np.ndarray) -> float:
    """tr(D^T H D), D = W - Q: the output error ||X W - X Q||^2 per calibration row."""
    d = (np.asarray(w_kn, np.float64) - q_kn).astype(np.float32)
    return float(np.einsum("kn,kn->", d, (h.astype(np.float32) @ d), dtype=np.float64))


def _rtn(w_kn: np.ndarray, block: int, dtype, clip: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    scales = int4_block_scales(w_kn, block, dtype, clip)
    full = np.repeat(scales.astype(np.float32), block, axis=0)
    return np.clip(np.rint(w_kn / full), -8, 7) * full, scales


class GPTQ(AWQ):
    """GPTQ weights; with ``int4_method = "awq-gptq"`` also AWQ's smoothing and clip ratios (the
    AWQ scales are searched first, in prepare, and GPTQ rounds the scaled weights in finish)."""

    name = "gptq"
    roles = frozenset({Role.SMOOTHING, Role.WEIGHTS})
    fallback = False

    def selected(self, recipe: QuantRecipe) -> bool:
        return recipe.precision == Precision.INT4 and recipe.int4_method in (Int4Method.GPTQ, Int4Method.AWQ_GPTQ)

    @staticmethod
    def _with_awq(recipe: QuantRecipe) -> bool:
        return recipe.int4_method == Int4Method.AWQ_GPTQ

    def statistics(self, recipe: QuantRecipe) -> frozenset[Stat]:
        awq = super().statistics(recipe) if self._with_awq(recipe) else frozenset()
        return awq | {Stat.HESSIAN}

    def smooth(self, ctx: PlanContext, group: Group) -> Smoothing | None:
        return super().smooth(ctx, group) if self._with_awq(ctx.recipe) else None

    def plan_weights(self, ctx: PlanContext) -> PlanStream:
        """The plans one at a time, as quantize_weights takes them: each holds its GEMM's new weights,
        so a list of them would be a float copy of every quantized weight; and one input's Hessian
        factor at a time (GEMMs reading one input, q/k/v or gate/up, come one after another)."""
        todo = ctx.quantized()
        return PlanStream(len(todo), self._plans(ctx, todo))

    def _plans(self, ctx: PlanContext, todo: list[Decision]) -> Iterator[WeightPlan]:
        self._factors: dict[str, HessianFactor | np.linalg.LinAlgError] = {}  # the current input's
        fell_back = []
        try:
            for d in todo:
                if d.gemm.act not in self._factors:
                    self._factors.clear()
                plan = self.plan_weight(ctx, d, weight_granularity(ctx.recipe), None)
                if (plan.info or {}).get("gptq", {}).get("fallback"):
                    fell_back.append(plan.gemm.node)
                yield plan
        finally:
            self._factors = {}
        if fell_back:
            log.warning("gptq: %d of %d GEMMs kept round-to-nearest weights (see the manifest's gptq.fallback): %s",
                        len(fell_back), len(todo), ", ".join(fell_back[:3]) + (" ..." if len(fell_back) > 3 else ""))

    def hessian(self, ctx: PlanContext, d: Decision) -> np.ndarray:
        return gemm_hessian(ctx, d)

    def plan_weight(self, ctx: PlanContext, d: Decision, granularity: Granularity,
                    shared_amax: float | None) -> WeightPlan:
        plan = WeightPlan(ctx.gemms[d.gemm.node], granularity, d.block)
        clip = None
        if self._with_awq(ctx.recipe) and ctx.recipe.awq_clip:
            clip = super().plan_weight(ctx, d, granularity, shared_amax).clip
        _, np_dtype = float_type(ctx.model)
        w = ctx.weight(d.gemm.node)
        h = self.hessian(ctx, d)
        rtn_q, rtn_s = _rtn(w, d.block, np_dtype, clip)
        info: dict = {"damp_requested": ctx.recipe.gptq_damp}
        try:
            f = _factor(getattr(self, "_factors", {}), d.gemm.act, h, ctx.recipe)
            q, scales, done = gptq_quantize(w, f, d.block, dtype=np_dtype, clip=clip)
            info.update(done)
        except np.linalg.LinAlgError as exc:
            q, scales = rtn_q, rtn_s
            info["fallback"] = f"round to nearest: the Hessian is {exc}"
        q, scales = _keep_better(w, h, (q, scales), (rtn_q, rtn_s), info)
        plan.weight, plan.scales, plan.info = q, scales, {"gptq": info}
        return plan


def _factor(cache: dict, act: str, h: np.ndarray, recipe: QuantRecipe) -> HessianFactor:
    """The input's factor, computed once for the GEMMs reading it (a failure is cached too)."""
    f = cache.get(act)
    if f is None:
        try:
            f = factor_hessian(h, recipe.gptq_damp, recipe.gptq_act_order)
        except np.linalg.LinAlgError as exc:
            f = exc
        cache[act] = f
    if isinstance(f, np.linalg.LinAlgError):
        raise f
    return f


def _keep_better(w: np.ndarray, h: np.ndarray, gptq: tuple, rtn: tuple, info: dict) -> tuple:
    """GPTQ's result unless its proxy output error is not below rounding to nearest's."""
    loss_rtn = proxy_loss(w, rtn[0], h)
    loss = proxy_loss(w, gptq[0], h) if "fallback" not in info else loss_rtn
    if "fallback" not in info and not loss < loss_rtn:
        gptq, loss = rtn, loss_rtn
        info["fallback"] = "round to nearest: GPTQ's output error on the calibration data was not lower"
    info.update(output_error_rtn=loss_rtn, output_error=loss, error_vs_rtn=loss / loss_rtn if loss_rtn > 0 else 1.0)
    return gptq


def gemm_hessian(ctx: PlanContext, d: Decision) -> np.ndarray:
    """The GEMM's input Hessian in this graph: divided by s s^T where smoothing (AWQ's or
    SmoothQuant's factor) scaled the input."""
    h = ctx.ranges.hessians.get(d.gemm.act)
    if h is None:
        raise QuantizationError(f"the ranges have no Hessian for {d.gemm.act} (input of {d.gemm.node})",
                                "calibrate again with a GPTQ recipe (reused ranges of another recipe lack it)")
    sm = ctx.smoothing_of(d.gemm.node)
    h = np.asarray(h, np.float64)
    if sm is not None:
        inv = 1.0 / np.asarray(sm.s, np.float64)
        h = h * inv[:, None] * inv[None, :]
    return h


class GPTQ8(RoundToNearest):
    """INT8/FP8 weights rounded by GPTQ on the 8-bit grid (``weight_rounding = "gptq"``), with
    the scales and granularity rounding to nearest would use; activations and smoothing stay
    the recipe's other methods'."""

    name = "gptq8"
    roles = frozenset({Role.WEIGHTS})
    fallback = False

    def selected(self, recipe: QuantRecipe) -> bool:
        return recipe.precision in (Precision.INT8, Precision.FP8) and recipe.weight_rounding == WeightRounding.GPTQ

    def statistics(self, recipe: QuantRecipe) -> frozenset[Stat]:
        return frozenset({Stat.HESSIAN})

    def plan_weights(self, ctx: PlanContext) -> PlanStream:
        """One plan at a time, as GPTQ's (each holds its GEMM's new weights; one input's factor held)."""
        todo = ctx.quantized()
        return PlanStream(len(todo), self._plans(ctx, todo))

    def _plans(self, ctx: PlanContext, todo: list[Decision]) -> Iterator[WeightPlan]:
        granularity = weight_granularity(ctx.recipe)
        shared = self.shared_amax(ctx) if granularity == Granularity.TENSOR else {}
        self._factors: dict[str, HessianFactor | np.linalg.LinAlgError] = {}
        fell_back = []
        try:
            for d in todo:
                if d.gemm.act not in self._factors:
                    self._factors.clear()
                plan = self.plan_weight(ctx, d, granularity, shared.get(d.gemm.node))
                if plan.info["gptq"].get("fallback"):
                    fell_back.append(plan.gemm.node)
                yield plan
        finally:
            self._factors = {}
        if fell_back:
            log.info("gptq: %d of %d GEMMs kept round-to-nearest weights (see the manifest's gptq.fallback)",
                     len(fell_back), len(todo))

    def plan_weight(self, ctx: PlanContext, d: Decision, granularity: Granularity,
                    shared_amax: float | None) -> WeightPlan:
        recipe, precision = ctx.recipe, ctx.recipe.precision
        plan = WeightPlan(ctx.gemms[d.gemm.node], granularity, d.block, None, shared_amax)
        _, np_dtype = float_type(ctx.model)
        w = ctx.weight(d.gemm.node)
        h = gemm_hessian(ctx, d)
        if granularity == Granularity.TENSOR:
            amax = shared_amax if shared_amax is not None else float(np.abs(w).max())
            scales = np.asarray(as_scale(amax, QMAX[precision], np_dtype))
        else:
            scales = weight_scales(w, precision, np_dtype)
        rtn_q = fake_quant(w, scales, precision)
        info: dict = {"damp_requested": recipe.gptq_damp}
        try:
            f = _factor(self._factors, d.gemm.act, h, recipe)
            q, done = gptq_fixed_scales(w, f, scales, precision)
            info.update(done)
        except np.linalg.LinAlgError as exc:
            q = rtn_q
            info["fallback"] = f"round to nearest: the Hessian is {exc}"
        q, _ = _keep_better(w, h, (q, scales), (rtn_q, scales), info)
        plan.weight, plan.scales, plan.info = q, scales, {"gptq": info}
        return plan


QUANT_METHODS.register(GPTQ())
QUANT_METHODS.register(GPTQ8())
