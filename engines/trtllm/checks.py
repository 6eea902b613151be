"""Everything export-checkpoint refuses, decided from the quantize manifest before any heavy work.

In:  a quantize-stage OnnxArtifact (its manifest only) and CheckpointOptions.
Out: a ``Plan`` (quant_algo, group size, checkpoint dtype, excluded modules, memory estimate,
     notes), or a one-line TrtforgeError saying what the TensorRT-LLM loader cannot read and what
     to do instead: an architecture without a TensorRT-LLM model class, W8A8 SmoothQuant, INT4
     block sizes its kernels lack, mixed quantization inside a layer the loader fuses, FP8
     smoothing that needs a pre_quant_scale FP8 layers do not have, a model too large for memory.
     ``preflight`` raises the ones a run recipe and the model's config decide, before any export.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtforge.architectures.base import Checkpoint
from trtforge.artifacts import OnnxArtifact, read_json
from trtforge.engines.trtllm.formats import (
    QUANT_ALGO_FP8,
    QUANT_ALGO_FP8_ROWWISE,
    QUANT_ALGO_W4A16_AWQ,
    SQ_HINT,
    SQ_REFUSAL,
    W4A16_GROUP_SIZES,
    CkptDType,
    Fp8Scheme,
    Fused,
    checkpoint_of,
    fused_group,
    writable_architectures,
)
from trtforge.engines.trtllm.onnx_source import module_of
from trtforge.env import available_bytes
from trtforge.errors import InputError, OptionError, QuantizationError, TrtforgeError
from trtforge.numerics import block_size_for
from trtforge.vocab import Precision, Task

log = logging.getLogger(__name__)
GiB = float(2**30)
OVERHEAD_BYTES = 1 << 30  # torch + transformers + onnxruntime themselves


class ResourceError(TrtforgeError):
    """The machine has too little free memory (or disk) for the model."""


# The largest perplexity increase over the float model (the checkpoint's fake-quantized model vs
# the float reference on the held-out text, verify.parity) a checkpoint may have before the write
# fails, unless ``max_ppl_change_pct`` raises (or lowers) the bar. The same numbers as the gate of
# trtforge parity for these precisions: parity/options.py, _PRESETS[Preset.FP8 / Preset.INT4]
# ["ppl_change_pct"], reasoned in docs/parity.md. Copied, not imported (engines imports only the
# core); tests/engines/test_trtllm_checkpoint.py checks that the two tables agree.
MAX_PPL_CHANGE_PCT: dict[Precision, float] = {Precision.FP8: 5.0, Precision.INT4: 25.0}


@dataclass(frozen=True)
class CheckpointOptions:
    dtype: CkptDType = CkptDType.AUTO
    fp8_scheme: Fp8Scheme = Fp8Scheme.TENSOR
    max_shard_bytes: int = 5 * 10**9
    parity: bool = True  # run the fake-quantized PyTorch model against the float reference
    reference: Path | None = None  # float HF model folder (default: the source the manifest records)
    text: Path | None = None  # held-out text, one sample per line (default: built-in sentences)
    max_samples: int = 16
    # the perplexity gate (percent; None: MAX_PPL_CHANGE_PCT of the precision)
    max_ppl_change_pct: float | None = None

    def to_json(self) -> dict:
        return {"dtype": self.dtype.value, "fp8_scheme": self.fp8_scheme.value, "max_shard_bytes": self.max_shard_bytes,
                "parity": self.parity, "reference": str(self.reference) if self.reference else None,
                "text": str(self.text) if self.text else None, "max_samples": self.max_samples,
                "max_ppl_change_pct": self.max_ppl_change_pct}

    def ppl_limit(self, precision: Precision) -> tuple[float, str]:
        """The perplexity gate for ``precision`` and where it comes from."""
        if self.max_ppl_change_pct is not None:
            return float(self.max_ppl_change_pct), "max_ppl_change_pct"
        return MAX_PPL_CHANGE_PCT[Precision.parse(precision)], f"the {Precision.parse(precision)} default"


@dataclass
class Plan:
    art: OnnxArtifact
    quant_algo: str
    group_size: int | None
    dtype: str  # "float16" | "bfloat16"
    exclude_modules: list[str]
    memory: dict
    weight_granularity: str  # "tensor" | "channel" (INT8/FP8 weight scales in the ONNX artifact)
    notes: list[str] = field(default_factory=list)
    architecture: str = ""  # the TensorRT-LLM class the checkpoint declares (the family's entry)
    fused: Fused = field(default_factory=dict)  # the groups the loader fuses for this family

    def to_json(self) -> dict:
        return {"quant_algo": self.quant_algo, "group_size": self.group_size, "dtype": self.dtype,
                "exclude_modules": self.exclude_modules, "memory": self.memory, "notes": self.notes,
                "architecture": self.architecture}


def _family(model_type: str | None, architecture: str | None) -> Checkpoint:
    """The family's checkpoint facts; refuses families TensorRT-LLM has no class for or trtforge does not write."""
    ck = checkpoint_of(model_type)
    if ck is None or not ck.writable:
        where = ("TensorRT-LLM can load it, but trtforge does not map its modules" if ck is not None
                 else "TensorRT-LLM's PyTorch backend has no model class for it (tensorrt_llm/_torch/models/_arch_index.py)")
        raise InputError(f"architecture {architecture or model_type} cannot be written as a TensorRT-LLM checkpoint: {where}",
                         f"export-checkpoint supports {', '.join(writable_architectures())}; build a TensorRT engine from "
                         "the ONNX artifact instead ('trtforge build')")
    return ck


