"""Re-quantizing a float model one layer at a time: parity's ``--per-layer`` asks, the quantize
stage answers, and neither imports the other.

In:  the quantize stage's record of a candidate (:class:`~trtforge.manifest.QuantizationInfo`:
     recipe, per-GEMM nodes), the path of its saved activation ranges, the model's dims and
     the float type of the unquantized rest.
Out: ``quantize_one(float_model, node) -> ModelProto``: the float model with only ``node``
     quantized, exactly as the candidate's recipe and ranges quantize it (smoothing of that
     node's group included).

The quantize stage registers its implementation with :func:`register` in the module named by
:data:`PROVIDER`; :func:`layer_quantizer` imports that module by name on first use, the way the
registries (trtforge.registry) load their built-in entries. One function, not a registry of
:class:`QuantMethod` entries: quantizing "just this node" is the stage's whole composition of
methods (ranges, SmoothQuant/AWQ folds, Q/DQ insertion), not one method's plan.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from trtforge.errors import ParityError
from trtforge.manifest import ModelDims, QuantizationInfo

PROVIDER = "trtforge.calibration.requantize"

QuantizeOne = Callable[[Any, str], Any]  # (onnx.ModelProto, node name) -> onnx.ModelProto


class LayerQuantizerFactory(Protocol):
    def __call__(self, quantization: QuantizationInfo, ranges: Path, *, dims: ModelDims | None,
                 dtype: str | None) -> QuantizeOne: ...


_factory: LayerQuantizerFactory | None = None


def register(factory: LayerQuantizerFactory) -> LayerQuantizerFactory:
    """Called by the quantize stage (at import of :data:`PROVIDER`); usable as a decorator."""
    global _factory
    _factory = factory
    return factory


def layer_quantizer(quantization: QuantizationInfo, ranges: Path, *, dims: ModelDims | None,
                    dtype: str | None) -> QuantizeOne:
    """``quantize_one(float_model, node)`` for this quantization record (module docstring)."""
    if _factory is None:
        try:
            importlib.import_module(PROVIDER)
        except ImportError as exc:
            raise ParityError(f"re-quantizing one layer needs {PROVIDER}, which cannot be imported ({exc})",
                              "install trtforge completely, or run parity without --per-layer") from None
    if _factory is None:
        raise ParityError(f"{PROVIDER} registered no layer quantizer", "update trtforge, or run parity without --per-layer")
    return _factory(quantization, ranges, dims=dims, dtype=dtype)
