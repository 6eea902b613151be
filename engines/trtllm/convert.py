"""ONNX artifact tensors -> the unified checkpoint's tensors, in numpy.

In:  ``OnnxSource`` (the quantized graph in HF terms), ``HfLayout`` (the parameters a Hugging
     Face model of this config has), the quant_algo and checkpoint dtype of a ``Plan``.
Out: ``Converted``: {tensor name: numpy array} ready to save, one summary row per Linear for the
     manifest, and the re-quantization figures where FP8 weights had to be re-quantized.

Per Linear (HF layout [out, in]):
* W4A16_AWQ: ``weight`` uint8 [out/2, in] packed from the ONNX INT4 integers (the same integers),
  ``weight_scale`` float32 [out, in/group] (the ONNX block scales, transposed), and on layers the
  loader does not fuse (o_proj, down_proj) ``pre_quant_scale`` [in]: the ONNX smoothing Mul's
  factor, or ones where the AWQ scale was folded into the GEMM before (the loader indexes it
  unconditionally there);
* FP8: ``weight`` float8_e4m3fn [out, in] (the ONNX FP8 values when the artifact has per-tensor
  scales; else re-quantized with one scale per fused group), ``weight_scale`` float32 [],
  ``input_scale`` float32 [] (the activation QuantizeLinear's scale);
* FP8_PER_CHANNEL_PER_TOKEN: the ONNX FP8 values and ``weight_scale`` float32 [out];
* unquantized Linears (lm_head): ``weight`` [out, in] in the checkpoint dtype; biases likewise.
Norms and embeddings are the ONNX initializers read by their module's nodes (smoothing already
folded into the norms), cast to the checkpoint dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from trtforge.architectures.base import TRTLLM_FUSED, Checkpoint
from trtforge.engines.trtllm.formats import (
    QUANT_ALGO_FP8,
    QUANT_ALGO_FP8_ROWWISE,
    QUANT_ALGO_W4A16_AWQ,
    Fused,
    fused_group,
    norm_offset,
)
from trtforge.engines.trtllm.onnx_source import LinearSource, OnnxSource
from trtforge.engines.trtllm.pack import FP8, pack_int4, requantize_fp8_per_tensor
from trtforge.errors import InputError
from trtforge.vocab import Precision

NP_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


@dataclass
class HfLayout:
    """The parameters of the Hugging Face model a config describes (from a meta-device model)."""

    architecture: str
    linears: dict[str, tuple[int, int, bool]]  # module -> (in_features, out_features, has_bias)
    params: dict[str, tuple[int, ...]]  # every other parameter -> shape
    embeddings: list[str]  # modules that are nn.Embedding
    tied: bool  # lm_head shares the input embedding
    num_parameters: int


@dataclass
class Converted:
    tensors: dict[str, np.ndarray]
    linears: list[dict]
    requantized: dict | None = None

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.tensors.values()))


def convert(src: OnnxSource, layout: HfLayout, *, quant_algo: str, group_size: int | None, dtype: str,
            fused: Fused = TRTLLM_FUSED, checkpoint: Checkpoint | None = None) -> Converted:
    """``fused``: the groups the loader fuses for this family (its Architecture entry's checkpoint);
    ``checkpoint``: that entry, for the family's tensor conventions (Gemma's norms: formats.norm_offset)."""
    fdt = NP_DTYPES[dtype]
    out = Converted({}, [])
    linear_modules = set(layout.linears)
    for name, shape in layout.params.items():
        module = name.rpartition(".")[0]
        if module in linear_modules:
            continue  # Linear weights and biases come from the GEMMs below
        value = src.param(module, shape)
        offset = norm_offset(name, checkpoint)
        if offset:  # Gemma: the graph's scale is 1 + w; the checkpoint holds w (in FP32 before the cast)
            value = value.astype(np.float32) - np.float32(offset)
        out.tensors[name] = np.ascontiguousarray(value.astype(fdt))
    missing = sorted(set(layout.linears) - set(src.linears))
    if missing:
        raise InputError(f"the ONNX artifact has no GEMM for {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""),
                         "export-checkpoint needs the full model exported by trtforge")
    requant = _fp8_requantized(src, layout, fused) if quant_algo == QUANT_ALGO_FP8 else {}
    for module, (inf, outf, has_bias) in layout.linears.items():
        lin = src.linears[module]
        if (lin.in_features, lin.out_features) != (inf, outf):
            raise InputError(f"{module} is {lin.in_features}x{lin.out_features} in the ONNX artifact but {inf}x{outf} in config.json",
                             "the artifact and its config.json do not belong together; re-run export and quantize")
        row: dict = {"module": module, "in": inf, "out": outf, "quantized": lin.quantized}
        if module == "lm_head" and layout.tied:
            _check_tied(out.tensors, layout, lin, fdt)
            row["tied_to"] = layout.embeddings[0] + ".weight"
        elif not lin.quantized:
            out.tensors[f"{module}.weight"] = np.ascontiguousarray(lin.weight.astype(fdt))
        elif quant_algo == QUANT_ALGO_W4A16_AWQ:
            _int4(out.tensors, module, lin, group_size, fdt, row, fused)
        elif quant_algo in (QUANT_ALGO_FP8, QUANT_ALGO_FP8_ROWWISE):
            _fp8(out.tensors, module, lin, quant_algo, requant.get(module), row)
        else:  # pragma: no cover - plan() refuses everything else
            raise InputError(f"quant_algo {quant_algo} is not written by trtforge", "use fp8 or int4-awq")
        if has_bias:
            if lin.bias is None:
                raise InputError(f"{module} has a bias in config.json but none in the ONNX artifact", "re-run export and quantize")
            out.tensors[f"{module}.bias"] = np.ascontiguousarray(lin.bias.astype(fdt))
        out.linears.append(row)
    if requant:
        errs = [r["rel_err_max"] for r in requant.values()]
        out.requantized = {"layers": len(requant), "max_rel_err": float(max(errs)),
                           "mean_rel_err": float(np.mean(errs)),
                           "what": "FP8 per-channel -> per-tensor; rel_err = max|W_ckpt - W_onnx| / max|W_onnx| per layer"}
    return out


def _check_tied(tensors: dict[str, np.ndarray], layout: HfLayout, lin: LinearSource, fdt) -> None:
    emb = tensors.get(layout.embeddings[0] + ".weight") if layout.embeddings else None
    w = lin.dequantized() if lin.quantized else lin.weight
    if emb is None or emb.shape != w.shape or not np.array_equal(emb, np.asarray(w).astype(fdt)):
        raise InputError("config.json ties lm_head to the input embedding, but the ONNX artifact's lm_head differs from it",
                         "re-export the model; export-checkpoint writes tied models with one shared tensor")


def _int4(tensors: dict, module: str, lin: LinearSource, group: int | None, fdt, row: dict, fused: Fused) -> None:
    if lin.qtype != Precision.INT4 or not group or not lin.block or lin.block % group:
        raise InputError(f"{module} is {lin.qtype} with block {lin.block} in the ONNX artifact, not INT4 with block {group}",
                         "re-run trtforge quantize with an int4 recipe")
    scale = lin.scale
    if lin.block != group:  # a block of 128 is two groups of 64 with one scale: repeat it (exact)
        scale = np.repeat(scale, lin.block // group, axis=1)
        row["regrouped_from_block"] = lin.block
    tensors[f"{module}.weight"] = pack_int4(lin.q)
    tensors[f"{module}.weight_scale"] = np.ascontiguousarray(scale.astype(np.float32))
    if fused_group(module, fused) is None:  # the vanilla loader reads pre_quant_scale unconditionally
        pre = lin.pre_scale if lin.pre_scale is not None else np.ones(lin.in_features, np.float32)
        tensors[f"{module}.pre_quant_scale"] = np.ascontiguousarray(pre.astype(fdt))
        row["pre_quant_scale"] = "smoothing Mul" if lin.pre_scale is not None else "ones (scale folded into the previous op)"
    elif lin.pre_scale is not None:  # plan() refuses this; keep the converter honest on its own
        raise InputError(f"{module} has a smoothing Mul, which TensorRT-LLM ignores on fused layers", "quantize with --set smooth_with_mul=false")
    row.update(weight="uint8 packed int4", group_size=group)


def _fp8(tensors: dict, module: str, lin: LinearSource, quant_algo: str, requant: dict | None, row: dict) -> None:
    if lin.qtype != Precision.FP8:
        raise InputError(f"{module} is {lin.qtype} in the ONNX artifact, not FP8", "re-run trtforge quantize with --recipe fp8")
    if lin.pre_scale is not None:
        raise InputError(f"{module} has a smoothing Mul; TensorRT-LLM's FP8 layers have no pre_quant_scale",
                         "quantize with --set smooth_with_mul=false")
    scale = np.asarray(lin.scale, np.float32)
    if quant_algo == QUANT_ALGO_FP8_ROWWISE:
        tensors[f"{module}.weight"] = np.ascontiguousarray(np.asarray(lin.q, FP8))
        per_row = np.broadcast_to(scale, (lin.out_features,)) if scale.ndim == 0 else scale
        tensors[f"{module}.weight_scale"] = np.ascontiguousarray(per_row.astype(np.float32))
        row.update(weight="float8_e4m3fn", weight_scale="per channel", activations="dynamic per token")
        return
    if lin.act_scale is None or lin.act_qtype != Precision.FP8:
        raise InputError(f"{module} has no FP8 activation QuantizeLinear in the ONNX artifact", "re-run trtforge quantize with --recipe fp8")
    if requant is not None:
        tensors[f"{module}.weight"] = requant["q"]
        tensors[f"{module}.weight_scale"] = np.asarray(requant["scale"], np.float32).reshape(())
        row["requantized_rel_err"] = requant["rel_err_max"]
    else:
        tensors[f"{module}.weight"] = np.ascontiguousarray(np.asarray(lin.q, FP8))
        tensors[f"{module}.weight_scale"] = scale.reshape(())
    tensors[f"{module}.input_scale"] = np.asarray(lin.act_scale, np.float32).reshape(())
    row.update(weight="float8_e4m3fn", weight_scale="per tensor", input_scale=float(lin.act_scale))


def _fp8_requantized(src: OnnxSource, layout: HfLayout, fused: Fused) -> dict[str, dict]:
    """Per-channel FP8 layers re-quantized per tensor, one shared scale per fused group."""
    groups: dict[tuple, list[str]] = {}
    for module in layout.linears:
        lin = src.linears.get(module)
        if lin is None or lin.qtype != Precision.FP8 or np.asarray(lin.scale).ndim == 0:
            continue
        fg = fused_group(module, fused)
        groups.setdefault((fg[0], fg[1]) if fg else (module,), []).append(module)
    out: dict[str, dict] = {}
    for key, members in groups.items():
        if len(key) == 2:
            members = sorted(members, key=lambda m: fused[key[1]].index(m.rpartition(".")[2]))
        ws = [src.linears[m].dequantized() for m in members]
        qs, scale = requantize_fp8_per_tensor(ws)
        for m, w, q in zip(members, ws, qs):
            err = float(np.abs(q.astype(np.float64) * float(scale) - w).max() / max(float(np.abs(w).max()), 1e-30))
            out[m] = {"q": np.ascontiguousarray(q), "scale": scale, "rel_err_max": err}
    return out