def _refuse_for_family(ck: Checkpoint | None, name: str, quant_algo: str, config: Mapping[str, Any] | None) -> None:
    """What this family's loader cannot read (its Architecture entry's ``refuse``), and a Phi-3 whose
    q rows are not hidden_size (its loader slices qkv_proj there)."""
    if ck is None:
        return
    why = ck.refuse.get(quant_algo)
    if why:
        other = "--recipe fp8 (per-tensor FP8)" if quant_algo != QUANT_ALGO_FP8 else "a TensorRT engine ('trtforge build')"
        raise QuantizationError(f"{name} cannot be written as a {quant_algo} TensorRT-LLM checkpoint: {why}",
                                f"use {other} for this family, or build a TensorRT engine from the ONNX artifact")
    cfg = config or {}
    heads, hidden, hd = cfg.get("num_attention_heads"), cfg.get("hidden_size"), cfg.get("head_dim")
    if ck.q_rows_are_hidden and heads and hidden and hd and int(heads) * int(hd) != int(hidden):
        raise InputError(f"{name} has {heads} heads of {hd} ({int(heads) * int(hd)} query rows) but hidden_size {hidden}; "
                         f"TensorRT-LLM's {ck.architecture}.load_weights takes q as the first hidden_size rows of qkv_proj "
                         "and head_dim as hidden_size // heads", "build a TensorRT engine from the ONNX artifact instead")


def _refuse_precision(precision: Precision) -> None:
    if precision == Precision.INT8:
        raise QuantizationError(SQ_REFUSAL, SQ_HINT)
    if precision not in (Precision.FP8, Precision.INT4):
        raise InputError(f"precision {precision} cannot be written as a TensorRT-LLM checkpoint",
                         "quantize with --recipe fp8 or --recipe int4-awq")


def common_group_size(blocks: set[int]) -> int | None:
    """The one W4A16 group size that holds every GEMM's INT4 blocks exactly, or None.

    quantize falls back to a smaller block where the recipe's does not divide K (SmolLM's
    K=576 takes 64 while K=1536 keeps 128). A block of 128 is two groups of 64 with the same
    scale, so the smallest block, when it is 64 or 128 and divides the others, is written for
    every GEMM with each larger block's scale repeated: the same weights, bit for bit."""
    if not blocks:
        return None
    group = min(blocks)
    return group if group in W4A16_GROUP_SIZES and all(b % group == 0 for b in blocks) else None


def _block_refusal(what: str) -> QuantizationError:
    return QuantizationError(
        f"TensorRT-LLM's W4A16 kernels take one group size of 64 or 128 for the whole model, but {what}",
        "quantize with --set block_size=64 or 128 that divides every GEMM's input size (hidden and intermediate "
        "sizes must be multiples of it)")


