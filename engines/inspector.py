"""The engine inspector's per-layer JSON, summarized: how many layers run in each precision.

In:  the dict TensorRT's ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``
     returns (saved as ``layers.json`` next to the engine).
Out: a summary ``{"layers": N, "by_precision": {"FP8": a, "INT8": b, "INT4": c, "FP16": d, ...}}``,
     the proof that a quantized engine chose quantized kernels.

Formats handled (see docs/engines.md for sources):
* TensorRT 10 with ProfilingVerbosity.DETAILED: ``{"Layers": [{"Name", "LayerType", "Inputs":
  [{"Name", "Dimensions", "Format/Datatype"}], "Outputs": [...], "TacticName" | "TacticValue",
  "Weights": {"Type", "Count"}...}], "Bindings": [...]}``; ``Format/Datatype`` values such as
  ``"Row major linear FP16 format"``, ``"Half"``, ``"Int8"``, ``"FP8"``.
* TensorRT 11: ``Bindings`` replaced by ``"I/O Tensors"`` and the ``Format/Datatype`` field
  split in two; the per-layer key names were not retrievable here, so any of ``DataType``,
  ``Datatype``, ``Type`` (with ``Format`` separate) is read.
* Without DETAILED verbosity, ``Layers`` is a list of names only: counted as ``unknown``.

A layer's precision is the lowest-precision data type among its inputs and weights (a GEMM with
INT8 inputs and an FP16 output ran an INT8 kernel; a W4A16 GEMM has FP16 inputs and INT4
weights), falling back to its tactic name.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from trtforge.vocab import Precision

FP8, INT4, INT8, BF16, FP16, FP32, OTHER, UNKNOWN = "FP8", "INT4", "INT8", "BF16", "FP16", "FP32", "other", "unknown"
QUANTIZED = (FP8, INT8, INT4)
# lowest precision first: the first one found among a layer's tensors names the layer
_ORDER = (INT4, FP8, INT8, BF16, FP16, FP32, OTHER)
# the words of TensorRT's inspector type names, checked in this order ("float" last: fp8/float8 first)
_WORDS = ((FP8, ("fp8", "float8", "e4m3")), (INT4, ("int4",)), (INT8, ("int8",)), (BF16, ("bfloat16", "bf16")),
          (FP16, ("half", "fp16", "float16")), (FP32, ("fp32", "float", "tf32")),
          (OTHER, ("int32", "int64", "bool", "uint8")))
_TYPE_KEYS = ("Format/Datatype", "Format/DataType", "DataType", "Datatype", "Type", "Format")


def classify_dtype(text: str | None) -> str | None:
    """``"Row major linear FP16 format"`` -> "FP16"; ``"Int8"`` -> "INT8"; unknown text -> None."""
    if not text:
        return None
    t = str(text).lower().replace("_", "").replace(" ", "")
    for kind, words in _WORDS:
        if any(w in t for w in words):
            return kind
    return None


def _tensor_type(tensor: Any) -> str | None:
    if isinstance(tensor, dict):
        for k in _TYPE_KEYS:
            if k in tensor:
                c = classify_dtype(tensor[k])
                if c is not None:
                    return c
    return None


def _tactic_type(layer: dict) -> str | None:
    name = str(layer.get("TacticName") or "").lower()
    if not name:
        return None
    for needle, kind in (("e4m3", FP8), ("fp8", FP8), ("int4", INT4), ("i4", INT4), ("int8", INT8), ("i8", INT8),
                         ("bf16", BF16), ("f16", FP16), ("h16", FP16), ("fp16", FP16), ("tf32", FP32), ("f32", FP32)):
        if needle in name:
            return kind
    return None


def layer_precision(layer: Any) -> str:
    if not isinstance(layer, dict):
        return UNKNOWN
    found = {_tensor_type(t) for t in layer.get("Inputs") or []}
    for wkey in ("Weights", "Bias"):
        if isinstance(layer.get(wkey), dict):
            found.add(_tensor_type(layer[wkey]))
    found.discard(None)
    for p in _ORDER:
        if p in found:
            return p
    outs = {_tensor_type(t) for t in layer.get("Outputs") or []} - {None}
    return _tactic_type(layer) or next((p for p in _ORDER if p in outs), UNKNOWN)


def summarize(info: dict) -> dict:
    """Counts of layers per precision, and which format the JSON was in."""
    layers = info.get("Layers") or []
    detailed = any(isinstance(x, dict) for x in layers)
    counts = Counter(layer_precision(x) for x in layers)
    by_precision = {p: counts.get(p, 0) for p in (FP8, INT8, INT4, FP16, BF16, FP32)}
    for extra in (OTHER, UNKNOWN):
        if counts.get(extra):
            by_precision[extra] = counts[extra]
    io_key = "I/O Tensors" if "I/O Tensors" in info else "Bindings" if "Bindings" in info else None
    quantized = [x.get("Name") for x in layers if isinstance(x, dict) and layer_precision(x) in QUANTIZED]
    return {
        "layers": len(layers),
        "detailed": detailed,
        "format": {"I/O Tensors": "tensorrt-11", "Bindings": "tensorrt-10"}.get(io_key or "", "unknown"),
        "by_precision": by_precision,
        "quantized_layers": len(quantized),
        "quantized_layer_names": quantized[:50],
    }


# the inspector's layer types that show a precision's quantized kernels ran
_LAYER_TYPES = {Precision.INT8: (INT8,), Precision.FP8: (FP8,), Precision.INT4: (INT4,), Precision.FP4: ()}


def quantized_kernel_warning(summary: dict, precision: str) -> str | None:
    """A warning when a quantized artifact's engine shows no layer in that precision."""
    want = _LAYER_TYPES.get(Precision.lookup(precision))
    if not want or not summary.get("detailed"):
        return None
    if sum(summary["by_precision"].get(p, 0) for p in want) == 0:
        return (f"no engine layer runs in {'/'.join(want)} although the artifact is {precision}: TensorRT did not pick "
                "quantized kernels; check Q/DQ placement (layers.json shows each layer's types)")
    return None
