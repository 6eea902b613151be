"""Quantize stage: calibration, SmoothQuant/AWQ and Q/DQ insertion (see quantize.py and stage.py).

Quantization methods are registry entries, one module each in calibration/methods/ (the
interface is calibration/methods/base.py).
"""

from __future__ import annotations

from trtforge.calibration.collect import ActivationRanges, collect_ranges
from trtforge.calibration.methods.base import Methods, QuantMethod, Role, Stat, methods_for, needs_rows
from trtforge.calibration.quantize import finish, prepare, quantize_model
from trtforge.calibration.recipe import PRESETS, CalibMethod, Int4Method, Precision, QuantRecipe, get_preset
from trtforge.calibration.stage import quantize
from trtforge.textdata import Samples, build_samples

__all__ = [
    "PRESETS",
    "ActivationRanges",
    "CalibMethod",
    "Int4Method",
    "Methods",
    "Precision",
    "QuantMethod",
    "QuantRecipe",
    "Role",
    "Samples",
    "Stat",
    "build_samples",
    "collect_ranges",
    "finish",
    "get_preset",
    "methods_for",
    "needs_rows",
    "prepare",
    "quantize",
    "quantize_model",
]