def preflight(*, precision: Precision, model_type: str, architecture: str = "", task: Task | None = None,
              recipe: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None,
              options: CheckpointOptions = CheckpointOptions()) -> None:
    """The refusals of :func:`plan` that the recipe and the model's config decide, before anything
    is exported (``trtforge run`` with the ``trtllm`` target): the family, the task, W8A8
    SmoothQuant, the INT4 group size (one of 64/128 dividing every GEMM's input size), a quantized
    lm_head, and the parity inputs."""
    _family(model_type, architecture)
    if task is not None and not task.is_decoder:
        raise InputError(f"task {task} is not text generation, which a TensorRT-LLM checkpoint needs",
                         "export with --task causal-lm-with-past (the default for decoders)")
    _refuse_precision(precision)
    ck = checkpoint_of(model_type)
    _refuse_for_family(ck, architecture or model_type,
                       QUANT_ALGO_W4A16_AWQ if precision == Precision.INT4 else
                       QUANT_ALGO_FP8 if options.fp8_scheme == Fp8Scheme.TENSOR else QUANT_ALGO_FP8_ROWWISE, config)
    recipe = recipe or {}
    if recipe.get("budget") and recipe.get("budget_granularity", "auto") == "gemm":
        raise QuantizationError("the recipe's budget switches each GEMM alone (budget_granularity = gemm), so it may keep "
                                "a k_proj or v_proj in float beside a quantized q_proj, and TensorRT-LLM fuses q/k/v and "
                                "gate/up into one layer of one precision",
                                "quantize for this target with budget_granularity = group or auto (the default: "
                                "group where a target is trtllm), or build a "
                                "TensorRT engine from the artifact ('trtforge build')")
    if precision == Precision.INT4:
        if recipe.get("weight_only_int8") or (recipe.get("budget") and recipe.get("budget_int8", True)):
            raise QuantizationError(INT8_FALLBACK_REFUSAL.format(what="the recipe's INT4 quantization may store GEMMs as "
                                                                 "INT8 weight-only (weight_only_int8, or a budget's "
                                                                 "first fallback)"), INT8_FALLBACK_HINT)
        block = recipe.get("block_size", 128)
        if block not in W4A16_GROUP_SIZES:
            raise _block_refusal(f"the recipe's block_size is {block}")
        cfg = config or {}
        heads, head_dim = cfg.get("num_attention_heads"), cfg.get("head_dim")
        ks = {"hidden_size": cfg.get("hidden_size"), "intermediate_size": cfg.get("intermediate_size"),
              "num_attention_heads * head_dim": heads * head_dim if heads and head_dim else None}
        # the blocks quantize will use (its fallback where block_size does not divide K): one
        # group size must hold them all (common_group_size), else the kernels cannot run it
        used = {name: block_size_for(k, block) for name, k in ks.items() if isinstance(k, int)}
        if common_group_size({b for b in used.values() if b}) is None or None in used.values():
            name, b = min(((n, b) for n, b in used.items()), key=lambda nb: nb[1] or 0)
            raise _block_refusal(f"block_size {block} does not divide the model's {name} ({ks[name]}), "
                                 f"where quantize would use block size {b}")
    exclude = list(recipe.get("exclude", ["*lm_head*"]))
    if not any(fnmatch.fnmatch(name, pat) for pat in exclude for name in ("lm_head", "/lm_head/MatMul", "lm_head.weight")):
        raise InputError("the recipe quantizes lm_head; the checkpoint keeps it in float, as Model Optimizer does",
                         "quantize with the default exclude list (it excludes *lm_head*)")
    check_parity_inputs(options)


# TensorRT-LLM's loader does read per-layer precisions (quant_algo MIXED_PRECISION, with
# ``quantized_layers`` {module: {quant_algo: W8A16 | W4A16_AWQ, group_size}} in hf_quant_config.json
# or quant_cfg.json: model_config.py _build_modelopt_quant_config; fused q/k/v and gate/up take the
# q_proj / gate_proj entry: modeling_utils.py apply_layerwise_quant_config; W8A16 is
# WeightOnlyQuantLinearMethod: int8 weight [out, in], per-channel weight_scale [out]), but trtforge
# writes one quant_algo per checkpoint.
INT8_FALLBACK_REFUSAL = ("{what}, and trtforge writes a TensorRT-LLM checkpoint with one quant_algo (W4A16_AWQ) for "
                         "every layer: TensorRT-LLM reads per-layer W8A16 only from a MIXED_PRECISION checkpoint, "
                         "which trtforge does not write yet")
