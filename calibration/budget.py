"""Quantize under an accuracy budget: the fewest weight bytes kept in a higher precision until it holds.

In:  the export artifact, the recipe (its ``budget``), the ranges collected on the *ranges part*
     of the calibration samples, the *held-out part* (never used for ranges), dims, the float
     type of the unquantized rest, a scratch folder.
Out: a :class:`Search`: the GEMMs to keep in float (``keep``) and, for INT4 recipes, the GEMMs
     to store as INT8 weight-only (``int8``), every group's measured sensitivities, the budget
     record; ``Search.verify(path)`` measures a written model on the held-out part (the stage
     re-measures its final graph with it).

Precisions on offer: the recipe's precision for every GEMM, then, for a group taken out of it,
INT8 weight-only first where the recipe is INT4 (half a byte per weight more; ONNX Runtime's CPU
provider runs it, TensorRT runs a weight-only INT8 DequantizeLinear into a float GEMM, and
TensorRT-LLM's loader reads it as a W8A16 layer of a MIXED_PRECISION checkpoint), then the
unquantized rest's float type (FP16: two bytes). FP8 and INT8 recipes go straight to float.

Every "meets the budget" below is judged by a one-sided confidence bound of the held-out
measurement (recipe key ``budget_confidence``, default 0.95; 0: the point estimate), never by the
point estimate alone: calibration/budget_spec.py says why, calibration/budget_eval.py computes it.
A decoder's perplexity change is by default its expected change, from the KL divergence of the
next-token distributions (``budget_estimator = "kl"``; "nll": the held-out text's own change):
calibration/budget_eval.py says why; the other estimate is recorded beside it.

Method (one calibration pass, statistics reused; calibration/budget_graph.py builds the graph,
calibration/budget_eval.py measures):

1. The recipe quantizes the whole graph once (``prepare`` + ``finish``, the stage's own
   passes), and every quantized GEMM input gets a switch: ``Where(keep_g, float, ...)`` on its
   weight (the smoothed float weight, in the rest's type) and on its activation, and for INT4
   recipes ``Where(int8_g, int8_dequantized, int4_dequantized)`` inside it; boolean graph
   inputs per *group* (the GEMMs sharing one input and one smoothing factor: q/k/v, gate/up,
   which TensorRT-LLM fuses into one layer of one precision). Setting a group's switch computes
   what the graph with that group excluded (or in INT8) computes (smoothing folds are exact in
   float), so every candidate assignment is one run of one session, never a re-quantization.
2. The unquantized graph (every keep switch on) is measured first: if even it misses the
   budget, the search stops with one error saying what it measures. Then the fully quantized
   graph: if it meets the budget, nothing is kept.
3. The zero-byte lever (:func:`rounding_lever`, unless ``budget_rounding`` is off): the plain
   recipe missed, so the same weights are rounded by GPTQ instead (int4-awq: AWQ's scales then
   GPTQ; int4-rtn: GPTQ; INT8/FP8: ``weight_rounding = "gptq"``), with the Hessians the same
   calibration pass collected (the stage collects them whenever a budget has this lever) and
   the smoothing factors step 1 found (not searched again); the switched graph of that recipe
   is measured fully quantized on the held-out part and replaces step 1's where it measures
   better (``budget.rounding`` in the manifest says what was tried, measured and why it was or
   was not used). If it meets the budget, nothing is kept.
4. Sensitivity of each group, with only that group quantized (and, for INT4, with only that
   group in INT8), on the first ``RANK_TOKENS`` held-out tokens: the budget's own metric, i.e.
   for a decoder judged by the KL (the default) the mean KL of its next-token distribution from
   the float export's, for an encoder 1 - the mean embedding cosine; for a decoder judged by the
   observed perplexity (``budget_estimator = "nll"``, whose label term is noise at one group's
   size) the relative noise power of the last hidden state (the lm_head's input) against the
   unquantized graph, on a pruned copy of the graph without the lm_head.
5. *Moves* (a group INT4 -> INT8, a group INT8 or the recipe's precision -> float) ordered by
   error reduction per extra weight byte (INT4 -> INT8 half a byte per weight, INT8 -> FP16 one
   more; cost-aware: a small sensitive layer before a large one of the same error), a group's
   INT8 move always before its float move; the shortest prefix of moves that meets the budget,
   measured on the whole held-out part (:func:`shortest_prefix`: regula falsi on the cumulative
   sensitivity; two runs where the sensitivities add up exactly, never much more than a bisection).
6. *Return pass* (:func:`return_pass`, up to ``budget_return_tries`` runs, default 8): the
   prefix's largest moves are tried back in the recipe's precision one at a time, each measured
   on the whole held-out part with the rest taken, and stay back where the budget still holds.

The stage then quantizes with that assignment (the lever's rounding where it was used, and
``exclude`` and ``weight_only_int8`` patterns; the smoothing factors reused) and measures its written model on the same held-out samples; should that miss the budget, the
next move is taken and the stage quantizes again (:meth:`Search.more`).
"""

