"""Export stage: Hugging Face model folder -> ONNX artifact (see export.py).

Which model families it exports, and how, comes from the architecture registry
(``trtforge.registry.ARCHITECTURES``, one module per family in trtforge/architectures/).
"""

from __future__ import annotations

from trtforge.exporter.export import DType, ExportOptions, export_onnx, inspect_source
from trtforge.vocab import Task

__all__ = ["DType", "ExportOptions", "Task", "export_onnx", "inspect_source"]
