"""Activation ranges for INT8/FP8 Q/DQ: one amax per quantized activation tensor.

``calib_method`` picks it from the streamed statistics (calibration/stats.py): ``max`` (the
running absmax), ``percentile`` (of the |x| histogram, ``percentile``), ``mse`` (the threshold
minimising the expected squared quantization error) or ``entropy`` (TensorRT's KL divergence).
Tensors not smoothed may use ``unsmoothed_calib_method``. On FP8's floating-point grid ``mse``
searches the threshold against E4M3 rounding itself (stats.amax_mse_fp8), and ``entropy`` (KL
over INT8's 128 uniform levels) falls back to ``max``. A smoothed tensor's range is that of X / s: exact
from the per-channel maxima for ``max``, else the method on the kept rows divided by s, never
above the exact maximum. With ``quantize_attention_bmm`` the inputs of the attention BMMs
(Q.K^T, P.V) get a pair too.
"""

from __future__ import annotations

import numpy as np

from trtforge.calibration.methods.base import PlanContext, QuantMethod, Role, Stat
from trtforge.calibration.patterns import attention_bmm_inputs
from trtforge.calibration.recipe import QuantRecipe
from trtforge.calibration.smoothing import Smoothing
from trtforge.calibration.stats import TensorStats, amax_from_rows, choose_amax
from trtforge.numerics import QMAX
from trtforge.registry import QUANT_METHODS
from trtforge.vocab import Precision

PRECISIONS = (Precision.INT8, Precision.FP8)  # the precisions whose activations are quantized


def activation_amax(st: TensorStats, sm: Smoothing | None, recipe: QuantRecipe) -> tuple[float, str]:
    """(amax, the method that chose it) for one GEMM input."""
    precision = recipe.precision
    qmax = QMAX[precision]
    if sm is None:
        method = (recipe.unsmoothed_calib_method or recipe.calib_method).value
        if precision == Precision.FP8 and method == "entropy":
            method = "max"  # KL over 128 uniform levels describes INT8's grid, not FP8's
        return choose_amax(st, method, recipe.percentile, qmax), method
    method = recipe.calib_method.value
    exact_max = float(np.max(st.channel_absmax / sm.s))
    if method == "max" or st.sample is None:
        return exact_max, "max" if method == "max" else "max (no calibration rows saved)"
    rows = st.sample.astype(np.float32) / sm.s[None, :]
    return min(amax_from_rows(rows, method, recipe.percentile, qmax), exact_max), method


class ActivationRangeMethod(QuantMethod):
    name = "ranges"
    roles = frozenset({Role.ACTIVATIONS})

    def selected(self, recipe: QuantRecipe) -> bool:
        return recipe.precision in PRECISIONS

    def statistics(self, recipe: QuantRecipe) -> frozenset[Stat]:
        # rows only sharpen smoothed ranges (without them: exact max), so they are not required
        return frozenset({Stat.ABSMAX, Stat.HISTOGRAM, Stat.CHANNEL_ABSMAX})

    def plan_activations(self, ctx: PlanContext) -> tuple[dict[str, tuple[float, list[str]]], dict[str, dict]]:
        recipe = ctx.recipe
        acts: dict[str, tuple[float, list[str]]] = {}
        info: dict[str, dict] = {}
        for d in ctx.quantized():
            name = d.gemm.node
            sm = ctx.smoothing_of(name)
            st = ctx.stats(d.gemm.act)
            tensor = ctx.gemms[name].act
            if tensor in acts:  # one shared pair for the GEMMs reading one tensor
                acts[tensor][1].append(name)
                continue
            amax, method = activation_amax(st, sm, recipe)
            acts[tensor] = (amax, [name])
            info[tensor] = {"amax": amax, "method": method, "smoothed": sm is not None}
        if recipe.quantize_attention_bmm:
            for tensor, readers in attention_bmm_inputs(ctx.model, ctx.idx).items():
                st = ctx.ranges.tensors.get(tensor)
                if st is None:
                    continue
                amax = choose_amax(st, recipe.calib_method.value, recipe.percentile, QMAX[recipe.precision])
                acts[tensor] = (amax, readers)
                info[tensor] = {"amax": amax, "method": recipe.calib_method.value, "smoothed": False, "bmm": True}
        return acts, info


QUANT_METHODS.register(ActivationRangeMethod())
