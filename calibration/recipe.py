"""Quantization recipes: frozen options with enums, named presets, strict loading.

A recipe says what to quantize and how; the calibration data and the collected ranges are
separate inputs. ``QuantRecipe.from_dict`` rejects unknown keys and wrong types, so a typo in a
recipe file is an error that names the key, never a silently ignored option.
"""

from __future__ import annotations

import types
import typing
from dataclasses import asdict, dataclass, fields
from enum import Enum

from trtforge.calibration.budget_spec import DEFAULT_CONFIDENCE, parse_budget
from trtforge.errors import OptionError, RecipeError
from trtforge.vocab import RECIPE_PRECISIONS, CalibDevice, Granularity, Precision


class CalibMethod(str, Enum):
    MAX = "max"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"


class WeightRounding(str, Enum):
    """How INT8/FP8 weights are rounded onto their grid (INT4's is ``int4_method``)."""

    NEAREST = "nearest"
    GPTQ = "gptq"  # error feedback through the input Hessian, on the INT8 / E4M3 grid


class Int4Method(str, Enum):
    RTN = "rtn"
    AWQ = "awq"
    GPTQ = "gptq"
    AWQ_GPTQ = "awq-gptq"  # AWQ's activation-aware scales, then GPTQ's rounding of the scaled weights


# GEMMs never quantized by default: the LM head (its logits feed sampling directly and it is a
# small share of the compute) and any pooler/classifier head.
DEFAULT_EXCLUDE = ("*lm_head*", "*pooler*", "*classifier*", "*score*")