from __future__ import annotations

import bisect
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import helper

from trtforge.calibration.budget_eval import HeldOut, mapped_session, noise_power, split_held_out
from trtforge.calibration.budget_graph import Switched, SwitchGroup, build_switched
from trtforge.calibration.budget_spec import Budget, Measured
from trtforge.calibration.collect import ActivationRanges
from trtforge.calibration.recipe import Int4Method, QuantRecipe, WeightRounding
from trtforge.calibration.smoothing import Smoothing
from trtforge.errors import QuantizationError
from trtforge.graph import needed_subgraph, tensor_types
from trtforge.manifest import ModelDims
from trtforge.onnx_io import load_graph
from trtforge.ort import NO_PREPACKING, graph_session, release_memory
from trtforge.progress import progress
from trtforge.textdata import Samples
from trtforge.vocab import Precision

log = logging.getLogger(__name__)

__all__ = ["BYTES", "Search", "rounding_lever", "search", "shortest_prefix", "split_held_out"]

BYTES = {Precision.FP32: 4.0, Precision.FP16: 2.0, Precision.BF16: 2.0, Precision.INT8: 1.0, Precision.FP8: 1.0,
         Precision.INT4: 0.5}


# --------------------------------------------------------------------------- the search


@dataclass(frozen=True)
class Move:
    """One step of the search: group ``group`` into precision ``to``, for ``cost`` extra weight bytes."""

    group: int
    to: Precision
    gain: float  # the sensitivity it removes
    cost: float

    @property
    def ratio(self) -> float:
        return self.gain / max(self.cost, 1e-30)


def order_moves(moves: list[Move]) -> list[Move]:
    """Best error reduction per byte first; a group's float move never before its INT8 move
    (held back, it follows that move at once)."""
    first = {m.group for m in moves if m.to == Precision.INT8}
    out: list[Move] = []
    held: dict[int, Move] = {}
    done: set[int] = set()
    for m in sorted(moves, key=lambda m: -m.ratio):
        if m.to != Precision.INT8 and m.group in first and m.group not in done:
            held[m.group] = m
            continue
        out.append(m)
        if m.to == Precision.INT8:
            done.add(m.group)
            if m.group in held:
                out.append(held.pop(m.group))
    return out


