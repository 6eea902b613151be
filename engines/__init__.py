"""Build stage: ONNX artifact -> TensorRT engine for a GPU target, an ONNX Runtime artifact for
the CPU, or a TensorRT-LLM checkpoint, each written by its Backend (trtforge.backend).

See build.py (the stage), backends/ (one module per backend), targets.py (what each GPU runs),
cpu.py (the CPU target), trtllm/ (the checkpoint) and docs/engines.md. Only the private ``_trt``
module imports TensorRT.
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
