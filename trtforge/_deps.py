"""Import optional heavy libraries on demand with an error that names the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from trtforge.errors import MissingDependencyError

# module -> (extra, what it is for)
_EXTRAS: dict[str, tuple[str | None, str]] = {
    "torch": (None, "load and export PyTorch models (pip install torch==2.13.0 for the CPU wheel)"),
    "transformers": (None, "load Hugging Face models and tokenizers"),
    "onnxruntime": (None, "run ONNX models for validation, calibration and parity"),
    "tensorrt": ("gpu", "build and run TensorRT engines"),
    "modelopt": ("modelopt", "write Model Optimizer checkpoints"),
    "yaml": ("yaml", "read YAML recipes"),
    "polygraphy": (None, "run and compare models"),
}


def require(module: str) -> ModuleType:
    """Import ``module`` or raise MissingDependencyError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra, purpose = _EXTRAS.get(top, (None, None))
        # An installed package that fails to import for another reason is a different problem.
        if getattr(exc, "name", None) not in (None, top, module):
            raise MissingDependencyError(f"{top} (its import failed: {exc})", extra, purpose) from exc
        raise MissingDependencyError(top, extra, purpose) from exc


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # any failure to import means "not usable here"
        return False
    return True