INT8_FALLBACK_HINT = ("quantize for this target with budget_int8 = false (--set budget_int8=false; the budget then falls back to float only) "
                      "and without weight_only_int8, or build a TensorRT engine from this artifact ('trtforge build')")


def check_parity_inputs(options: CheckpointOptions) -> None:
    limit = options.max_ppl_change_pct
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit >= 0):
        raise OptionError(f"max_ppl_change_pct {limit!r} is not a percentage of at least 0",
                          "e.g. 5 (a checkpoint whose perplexity rises more than 5% over the float model is refused)",
                          fields=("max_ppl_change_pct",))
    if options.text is not None and not Path(options.text).is_file():
        raise InputError(f"held-out text {options.text} does not exist", "pass a UTF-8 text file, one sample per line")
    if options.parity and options.reference is not None:
        ref = Path(options.reference).expanduser().resolve()
        if not (ref / "config.json").is_file() or not list(ref.glob("*.safetensors")):
            raise InputError(f"reference {ref} is not a Hugging Face model folder with safetensors weights",
                             "pass the float model folder the export was made from (pickle weights are never loaded)")


def plan(art: OnnxArtifact, options: CheckpointOptions, *, available: int | None = None) -> Plan:
    m = art.manifest
    q = m.quantization
    if m.stage != "quantize" or q is None:
        raise InputError(f"{art.path} is a {m.stage} artifact, not a quantized one",
                         "run 'trtforge quantize --recipe fp8' or '--recipe int4-awq' on the export first")
    src = m.source
    ck = _family(src.model_type, src.architecture)
    fused = ck.fused
    if not src.task.is_decoder:
        raise InputError(f"{art.path} was exported for {src.task}, not text generation",
                         "export with --task causal-lm-with-past (the default for decoders)")
    precision = q.precision
    recipe = q.recipe or {}
    if precision == Precision.INT8:
        raise QuantizationError(SQ_REFUSAL, SQ_HINT)
    nodes = q.nodes
    if not any(n.get("status") == "quantized" for n in nodes):
        raise InputError(f"{art.path} quantizes no GEMM (every one is excluded)", "quantize with a smaller exclude list")
    by_module = {module_of(n["node"]): n for n in nodes}
    fallback = [module_of(n["node"]) for n in nodes if n.get("status") == "fallback"]
    if fallback:
        raise QuantizationError(INT8_FALLBACK_REFUSAL.format(
            what=f"the ONNX artifact stores {len(fallback)} GEMMs as INT8 weight-only ({fallback[0]}"
                 + (", ..." if len(fallback) > 1 else "") + ")"), INT8_FALLBACK_HINT)
    notes: list[str] = []
    _check_fused(by_module, fused, budgeted=bool(recipe.get("budget")))
    if by_module.get("lm_head", {}).get("status") == "quantized":
        raise InputError("the ONNX artifact quantizes lm_head; the checkpoint keeps it in float, as Model Optimizer does",
                         "quantize with the default exclude list (it excludes *lm_head*)")
    smoothing = q.extra.get("smoothing") or []
    granularity = str(recipe.get("weight_granularity", "channel"))
    group_size = None
    if precision == Precision.FP8:
        quant_algo = QUANT_ALGO_FP8 if options.fp8_scheme == Fp8Scheme.TENSOR else QUANT_ALGO_FP8_ROWWISE
        muls = [g for sm in smoothing if sm.get("fold") == "mul" for g in sm["gemms"]
                if by_module.get(module_of(g), {}).get("status") == "quantized"]
        if muls:
            raise QuantizationError(
                f"the ONNX artifact smooths the input of {module_of(muls[0])} with an explicit Mul, and TensorRT-LLM's FP8 "
                "layers have no pre_quant_scale to carry it (FP8QDQLinearMethod in linear.py)",
                "quantize with --set smooth_with_mul=false (the folds into norms and GEMMs stay), or without smoothquant")
        if quant_algo == QUANT_ALGO_FP8 and granularity != "tensor":
            notes.append("the ONNX artifact has per-channel FP8 weight scales; the checkpoint's FP8 per-tensor weights are "
                         "re-quantized from them (a second rounding step). Quantize with --set weight_granularity=tensor "
                         "and the two artifacts hold identical FP8 weights (TensorRT-LLM's loader still re-scales fused "
                         "q/k/v and gate/up shards to their largest scale, see docs/trtllm.md), or write --fp8-scheme "
                         "rowwise (Hopper), which stores the per-channel FP8 weights unchanged (docs/trtllm.md measures "
                         "both schemes)")
        if quant_algo == QUANT_ALGO_FP8_ROWWISE:
            notes.append("FP8_PER_CHANNEL_PER_TOKEN quantizes activations per token at run time; the ONNX artifact's static "
                         "per-tensor activation scales are not used (TensorRT-LLM documents this recipe for Hopper)")
        if recipe.get("quantize_attention_bmm"):
            notes.append("the ONNX artifact's FP8 Q/DQ on the attention BMMs has no counterpart in the checkpoint "
                         "(TensorRT-LLM's FP8 KV cache is a different scheme); attention runs in the checkpoint dtype")
    elif precision == Precision.INT4:
        quant_algo = QUANT_ALGO_W4A16_AWQ
        quantized = [n for n in nodes if n.get("status") == "quantized"]
        blocks = {int(n["block_size"]) for n in quantized if n.get("block_size")}
        group_size = common_group_size(blocks)
        if group_size is None:
            odd = [n for n in quantized if n.get("block_size") not in W4A16_GROUP_SIZES]
            raise _block_refusal(f"{module_of(odd[0]['node'])} (K={odd[0]['k']}) uses block size {odd[0].get('block_size')}"
                                 if odd else f"the GEMMs use block sizes {sorted(blocks)}, which no one group size holds")
        if len(blocks) > 1:
            larger = sorted({module_of(n["node"]).rpartition(".")[2] for n in quantized if n.get("block_size") != group_size})
            note = (f"the ONNX artifact uses INT4 block sizes {sorted(blocks)} (quantize fell back to {group_size} where "
                    f"{max(blocks)} does not divide K); written with group_size {group_size} for every layer, the scales "
                    f"of the larger blocks ({', '.join(larger)}) repeated: the same weights, exactly")
            notes.append(note)
            log.info("export-checkpoint: %s", note)
        for sm in smoothing:
            if sm.get("fold") == "mul" and any(fused_group(module_of(g), fused) for g in sm["gemms"]):
                raise QuantizationError(
                    f"the ONNX artifact smooths the input of {module_of(sm['gemms'][0])} with an explicit Mul; TensorRT-LLM "
                    "ignores pre_quant_scale on the q/k/v and gate/up layers it fuses",
                    "quantize with --set smooth_with_mul=false")
        method = recipe.get("int4_method")
        if method == "rtn":
            notes.append("INT4 round-to-nearest (no AWQ scales): written as W4A16_AWQ with pre_quant_scale of ones")
        elif method in ("gptq", "awq-gptq"):
            notes.append(f"INT4 {method} (symmetric, no zero point; act order, if used, with static groups, so no g_idx): "
                         "written as W4A16_AWQ, whose kernel computes exactly this block dequantization. TensorRT-LLM's "
                         "W4A16_GPTQ path reads the AutoGPTQ layout with zero points (has_zero_point) and refuses desc_act")
    else:
        raise InputError(f"{art.path} has precision {str(precision)!r}", "quantize with --recipe fp8 or --recipe int4-awq")
    _refuse_for_family(ck, src.architecture or src.model_type, quant_algo, _read_config(art.path))
    exclude = sorted({module_of(n["node"]) for n in nodes if n.get("status") != "quantized"})
    exclude.append("model.embed_tokens")
    dtype = _resolve_dtype(art, options.dtype, ck.auto_dtype)
    memory = estimate_memory(art, parity=options.parity, available=available)
    return Plan(art, quant_algo, group_size, dtype, exclude, memory, granularity, notes, ck.architecture, fused)


