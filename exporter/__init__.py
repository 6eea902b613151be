"""Export stage: Hugging Face model folder -> ONNX artifact (see export.py)."""

from __future__ import annotations

from trtforge.exporter.architectures import SUPPORTED, Task
from trtforge.exporter.export import DType, ExportOptions, export_onnx, inspect_source

__all__ = ["SUPPORTED", "DType", "ExportOptions", "Task", "export_onnx", "inspect_source"]