@dataclass
class Search:
    budget: Budget
    eval: HeldOut
    groups: list[SwitchGroup]
    moves: list[Move]  # in the order they are taken
    kept: int  # the first ``kept`` moves are taken
    rest_precision: str
    quant_precision: str
    # measurements on the held-out part: point estimate and the confidence bound the budget is judged by
    unquantized: Measured = Measured(0.0, 0.0)
    all_quantized: Measured = Measured(0.0, 0.0)
    searched: Measured | None = None  # the switched graph's value with the chosen moves taken
    measured: Measured | None = None  # the written model's value (Search.verify)
    evaluations: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    gemm_elements: dict[str, int] = field(default_factory=dict)
    # the zero-byte lever (GPTQ rounding of the same weights): what was tried, measured, chosen
    rounding: dict = field(default_factory=dict)
    lever: QuantRecipe | None = None  # the recipe with that rounding, where it was used
    smoothings: dict[str, Smoothing] = field(default_factory=dict)  # the smoothing method's factors, reused
    returns: list[dict] = field(default_factory=list)  # the return pass's tries (:func:`return_pass`)

    def assignment(self, k: int | None = None) -> dict[int, Precision]:
        """Group index -> its precision after the first ``k`` moves (default: those taken); groups
        still in the recipe's precision are absent."""
        out: dict[int, Precision] = {}
        for m in self.moves[: self.kept if k is None else k]:
            out[m.group] = m.to
        return out

    def flags(self, k: int) -> dict[str, bool]:
        return {(self.groups[gi].flag if p != Precision.INT8 else self.groups[gi].flag8): True
                for gi, p in self.assignment(k).items()}

    def _members(self, int8: bool) -> list[str]:
        return [n for gi, p in self.assignment().items() if (p == Precision.INT8) == int8 for n in self.groups[gi].members]

    def keep(self) -> list[str]:
        """The GEMMs kept in float."""
        return self._members(False)

    def int8(self) -> list[str]:
        """The GEMMs stored as INT8 weight-only (INT4 recipes)."""
        return self._members(True)

    def more(self) -> bool:
        """Take the next move (the written model missed the budget); False when none is left."""
        if self.kept >= len(self.moves):
            return False
        self.kept += 1
        return True

    def recipe(self, recipe: QuantRecipe) -> QuantRecipe:
        """``recipe`` with the assignment: float GEMMs excluded, INT8 ones as weight_only_int8 (exact names)."""
        base = self.lever if self.lever is not None else recipe  # GPTQ rounding where the search chose it
        changes: dict = {"exclude": [*base.exclude, *(_glob_escape(n) for n in self.keep())]}
        if self.int8():
            changes["weight_only_int8"] = [*base.weight_only_int8, *(_glob_escape(n) for n in self.int8())]
        return base.replace(**changes)

    def verify(self, model_path: Path) -> Measured:
        sess = mapped_session(model_path, self.eval.providers)
        self.measured = self.eval.value(sess)
        del sess
        release_memory()
        return self.measured

    def records(self, report: dict) -> tuple[list[dict], dict]:
        """The manifest's ``layers`` and ``budget`` (see docs/quantization.md)."""
        floats, int8s = set(self.keep()), set(self.int8())
        group_of = {n: g for g in self.groups for n in g.members}
        rank = {(m.group, m.to): r for r, m in enumerate(self.moves, 1)}
        layers, elems = [], {}
        for entry in report["nodes"]:
            name, k, n = entry["node"], entry["k"], entry["n"]
            g = group_of.get(name)
            status = entry["status"]
            prec = (self.quant_precision if status == "quantized" else entry.get("precision", self.rest_precision)
                    if status == "fallback" else self.rest_precision)
            if status == "quantized":
                reason = ("quantized: within the budget" if self.lever is None else
                          f"quantized, weights rounded by GPTQ ({self.rounding.get('lever')}): within the budget")
            elif name in floats or name in int8s:
                gi = self.groups.index(g)
                to = Precision.parse(prec)
                what = "INT8 weight-only" if to == Precision.INT8 else f"kept in {self.rest_precision}"
                reason = (f"{what} by the budget {self.budget.text}: move {rank.get((gi, to), 0)} of {len(self.moves)} "
                          "by error reduction per weight byte")
                entry["reason"] = reason
            else:
                reason = entry.get("reason") or "excluded by the recipe"
            row = {"name": name, "group": g.name if g else None, "role": g.role if g else None,
                   "precision": prec, "sensitivity": g.sensitivity if g else None, "reason": reason,
                   "weight_bytes": int(k * n * BYTES.get(Precision.parse(prec), 4.0))}
            if g is not None and g.sensitivity_int8 is not None:
                row["sensitivity_int8"] = g.sensitivity_int8
            layers.append(row)
            elems[prec] = elems.get(prec, 0) + k * n
        total = max(1, sum(elems.values()))
        planned = sum(g.elements for g in self.groups)
        final = self.assignment()
        int8_groups = sum(p == Precision.INT8 for p in final.values())
        value = self.measured if self.measured is not None else self.searched
        kl = self.eval.decoder and self.eval.estimator == "kl"
        budget = {
            **self.budget.to_json(),
            "measured": value.point if value is not None else None,  # the point estimate
            # the budget is judged by this one-sided confidence bound (budget_spec.DEFAULT_CONFIDENCE)
            "measured_bound": value.bound if value is not None else None,
            "standard_error": value.se if value is not None else None,
            "standard_error_unit": "nats per token" if self.budget.metric.unit == "%" else "cosine",
            "confidence": self.eval.confidence,
            "quantile": value.quantile if value is not None else 0.0,
            "judged_by": ("point estimate" if value is None or value.quantile == 0.0 else
                          f"one-sided {100 * self.eval.confidence:g}% bound (Student t, {value.samples - 1} dof)")
                         + (" of the expected perplexity change (KL)" if kl else ""),
            "estimator": (("kl: expected perplexity change, exp(mean KL(float || quantized)) - 1 over the held-out "
                           f"next-token distributions (the float export's top {self.eval.kl_top} tokens per position, the rest "
                           "one bucket)") if kl else
                          "nll: the held-out text's observed perplexity change" if self.eval.decoder else
                          "mean cosine of the held-out sentences' embeddings"),
            # decoders judged by the KL: the held-out text's own perplexity change beside it
            "observed": value.observed if value is not None else None,
            "observed_bound": value.observed_bound if value is not None else None,
            "observed_standard_error": value.observed_se if value is not None else None,
            "measured_all_quantized": self.all_quantized.point,
            "measured_all_quantized_bound": self.all_quantized.bound,
            "measured_unquantized": self.unquantized.point,
            "measured_search": self.searched.point if self.searched is not None else None,
            "measured_search_bound": self.searched.bound if self.searched is not None else None,
            "held_out_samples": len(self.eval.held.ids),
            "held_out_tokens": self.eval.held.num_tokens,
            "held_out_sha256": self.eval.held.sha256,
            "ranking_tokens": self.eval.rank_tokens if any(g.sensitivity is not None for g in self.groups) else 0,
            "met": self.budget.met(value),
            "groups": len(self.groups),
            "groups_kept": len(final),  # out of the recipe's precision (INT8 or float)
            "groups_int8": int8_groups,
            "groups_float": len(final) - int8_groups,
            "moves_taken": self.kept,
            "fallbacks": ([Precision.INT8.value, self.rest_precision] if any(g.flag8 for g in self.groups)
                          else [self.rest_precision]),
            "weight_share": {p: e / total for p, e in elems.items()},
            "kept_share_of_planned": (sum(self.groups[gi].elements for gi in final) / planned if planned else 0.0),
            "expected_gemm_weight_bytes": sum(x["weight_bytes"] for x in layers),
            "rounding": self.rounding,
            # the return pass: each try of a taken move back in the recipe's precision, and whether it stayed
            "returns": self.returns,
            "moves_returned": sum(r["returned"] for r in self.returns),
            "evaluations": self.evaluations,
            "search_s": self.seconds,
            "sensitivity": (("mean KL (nats per token) of the next-token distribution from the float export's with only "
                             "the group quantized, on the ranking tokens" if self.eval.decoder else
                             "1 - mean embedding cosine to the float export with only the group quantized, on the "
                             "ranking samples") if self.eval.ranks_by_metric else
                            "relative noise power of the last hidden state with only the group quantized, "
                            "against the unquantized graph"),
        }
        if any(g.flag8 for g in self.groups):
            budget["sensitivity_int8"] = "the same with only the group in INT8 weight-only"
        return layers, budget


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _moves(groups: list[SwitchGroup], int8: bool, rest: Precision, quant_bytes: float) -> list[Move]:
    out, rest_bytes = [], BYTES.get(rest, 4.0)
    for i, g in enumerate(groups):
        s = g.sensitivity or 0.0
        if int8:
            s8 = g.sensitivity_int8 or 0.0
            out.append(Move(i, Precision.INT8, max(s - s8, 0.0), (BYTES[Precision.INT8] - quant_bytes) * g.elements))
            out.append(Move(i, rest, s8, (rest_bytes - BYTES[Precision.INT8]) * g.elements))
        else:
            out.append(Move(i, rest, s, (rest_bytes - quant_bytes) * g.elements))
    return out