def _check_fused(by_module: dict[str, dict], fused: Fused, *, budgeted: bool = False) -> None:
    """q/k/v and gate/up are one GEMM in TensorRT-LLM: all quantized or none. ``budgeted``: the
    artifact's recipe had a budget (its search chose the split; the hint says how to avoid it)."""
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for mod, n in by_module.items():
        fg = fused_group(mod, fused)
        if fg:
            groups.setdefault((fg[0], fg[1]), {})[fg[2]] = n.get("status", "")
    for (parent, kind), members in groups.items():
        if len(set(members.values())) > 1:
            q = [m for m in fused[kind] if members.get(m) == "quantized"]
            e = [m for m in fused[kind] if members.get(m) != "quantized"]
            raise QuantizationError(
                f"{parent}: {', '.join(q)} quantized but {', '.join(e)} not; TensorRT-LLM fuses "
                f"{'/'.join(fused[kind])} into one layer with one quantization",
                "quantize with --set budget_granularity=group (the budget then switches them together), or build "
                "a TensorRT engine from the artifact ('trtforge build')" if budgeted
                else "exclude all of them or none when quantizing")


def _resolve_dtype(art: OnnxArtifact, want: CkptDType, family_default: str = "float16") -> str:
    """The asked dtype, else the source model's float16/bfloat16, else the family's (Gemma: bfloat16)."""
    if want != CkptDType.AUTO:
        return want.value
    cfg = _read_config(art.path)
    src = str(cfg.get("dtype") or cfg.get("torch_dtype") or "")
    return src if src in ("float16", "bfloat16") else family_default