@dataclass(frozen=True)
class QuantRecipe:
    name: str = "custom"
    precision: Precision = Precision.INT8
    # --- SmoothQuant (INT8 / FP8)
    smoothquant: bool = False
    alpha: float | None = 0.5  # None: automatic, per layer from alpha_grid
    # up to 1.0: on the real Gemma 3 270M most groups chose the old end (0.95); with 0.975 and
    # 1.0, int8-sq goes from +3.76% to +2.13% perplexity (docs/quantization.md, "Alpha")
    alpha_grid: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.975, 1.0)
    smooth_attention_output: bool = True  # fold into v -> o_proj where exact (not with a KV cache)
    smooth_mlp_down: bool = True  # fold into up -> down_proj where exact
    # where no exact fold exists (post-norm BERT, GELU outputs): an explicit per-channel Mul on
    # the GEMM branch; TensorRT fuses it into the QuantizeLinear that follows
    smooth_with_mul: bool = True
    # --- activation calibration
    calib_method: CalibMethod = CalibMethod.MAX
    percentile: float = 99.99
    # non-smoothed activations may use another method (None: calib_method)
    unsmoothed_calib_method: CalibMethod | None = None
    quantize_attention_bmm: bool = False
    # INT8/FP8 weight scales: one per output channel (default), or one per tensor (what
    # TensorRT-LLM's FP8 checkpoints hold; use it when the ONNX and TRT-LLM artifacts must agree)
    weight_granularity: str = "channel"
    # INT8/FP8 weight rounding: to nearest, or GPTQ's error feedback (each input channel's
    # rounding error pushed onto the channels not yet rounded along H^-1, with the scales that
    # rounding to nearest would use); its dampening and act order are the gptq_ fields below
    weight_rounding: WeightRounding = WeightRounding.NEAREST
    # --- INT4 weight-only
    int4_method: Int4Method = Int4Method.AWQ
    block_size: int = 128
    awq_grid: int = 20
    awq_clip: bool = True
    awq_clip_grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
    # GPTQ (int4_method gptq / awq-gptq): dampening added to the Hessian's diagonal, as a fraction
    # of its mean; act order: rows in order of decreasing Hessian diagonal, with each block's
    # scale fixed before the pass ("static groups": TensorRT's block DequantizeLinear has no g_idx);
    # for INT8/FP8 weights (one scale per channel or tensor, fixed before the pass either way) it
    # changes only where rounding errors go, and the accuracy budget's GPTQ lever turns it on
    gptq_damp: float = 0.01
    gptq_act_order: bool = False
    # --- scope
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    # INT4 recipes only: GEMMs (node or weight name patterns, as exclude; exclude wins) stored as
    # INT8 weight-only instead (per-output-channel symmetric INT8 DequantizeLinear on the weight,
    # float activations): the first fallback of an INT4 recipe, half a byte per weight more than
    # INT4 and one less than FP16. The accuracy budget fills it for the groups it takes out of INT4.
    weight_only_int8: tuple[str, ...] = ()
    dtype: str = "auto"  # the unquantized rest: auto (as exported) | fp16 | fp32
    # --- calibration data
    num_samples: int = 128
    seq_len: int = 256
    calib_mode: str = "auto"  # auto: windows for decoders, sentences for encoders
    text_field: str = "text"
    seed: int = 0
    batch_size: int = 8
    keep_tokens: int = 512  # rows per tensor kept for SmoothQuant auto-alpha / AWQ search
    histogram_bins: int = 2048
    # where calibration runs ONNX Runtime (every session of the stage: probe, layer blocks, budget
    # search): auto = CUDA where onnxruntime-gpu sees a GPU, else CPU; cuda where it is missing
    # is an error. The same graph either way, so the same tensors get the same statistics
    # (docs/quantization.md, "GPU calibration"); not part of any cache key.
    calib_device: CalibDevice = CalibDevice.AUTO
    # --- accuracy budget (calibration/budget.py): e.g. "perplexity=1%"; None: quantize every GEMM
    # the recipe selects. With a budget the fewest weight bytes stay unquantized until it holds.
    budget: str | None = None
    # INT4 recipes: whether the budget search may store a group as INT8 weight-only before keeping
    # it in float (false for a target that cannot run INT8 weight-only: trtforge's TensorRT-LLM
    # checkpoint writer, which writes one W4A16_AWQ precision for the whole model)
    budget_int8: bool = True
    # whether the budget search, where the plain recipe misses the budget, first rounds the same
    # weights with GPTQ (int4-awq -> AWQ scales then GPTQ, int4-rtn -> GPTQ, INT8/FP8 ->
    # weight_rounding "gptq"): no extra weight byte, only quantize time; the calibration pass then
    # keeps the GEMM inputs' Hessians. False: the search goes straight to higher precision.
    budget_rounding: bool = True
    # what the budget search switches between precisions: "group" (the GEMMs sharing one input:
    # q/k/v, gate/up, one precision each, as TensorRT-LLM fuses them) or "gemm" (each GEMM alone:
    # a small k_proj or v_proj can stay in float while its q_proj is quantized; TensorRT runs such a
    # graph, TensorRT-LLM's checkpoint converter refuses it, since it fuses q/k/v and gate/up) or
    # "auto" (the default): "group" in a 'trtforge run' with a trtllm target, else "gemm", which
    # keeps fewer bytes in float for the same budget (docs/quantization.md, "Granularity")
    budget_granularity: str = "auto"
    # after the shortest prefix of moves is found: up to this many of its largest moves are tried
    # back in the recipe's precision, one held-out run each, and stay there where the budget still
    # holds (calibration/budget.py, "Return pass"); 0: the prefix as found
    budget_return_tries: int = 8
    # the budget holds when a one-sided confidence bound of its held-out measurement does, at this
    # confidence (Student t over the held-out samples' paired differences; calibration/budget_spec.py
    # says why): 0.95 by default; 0: the point estimate alone (no margin for the few held-out samples)
    budget_confidence: float = DEFAULT_CONFIDENCE
    # decoders (a perplexity budget): which estimate of the perplexity change the budget is judged
    # by (calibration/budget_eval.py): "kl", exp(mean KL(float || quantized)) - 1 over the held-out
    # next-token distributions (the change on text the float model would write: fidelity to the
    # float model, without the label noise of a few windows), or "nll", the held-out text's observed change.
    # Both are measured and recorded; encoders' embedding_cosine has one estimate.
    budget_estimator: str = "kl"

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, Enum):
                d[k] = v.value
            elif isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "recipe") -> QuantRecipe:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise RecipeError(
                f"{source}: unknown key {unknown[0]!r}",
                f"valid keys: {', '.join(sorted(known))}",
            )
        hints = typing.get_type_hints(cls)
        kwargs = {k: _coerce(k, v, hints[k], source) for k, v in data.items()}
        recipe = cls(**kwargs)
        recipe.check(source)
        return recipe

    def replace(self, **changes) -> QuantRecipe:
        """A copy with ``changes`` applied, checked like a recipe file (enums by value)."""
        return QuantRecipe.from_dict({**self.to_dict(), **changes}, source="recipe override")

    def check(self, source: str = "recipe") -> None:
        if self.precision not in RECIPE_PRECISIONS:
            raise RecipeError(f"{source}: precision {self.precision.value!r} is not a quantization precision",
                              f"use one of: {', '.join(p.value for p in RECIPE_PRECISIONS)}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise RecipeError(f"{source}: alpha {self.alpha} is outside [0, 1]", "use 0.5 (INT8 default) or null for automatic")
        # alpha_grid: values above 1 were searched on Gemma 3 270M int8-sq (1.05-1.5 beside the
        # preset's grid) and never chosen: the same 72 factors (docs/benchmarks.md)
        if not self.alpha_grid or any(not 0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise RecipeError(f"{source}: alpha_grid {list(self.alpha_grid)} must hold at least one alpha, each in [0, 1]",
                              "use e.g. [0.5, 0.75, 0.9, 1.0]")
        if not 0 < self.percentile <= 100:
            raise RecipeError(f"{source}: percentile {self.percentile} is outside (0, 100]", "use e.g. 99.99")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise RecipeError(f"{source}: block_size {self.block_size} is not supported", "use 32, 64 or 128")
        if self.dtype not in ("auto", Precision.FP16, Precision.FP32):
            raise RecipeError(f"{source}: dtype {self.dtype!r} is not one of auto, fp16, fp32", "use auto")
        if self.weight_granularity not in (Granularity.CHANNEL, Granularity.TENSOR):
            raise RecipeError(f"{source}: weight_granularity {self.weight_granularity!r} is invalid", "use channel or tensor")
        if self.calib_mode not in ("auto", "windows", "sentences"):
            raise RecipeError(f"{source}: calib_mode {self.calib_mode!r} is invalid", "use auto, windows or sentences")
        for n, lo in (("num_samples", 1), ("seq_len", 2), ("batch_size", 1), ("keep_tokens", 16), ("awq_grid", 1),
                      ("budget_return_tries", 0)):
            if getattr(self, n) < lo:
                raise RecipeError(f"{source}: {n} must be at least {lo}", f"set {n} >= {lo}")
        if not 0.0 < self.gptq_damp <= 1.0:
            raise RecipeError(f"{source}: gptq_damp {self.gptq_damp} is outside (0, 1]", "use 0.01 (1% of the Hessian's mean diagonal)")
        if self.budget is not None:
            try:
                parse_budget(self.budget)
            except OptionError as exc:
                raise RecipeError(f"{source}: {exc.problem}", exc.hint) from None
        if not (self.budget_confidence == 0.0 or 0.5 <= self.budget_confidence < 1.0):
            raise RecipeError(f"{source}: budget_confidence {self.budget_confidence} is neither 0 nor in [0.5, 1)",
                              "use 0.95 (the budget judged by a one-sided 95% bound) or 0 (by the point estimate)")
        if self.budget_granularity not in ("auto", "group", "gemm"):
            raise RecipeError(f"{source}: budget_granularity {self.budget_granularity!r} is not auto, group or gemm",
                              "use auto (the default), group (q/k/v and gate/up switched together) or gemm (each GEMM alone)")
        if self.budget_estimator not in ("kl", "nll"):
            raise RecipeError(f"{source}: budget_estimator {self.budget_estimator!r} is neither kl nor nll",
                              "use kl (the expected perplexity change, the default) or nll (the held-out text's own)")
        if self.weight_only_int8 and self.precision != Precision.INT4:
            raise RecipeError(f"{source}: weight_only_int8 is the INT8 fallback of an INT4 weight-only recipe, and this "
                              f"recipe is {self.precision.value}",
                              "drop weight_only_int8, or keep those GEMMs in float with exclude")
        if self.precision == Precision.INT4 and self.smoothquant:
            raise RecipeError(f"{source}: smoothquant applies to INT8/FP8 activations, not INT4 weight-only", "set smoothquant = false")


def _coerce(key: str, value, hint, source: str):
    """Check a value against a field's type hint (enums by value, tuples from lists)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0], source)
    if isinstance(hint, type) and issubclass(hint, Enum):
        try:
            return hint(value)
        except ValueError:
            raise RecipeError(
                f"{source}: {key} = {value!r} is not valid",
                f"use one of: {', '.join(m.value for m in hint)}",
            ) from None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{source}: {key} must be a list, got {type(value).__name__}", f"write {key} = [...]")
        return tuple(_coerce(key, v, args[0], source) for v in value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{source}: {key} must be a number, got {value!r}", f"write {key} = 0.5")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{source}: {key} must be an integer, got {value!r}", f"write {key} = 128")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{source}: {key} must be true or false, got {value!r}", f"write {key} = true")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"{source}: {key} must be a string, got {value!r}", f'write {key} = "..."')
        return value
    return value


PRESETS: dict[str, QuantRecipe] = {
    # SmoothQuant W8A8: per-channel weights, per-tensor activations. Alpha is chosen per group
    # from alpha_grid by the group's quantized-output error on the calibration rows: on
    # all-MiniLM-L6-v2 the fixed alpha of 0.5 gave a mean embedding cosine of 0.928, automatic
    # alpha 0.998 (bench/quantize.py). "int8-sq-0.5" keeps the paper's fixed 0.5.
    "int8-sq": QuantRecipe(name="int8-sq", precision=Precision.INT8, smoothquant=True, alpha=None,
                           unsmoothed_calib_method=CalibMethod.MSE),
    "int8-sq-0.5": QuantRecipe(name="int8-sq-0.5", precision=Precision.INT8, smoothquant=True, alpha=0.5,
                               unsmoothed_calib_method=CalibMethod.MSE),
    "int8": QuantRecipe(name="int8", precision=Precision.INT8, smoothquant=False, calib_method=CalibMethod.MSE),
    # FP8: per-channel weights, amax/448 activations, no smoothing. Measured on the real Gemma 3
    # 270M (bench/fp8_real.py, 12 held-out windows): per-tensor weights with one scale per fused
    # group (what TensorRT-LLM's FP8 checkpoint holds) +16.7% perplexity against +9.3% per channel;
    # SmoothQuant for FP8 no better than none (docs/quantization.md).
    "fp8": QuantRecipe(name="fp8", precision=Precision.FP8, smoothquant=False, calib_method=CalibMethod.MAX),
    # GPTQ rounding of the 8-bit weights (weight_rounding = "gptq"): the same scales and Q/DQ
    # layout as the preset they extend, the weights' rounding errors fed back through each GEMM
    # input's Hessian. all-MiniLM-L6-v2 (bench/quantize.py protocol): int8-sq 0.9975 -> 0.9981,
    # fp8 0.9975 -> 0.9983 mean embedding cosine; not yet measured on Gemma 3 (docs/quantization.md).
    "int8-sq-gptq": QuantRecipe(name="int8-sq-gptq", precision=Precision.INT8, smoothquant=True, alpha=None,
                                unsmoothed_calib_method=CalibMethod.MSE, weight_rounding=WeightRounding.GPTQ),
    "fp8-gptq": QuantRecipe(name="fp8-gptq", precision=Precision.FP8, smoothquant=False, calib_method=CalibMethod.MAX,
                            weight_rounding=WeightRounding.GPTQ),
    "int4-awq": QuantRecipe(name="int4-awq", precision=Precision.INT4, int4_method=Int4Method.AWQ),
    "int4-rtn": QuantRecipe(name="int4-rtn", precision=Precision.INT4, int4_method=Int4Method.RTN, awq_clip=False),
    # GPTQ: blockwise error feedback through the inverse Hessian of each GEMM's input (X^T X,
    # accumulated while calibrating); AWQ+GPTQ: AWQ's scales and clip ratios, then GPTQ's rounding.
    # Figures on Gemma 3 270M: docs/quantization.md.
    "int4-gptq": QuantRecipe(name="int4-gptq", precision=Precision.INT4, int4_method=Int4Method.GPTQ, awq_clip=False),
    "int4-awq-gptq": QuantRecipe(name="int4-awq-gptq", precision=Precision.INT4, int4_method=Int4Method.AWQ_GPTQ),
}


def get_preset(name: str) -> QuantRecipe:
    if name not in PRESETS:
        raise RecipeError(f"unknown quantization recipe {name!r}", f"use one of: {', '.join(PRESETS)} or a recipe file")
    return PRESETS[name]