def rounding_lever(recipe: QuantRecipe) -> tuple[QuantRecipe, str] | None:
    """The zero-byte lever for ``recipe``: the same precision, scales and layout with GPTQ's
    rounding of the weights (error feedback through each GEMM input's Hessian), and what it
    changes; None where the recipe rounds with GPTQ already or ``budget_rounding`` is off.
    INT4: AWQ -> AWQ's scales then GPTQ (``int4_method = "awq-gptq"``), RTN -> GPTQ; INT8 and
    FP8: ``weight_rounding = "gptq"`` in act order (``gptq_act_order``), or act order alone where
    the recipe has GPTQ rounding without it. Act order costs nothing here: an 8-bit weight has one
    scale per output channel (or tensor), fixed from the weights before the pass, so the order
    changes only where each rounding error is pushed. Measured on the budget's own held-out part
    (bench/fp8_levers.py): Gemma 3 270M fp8 +1.61% -> +1.47% (KL), all-MiniLM-L6-v2 fp8 1 - cosine
    1.44e-3 -> 1.38e-3, int8-sq 1.68e-3 -> 1.52e-3 (docs/quantization.md)."""
    if not recipe.budget_rounding:
        return None
    if recipe.precision == Precision.INT4:
        to = {Int4Method.AWQ: Int4Method.AWQ_GPTQ, Int4Method.RTN: Int4Method.GPTQ}.get(recipe.int4_method)
        return (recipe.replace(int4_method=to), f"int4_method={to.value}") if to is not None else None
    if recipe.weight_rounding == WeightRounding.NEAREST:
        return (recipe.replace(weight_rounding=WeightRounding.GPTQ, gptq_act_order=True),
                f"weight_rounding={WeightRounding.GPTQ.value}, gptq_act_order=true")
    if not recipe.gptq_act_order:
        return recipe.replace(gptq_act_order=True), "gptq_act_order=true"
    return None


