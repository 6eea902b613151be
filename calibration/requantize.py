"""The quantize stage's answer to trtforge.requantize: quantize one GEMM of a float model as a
recorded recipe and saved ranges do (what parity's ``--per-layer`` ranks layers with).

In:  the ``quantization`` section of a quantize artifact, its ``ranges.json``, dims, dtype.
Out: ``quantize_one(float_model, node)`` -> the float model with only ``node`` quantized
     (:func:`~trtforge.calibration.quantize.quantize_model` with ``only={node}``).
"""

from __future__ import annotations

from pathlib import Path

import onnx

from trtforge import requantize
from trtforge.calibration.collect import ActivationRanges
from trtforge.calibration.quantize import quantize_model
from trtforge.calibration.recipe import QuantRecipe
from trtforge.manifest import ModelDims, QuantizationInfo


@requantize.register
def layer_quantizer(quantization: QuantizationInfo, ranges: Path, *, dims: ModelDims | None,
                    dtype: str | None) -> requantize.QuantizeOne:
    recipe = QuantRecipe.from_dict(quantization.recipe, source=str(Path(ranges).parent / "manifest.json"))
    saved = ActivationRanges.load(ranges)

    def quantize_one(float_model: onnx.ModelProto, node: str) -> onnx.ModelProto:
        model, _ = quantize_model(float_model, recipe, saved, dims=dims, only={node}, dtype=dtype)
        return model

    return quantize_one
