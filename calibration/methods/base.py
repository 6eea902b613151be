"""The QuantMethod interface and the dispatcher that picks a recipe's methods from the registry.

A quantization is planned in three parts, each filled by one method (its *role*):

* ``Role.SMOOTHING``   per-input-channel factors folded into the float graph before anything is
  quantized (SmoothQuant's migration, AWQ's activation-aware scale). At most one; optional.
* ``Role.ACTIVATIONS`` the per-tensor amax of each quantized activation (INT8/FP8 Q/DQ). At most
  one; none for weight-only precisions.
* ``Role.WEIGHTS``     which GEMMs can be quantized (INT4 block sizes) and each weight's plan:
  clip ratios, a shared per-tensor amax, or replacement weights and scales (GPTQ). Exactly one.

Every method is one module in calibration/methods/ that registers one instance in
:data:`trtforge.registry.QUANT_METHODS`. :func:`methods_for` asks every registered method
whether the recipe selects it (:meth:`QuantMethod.selected`, reading the recipe's fields) and
gives each role its method; ``prepare`` and ``finish`` (calibration/quantize.py) only call the
hooks of the chosen ones. A method marked ``fallback`` (RTN) fills its role only when no other
selected method claims it, so a new weight method (GPTQ) takes over without editing RTN.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx

from trtforge.calibration.collect import ActivationRanges
from trtforge.calibration.patterns import Gemm, Group
from trtforge.calibration.qdq import WeightPlan
from trtforge.calibration.recipe import QuantRecipe
from trtforge.calibration.smoothing import Smoothing
from trtforge.calibration.stats import TensorStats
from trtforge.errors import QuantizationError
from trtforge.graph import GraphIndex
from trtforge.numerics import block_size_for
from trtforge.registry import QUANT_METHODS
from trtforge.vocab import Granularity, Precision, StrEnum


class Role(StrEnum):
    SMOOTHING = "smoothing"
    ACTIVATIONS = "activations"
    WEIGHTS = "weights"


class Stat(StrEnum):
    """The statistics calibration collects (all of them, always: ranges serve any later recipe).
    A method names those it reads, so a reused ranges file can be checked before any work."""

    ABSMAX = "absmax"  # per tensor
    HISTOGRAM = "histogram"  # of |x|, per tensor
    CHANNEL_ABSMAX = "channel-absmax"
    CHANNEL_ABSMEAN = "channel-absmean"
    ROWS = "rows"  # the kept token rows (ranges.samples.npz, absent when only ranges.json is kept)
    # X^T X of every GEMM input (ranges.hessians.npz): K^2 floats per distinct input, so
    # collected only when the recipe's methods read it (GPTQ), never by default
    HESSIAN = "hessian"


@dataclass
class Decision:
    """Whether one GEMM is quantized (else why not), and its INT4 block."""

    gemm: Gemm  # as found in the float graph (its ``act`` names the calibrated tensor)
    quantize: bool
    reason: str = ""
    block: int | None = None
    # not in the recipe's precision but not float either: the weight stored in this precision
    # instead (Precision.INT8: weight-only, per output channel; an INT4 recipe's weight_only_int8)
    fallback: Precision | None = None


@dataclass
class PlanContext:
    """What a method's hooks see: the graph being planned and everything known about it.

    In ``prepare`` (smoothing) the graph is the float export and ``smoothings`` is empty; in
    ``finish`` (activations, weights) it is the smoothed graph after FP16 conversion and opset
    upgrade, whose GEMMs (``gemms``) may read renamed tensors: look statistics up through the
    decision's ``gemm.act``, edit the graph through ``gemms[node]``.
    """

    model: onnx.ModelProto
    idx: GraphIndex  # built once per pass; methods never rebuild it
    recipe: QuantRecipe
    ranges: ActivationRanges
    gemms: dict[str, Gemm]  # by node name, as in ``model``
    decisions: dict[str, Decision]  # by node name, in graph order
    groups: list[Group]
    smoothings: dict[str, Smoothing] = field(default_factory=dict)  # by group act
    _group_of: dict[str, Group] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._group_of = {n: grp for grp in self.groups for n in grp.gemms}

    def stats(self, tensor: str) -> TensorStats:
        st = self.ranges.tensors.get(tensor)
        if st is None:
            raise QuantizationError(f"the ranges have no statistics for {tensor}", "re-run calibration on this export")
        return st

    def quantized(self) -> list[Decision]:
        return [d for d in self.decisions.values() if d.quantize]

    def group_of(self, node: str) -> Group | None:
        return self._group_of.get(node)

    def smoothing_of(self, node: str) -> Smoothing | None:
        grp = self._group_of.get(node)
        return self.smoothings.get(grp.act) if grp else None

    def weight(self, node: str) -> np.ndarray:
        """The GEMM's float weight in this graph, as [K, N] float32."""
        return self.gemms[node].weight_kn(self.idx)