def search(art, recipe: QuantRecipe, ranges: ActivationRanges, held: Samples, dims: ModelDims, dtype: str,
           budget: Budget, scratch: Path, *, providers: list | None = None) -> Search:
    """The assignment (module docstring); raises QuantizationError when no assignment meets the budget.
    ``providers``: the calibration device's, for every session of the search."""
    t0 = time.perf_counter()
    int8 = recipe.precision == Precision.INT4 and recipe.budget_int8  # the INT8 weight-only tier
    sw = build_switched(art, recipe, ranges, dims, dtype, scratch / "plain")
    groups = sw.groups

    vocab = int(dims.vocab_size or 0)
    ev = HeldOut(held, dims, art.manifest.source.task, budget, vocab, int(dims.hidden_size or 0), providers,
                 confidence=recipe.budget_confidence, estimator=recipe.budget_estimator)
    ev.set_reference(art.model_path)
    if recipe.budget_confidence > 0 and len(held.ids) < 2:
        log.warning("budget %s: one held-out sample gives no standard error; judged by the point estimate "
                    "(pass more calibration text)", budget.text)
    rest_p, quant_b = Precision.parse(dtype), BYTES[recipe.precision]
    s = Search(budget, ev, groups, [], 0, dtype, recipe.precision.value)
    s.smoothings = sw.smoothings
    s.gemm_elements = {g.name: g.elements for g in groups}
    everything = {g.flag: True for g in groups}

    sess = mapped_session(sw.path, providers)
    s.unquantized = ev.value(sess, everything)
    s.evaluations.append({"moves": "all", **s.unquantized.to_json()})
    if not budget.met(s.unquantized):
        raise QuantizationError(
            f"budget {budget.text} cannot be met: with no GEMM quantized ({dtype} rest) the graph itself measures "
            f"{budget.metric.name} {budget.show(s.unquantized)} on {len(held.ids)} held-out calibration samples",
            "loosen the budget, or keep the unquantized rest in fp32 (recipe dtype = fp32)")
    s.all_quantized = ev.value(sess, {})
    s.evaluations.append({"moves": 0, **s.all_quantized.to_json()})
    del sess
    release_memory()
    log.info("budget %s: unquantized %s, every GEMM quantized %s", budget.text, budget.show(s.unquantized),
             budget.show(s.all_quantized))
    s.rounding = {"lever": None, "tried": False, "used": False, "measured_plain": s.all_quantized.point,
                  "measured_plain_bound": s.all_quantized.bound}
    if budget.met(s.all_quantized):
        s.rounding["reason"] = "not needed: the plain recipe meets the budget"
    else:
        sw = _try_rounding(s, sw, art, recipe, ranges, dims, dtype, scratch)
        groups = s.groups = sw.groups
    if budget.met(s.all_quantized):
        s.searched = s.all_quantized
        s.moves = order_moves(_moves(groups, int8, rest_p, quant_b))  # unranked: only if the written model misses
        s.seconds = time.perf_counter() - t0
        return s

    if ev.ranks_by_metric:
        # sensitivities: the budget's own metric (a decoder's KL, an encoder's 1 - cosine) with only
        # the group quantized, on the ranking tokens, through the whole switched graph. Measured
        # against ranking by what the fully quantized graph gains with only the group in float (the
        # first move's own gain, as many runs): on Gemma 3 fp8 at perplexity=1% that kept 26 groups
        # (65.4% FP8) where this keeps 18 (76.5%) (docs/results/budget-gemma3-fp8-removal-ranking.json)
        rsess = mapped_session(sw.path, providers)
        for g in progress(groups, len(groups), "budget sensitivity (groups)"):
            g.sensitivity = ev.rank_error(rsess, {**everything, g.flag: False})
            if int8:
                g.sensitivity_int8 = ev.rank_error(rsess, {**everything, g.flag: False, g.flag8: True})
        del rsess
    else:
        # sensitivities, on a copy of the switched graph without the lm_head
        hidden = sw.hidden
        light = load_graph(sw.path)
        htype = tensor_types(light).get(hidden, onnx.TensorProto.FLOAT)
        sub = needed_subgraph(light, [hidden], lambda into, known: into.append(
            known.get(hidden) or helper.make_tensor_value_info(hidden, htype, None)))
        rsess = graph_session(sub, sw.path.parent, config=NO_PREPACKING, providers=providers)
        del light, sub
        ref = ev.hidden(rsess, everything, hidden)
        for g in progress(groups, len(groups), "budget sensitivity (groups)"):
            g.sensitivity = noise_power(ref, ev.hidden(rsess, {**everything, g.flag: False}, hidden))
            if int8:
                g.sensitivity_int8 = noise_power(ref, ev.hidden(rsess, {**everything, g.flag: False, g.flag8: True}, hidden))
        del rsess, ref
    release_memory()
    s.moves = order_moves(_moves(groups, int8, rest_p, quant_b))

    search_sess = mapped_session(sw.path, providers)
    n = len(s.moves)
    cache: dict[int, Measured] = {0: s.all_quantized, n: s.unquantized}  # every move taken: every group in float

    def at(k: int, sess=search_sess) -> Measured:
        if k not in cache:
            cache[k] = ev.value(sess, s.flags(k))
            s.evaluations.append({"moves": k, **cache[k].to_json()})
            log.info("budget %s: %d of %d moves -> %s", budget.text, k, n, budget.show(cache[k]))
        return cache[k]

    cum = [0.0]
    for m in s.moves:
        cum.append(cum[-1] + m.gain)
    s.kept = shortest_prefix(n, cum, at, budget)
    s.searched = at(s.kept)
    if recipe.budget_return_tries and s.kept > 1:
        return_pass(s, search_sess, recipe.budget_return_tries)
    del search_sess, at
    release_memory()
    s.seconds = time.perf_counter() - t0
    return s