def _read_config(folder: Path) -> dict:
    p = folder / "config.json"
    if not p.exists():
        raise InputError(f"{folder} has no config.json", "re-run trtforge export and quantize (they copy it)")
    return read_json(p, "config")


def estimate_memory(art: OnnxArtifact, *, parity: bool, available: int | None = None) -> dict:
    """Peak bytes from the artifact's file sizes and parameter count; refuses when over what is free.

    Conversion holds the ONNX graph and its arrays (INT4 unpacked to one byte per value: up to
    2x), then those arrays and the checkpoint's: about 3x the ONNX weight files. Verification
    reads one layer at a time; parity then holds a float32 PyTorch model (4 bytes per parameter)
    and an ONNX Runtime session of the artifact (1x).
    """
    onnx_bytes = sum(p.stat().st_size for p in art.path.glob("model.onnx*") if p.is_file())
    q = art.manifest.quantization
    dims = art.manifest.dims
    params = sum(int(n["k"]) * int(n["n"]) for n in (q.nodes if q is not None else []))
    if dims is not None:
        params += int(dims.vocab_size) * int(dims.hidden_size)
    base = 3 * onnx_bytes + OVERHEAD_BYTES
    need = max(base, (4 * params + onnx_bytes + OVERHEAD_BYTES) if parity else 0)
    free = available if available is not None else available_bytes()
    out = {"onnx_bytes": onnx_bytes, "parameters": params, "needed_bytes": need,
           "needed_without_parity_bytes": base, "available_bytes": free}
    if free is not None and need > free:
        hint = f"run it where {human(need)} is free"
        if parity:
            hint += f", or pass --no-parity to skip the PyTorch comparison (then about {human(base)})"
        raise ResourceError(
            f"writing and verifying this checkpoint needs about {human(need)} of memory but only {human(free)} is available "
            f"({human(onnx_bytes)} of ONNX weights, {params / 1e9:.2f}B parameters"
            + (f"; parity holds a float32 copy, {human(4 * params)})" if parity else ")"),
            hint)
    if free is None:
        log.warning("cannot tell how much memory is free (no psutil, no /proc/meminfo); about %s is needed", human(need))
    return out


def human(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"


def shard_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise InputError(f"shard size {text!r} is not a size", "write e.g. 5GB, 500MB or 2GiB")
    return int(value * units[unit])


def free_disk(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize
