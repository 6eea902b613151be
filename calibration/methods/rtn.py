"""Round to nearest: the weight plan every recipe gets unless another method claims the weights.

INT8/FP8 weights: one scale per output channel (amax/qmax), or with ``weight_granularity =
"tensor"`` one per tensor, shared by the GEMMs of a group (q/k/v, gate/up: TensorRT-LLM's loader
rescales their fused weights to one scale anyway). INT4 (``int4_method = "rtn"``, and the base
of AWQ and GPTQ): blocks of ``block_size`` along K, amax/7 per (block, output channel); GEMMs
whose K no block of 16 or more divides are left in float (base.QuantMethod.check).
"""

from __future__ import annotations

import numpy as np

from trtforge.calibration.methods.base import Decision, PlanContext, QuantMethod, Role, weight_granularity
from trtforge.calibration.qdq import WeightPlan
from trtforge.calibration.recipe import QuantRecipe
from trtforge.registry import QUANT_METHODS
from trtforge.vocab import Granularity


class RoundToNearest(QuantMethod):
    name = "rtn"
    roles = frozenset({Role.WEIGHTS})
    fallback = True  # AWQ, GPTQ, ... take the weights over when their recipe fields select them

    def selected(self, recipe: QuantRecipe) -> bool:
        return True

    def plan_weights(self, ctx: PlanContext) -> list[WeightPlan]:
        granularity = weight_granularity(ctx.recipe)
        shared = self.shared_amax(ctx) if granularity == Granularity.TENSOR else {}
        return [self.plan_weight(ctx, d, granularity, shared.get(d.gemm.node)) for d in ctx.quantized()]

    def plan_weight(self, ctx: PlanContext, d: Decision, granularity: Granularity,
                    shared_amax: float | None) -> WeightPlan:
        """One GEMM's plan; subclasses add clip ratios or replacement weights."""
        return WeightPlan(ctx.gemms[d.gemm.node], granularity, d.block, None, shared_amax)

    @staticmethod
    def shared_amax(ctx: PlanContext) -> dict[str, float]:
        """Per-tensor scales: one amax for the quantized GEMMs of each group."""
        shared: dict[str, float] = {}
        for grp in ctx.groups:
            members = [n for n in grp.gemms if ctx.decisions[n].quantize]
            if len(members) > 1:
                amax = max(float(np.abs(ctx.weight(n)).max()) for n in members)
                shared.update({n: amax for n in members})
        return shared


QUANT_METHODS.register(RoundToNearest())