def return_pass(s: Search, sess, tries: int) -> None:
    """Try the largest of the taken moves back (module docstring, 6): the prefix is the shortest
    one of an order ranked by estimates, so a large GEMM ranked in by its one-group sensitivity may
    not be needed once the rest is taken. Candidates: each group's last taken move (so a group's
    INT8 move never goes back while its float move stays), largest weight bytes first, then
    smallest gain; one held-out run each with every other taken move kept; a move whose return
    still meets the budget stays returned, and later tries build on it. The returned moves go
    right after the taken ones (the first ones :meth:`Search.more` takes again, last returned
    first), so ``assignment()`` stays the first ``kept`` moves."""
    budget, k = s.budget, s.kept
    taken = s.moves[:k]
    last = {m.group: i for i, m in enumerate(taken)}
    cands = sorted(last.values(), key=lambda i: (-taken[i].cost, taken[i].gain))[:tries]
    back: list[int] = []
    record: list[dict] = []
    for i in cands:
        keep = [m for j, m in enumerate(taken) if j != i and j not in back]
        flags = {(s.groups[m.group].flag if m.to != Precision.INT8 else s.groups[m.group].flag8): True for m in keep}
        value = s.eval.value(sess, flags)
        ok = budget.met(value)
        g = s.groups[taken[i].group]
        record.append({"group": g.name, "to": taken[i].to.value, "weight_elements": g.elements, "returned": ok,
                       **value.to_json()})
        s.evaluations.append({"moves": f"{k} less {g.name}", **value.to_json()})
        log.info("budget %s: %d moves without %s (%s) -> %s%s", budget.text, k, g.name, taken[i].to.value,
                 budget.show(value), ", returned" if ok else "")
        if ok:
            back.append(i)
            s.searched = value
    s.returns = record
    if back:
        kept = [m for j, m in enumerate(taken) if j not in back]
        s.moves = kept + [taken[j] for j in reversed(back)] + s.moves[k:]
        s.kept = len(kept)


