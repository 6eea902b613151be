"""Build stage: ONNX artifact -> TensorRT engine for a GPU target, or an ONNX Runtime artifact for the CPU."""

from __future__ import annotations