class QuantMethod:
    """One quantization method. Subclasses set ``name`` and ``roles`` and implement
    :meth:`selected` plus the hooks of their roles; the other hooks are never called."""

    name: ClassVar[str]
    roles: ClassVar[frozenset[Role]]
    fallback: ClassVar[bool] = False  # fills its roles only when no other selected method does

    def selected(self, recipe: QuantRecipe) -> bool:
        """Whether ``recipe`` asks for this method (read its fields; never its name)."""
        raise NotImplementedError

    def statistics(self, recipe: QuantRecipe) -> frozenset[Stat]:
        """The statistics this method reads for ``recipe``."""
        return frozenset()

    # ------------------------------------------------------------ Role.SMOOTHING (prepare)
    def smooth(self, ctx: PlanContext, group: Group) -> Smoothing | None:
        """The factor for one group with at least one quantized GEMM, or None to leave it."""
        raise NotImplementedError

    # ------------------------------------------------------------ Role.ACTIVATIONS (finish)
    def plan_activations(self, ctx: PlanContext) -> tuple[dict[str, tuple[float, list[str]]], dict[str, dict]]:
        """``({tensor: (amax, [reader nodes])}, {tensor: manifest record})`` for the Q/DQ pairs."""
        raise NotImplementedError

    # ------------------------------------------------------------ Role.WEIGHTS
    def check(self, gemm: Gemm, recipe: QuantRecipe) -> tuple[int | None, str]:
        """(prepare) ``(block, reason)``: the GEMM's INT4 block, and why it cannot be quantized
        ("" when it can). The default applies the block rules of block-quantized weights."""
        if weight_granularity(recipe) != Granularity.BLOCK:
            return None, ""
        block = block_size_for(gemm.k, recipe.block_size)
        if block is None:
            return None, f"K={gemm.k} is not divisible by a block size of 16 or more"
        if (gemm.k if gemm.trans_b else gemm.n) % 2:
            return block, "INT4 needs an even last dimension (TensorRT packs two values per byte)"
        return block, ""

    def plan_weights(self, ctx: PlanContext) -> list[WeightPlan]:
        """(finish) One plan per quantized GEMM, in decision order."""
        raise NotImplementedError


def weight_granularity(recipe: QuantRecipe) -> Granularity:
    """How the recipe's weights are scaled: blocks along K for INT4, else per channel or tensor."""
    if recipe.precision == Precision.INT4:
        return Granularity.BLOCK
    return Granularity(recipe.weight_granularity)


@dataclass(frozen=True)
class Methods:
    """The methods a recipe uses, one per role."""

    weights: QuantMethod
    smoothing: QuantMethod | None = None
    activations: QuantMethod | None = None

    def __iter__(self) -> Iterator[QuantMethod]:
        seen: list[QuantMethod] = []
        for m in (self.smoothing, self.activations, self.weights):
            if m is not None and m not in seen:
                seen.append(m)
        return iter(seen)

    def statistics(self, recipe: QuantRecipe) -> frozenset[Stat]:
        return frozenset().union(*(m.statistics(recipe) for m in self))

    def names(self) -> list[str]:
        return [m.name for m in self]


def methods_for(recipe: QuantRecipe) -> Methods:
    """Each role's method for ``recipe``, from every registered QuantMethod."""
    chosen = [m for m in QUANT_METHODS if m.selected(recipe)]
    picked: dict[Role, QuantMethod | None] = {}
    for role in Role:
        claim = [m for m in chosen if role in m.roles and not m.fallback] or [m for m in chosen if role in m.roles]
        if len(claim) > 1:
            raise QuantizationError(
                f"recipe {recipe.name} selects {len(claim)} {role} methods ({', '.join(m.name for m in claim)})",
                "two registered quantization methods claim the same recipe fields; remove one plugin",
            )
        picked[role] = claim[0] if claim else None
    if picked[Role.WEIGHTS] is None:
        raise QuantizationError(f"no registered quantization method plans the weights of recipe {recipe.name}",
                                f"registered: {', '.join(QUANT_METHODS.names())}")
    return Methods(picked[Role.WEIGHTS], picked[Role.SMOOTHING], picked[Role.ACTIVATIONS])


def needs_hessians(recipe: QuantRecipe) -> bool:
    """Whether the recipe reads the GEMM inputs' Hessians (X^T X), which calibration then accumulates."""
    return Stat.HESSIAN in methods_for(recipe).statistics(recipe)


def needs_rows(recipe: QuantRecipe) -> bool:
    """Whether the recipe needs the saved calibration rows, not only the statistics."""
    return Stat.ROWS in methods_for(recipe).statistics(recipe)