def shortest_prefix(n: int, cum: list[float], at: Callable[[int], Measured], budget: Budget) -> int:
    """The shortest prefix ``k`` of the ``n`` ordered moves whose measurement ``at(k)`` meets the
    budget, given that ``at(0)`` misses it and ``at(n)`` meets it; ``cum[k]``: the sensitivities the
    first ``k`` moves remove (``cum[0] = 0``, non-decreasing).

    The sensitivities add up (a decoder's one-group KLs sum to the fully quantized graph's KL
    within 0.4% on Gemma 3 fp8; docs/quantization.md), so the error after ``k`` moves is close to
    a straight line in ``cum[k]`` between the measured ends. Each step measures the first prefix
    that line, drawn through the two measured prefixes that bracket the answer (on
    :meth:`Budget.error`'s additive scale, bounds included), puts at the limit: regula falsi on the
    cumulative sensitivity, with the Illinois step against a one-sided crawl, and a bisection
    where the line is of no use or two runs did not halve the bracket (so never much slower than
    a bisection). Where the line is right it costs two runs (the prefix and the one before it,
    which proves it the shortest) against the 2 log2(n) of the exponential-then-binary search it
    replaced (Gemma 3 fp8, 72 moves: 10 runs of ~30 s). On Gemma 3 fp8 the line is not right: the
    first moves gain about twice their one-group KLs on the held-out part, the later ones less,
    so it takes 6 runs there (docs/quantization.md). The answer is the bracket a bisection ends
    at: ``at(k)`` meets the budget and ``at(k - 1)`` does not, both measured."""
    target = budget.error(budget.limit)
    lo, hi = 0, n
    f = {lo: budget.error(at(lo)) - target, hi: budget.error(at(hi)) - target}  # > 0 misses, <= 0 meets
    weight = {lo: 1.0, hi: 1.0}  # Illinois: the retained end's distance to the limit, scaled down
    side, streak = 0, 0
    widths = [hi - lo]
    while hi - lo > 1:
        flo, fhi = f[lo] * weight[lo], f[hi] * weight[hi]
        span = cum[hi] - cum[lo]
        # a bisection where the line is of no use, or where the last two runs did not halve the bracket
        slow = len(widths) >= 3 and widths[-1] * 2 > widths[-3]
        if slow or not (math.isfinite(flo) and math.isfinite(fhi)) or flo <= fhi or span <= 0:
            k = (lo + hi) // 2
        else:
            c = cum[lo] + span * flo / (flo - fhi)
            k = bisect.bisect_left(cum, c, lo + 1, hi)
        k = min(max(k, lo + 1), hi - 1)
        value = at(k)
        ok = budget.met(value)
        f[k], weight[k] = budget.error(value) - target, 1.0
        if ok:
            hi = k
        else:
            lo = k
        now = 1 if ok else -1
        streak = streak + 1 if now == side else 1
        side = now
        if streak >= 2:  # the same end moved twice: halve the other's pull
            weight[lo if ok else hi] *= 0.5
        widths.append(hi - lo)
    return hi


