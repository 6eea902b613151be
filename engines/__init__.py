"""Build stage: ONNX artifact -> TensorRT engine for a GPU target, or an ONNX Runtime artifact for the CPU.

See build.py (the stage), targets.py (what each GPU runs), cpu.py (the CPU target) and
docs/engines.md. Only the private ``_trt`` module imports TensorRT.
"""

from __future__ import annotations

from trtforge.engines.build import build, prepare
from trtforge.engines.plan import BuildOptions, BuildPlan, HardwareCompatibility, Layout
from trtforge.engines.profiles import DimOverride, DimRange, ShapeProfile, derive_profile
from trtforge.engines.targets import TARGETS, Target, check_supported, resolve_target

__all__ = [
    "TARGETS",
    "BuildOptions",
    "BuildPlan",
    "DimOverride",
    "DimRange",
    "HardwareCompatibility",
    "Layout",
    "ShapeProfile",
    "Target",
    "build",
    "check_supported",
    "derive_profile",
    "prepare",
    "resolve_target",
]