def _try_rounding(s: Search, sw: Switched, art, recipe: QuantRecipe, ranges: ActivationRanges, dims: ModelDims, dtype: str,
                  scratch: Path) -> Switched:
    """The plain recipe misses the budget: its weights rounded by GPTQ instead (no extra byte),
    on the same ranges and Hessians and with the same smoothing factors, measured on the held-out
    part; kept where it measures better. Returns the switched graph the search goes on with."""
    budget = s.budget
    lever = rounding_lever(recipe)
    if lever is None:
        s.rounding["reason"] = ("not tried: the recipe rounds its weights with GPTQ (in act order) already" if recipe.budget_rounding
                                else "not tried: budget_rounding is off")
        return sw
    other, what = lever
    s.rounding["lever"] = what
    if not ranges.hessians:
        s.rounding["reason"] = "not tried: the calibration pass kept no Hessians"
        log.warning("budget %s: GPTQ rounding not tried (no Hessians in the ranges)", budget.text)
        return sw
    t = time.perf_counter()
    log.info("budget %s: the plain recipe misses it (%s); trying GPTQ rounding of the same weights (%s) first",
             budget.text, budget.show(s.all_quantized), what)
    alt = build_switched(art, other, ranges, dims, dtype, scratch / "rounding", smoothings=sw.smoothings)
    sess = mapped_session(alt.path, s.eval.providers)
    value = s.eval.value(sess, {})
    del sess
    release_memory()
    s.evaluations.append({"moves": 0, "rounding": what, **value.to_json()})
    s.rounding.update(tried=True, measured=value.point, measured_bound=value.bound, seconds=time.perf_counter() - t)
    # compared by the bound the budget is judged by (the point at budget_confidence 0)
    better = (value.bound < s.all_quantized.bound if not budget.metric.higher_is_better
              else value.bound > s.all_quantized.bound)
    if not better:
        s.rounding["reason"] = (f"not used: every GEMM quantized measures {budget.show(value)} with {what} against "
                                f"{budget.show(s.all_quantized)} with the plain rounding")
        log.info("budget %s: %s", budget.text, s.rounding["reason"])
        shutil.rmtree(alt.path.parent, ignore_errors=True)
        return sw
    met = budget.met(value)
    s.rounding.update(used=True, reason=(
        f"used: every GEMM quantized measures {budget.show(value)} with {what} against {budget.show(s.all_quantized)} "
        f"with the plain rounding, at no extra weight byte; "
        + ("the budget holds without keeping any GEMM" if met else "groups are then kept by error reduction per byte")))
    log.info("budget %s: %s", budget.text, s.rounding["reason"])
    s.lever, s.all_quantized = other, value
    shutil.rmtree(sw.path.parent, ignore_errors=True)
    return alt
