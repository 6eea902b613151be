"""trtforge: Hugging Face transformer -> ONNX -> quantized ONNX -> TensorRT engine, with parity reports.

The stages are importable on their own (``trtforge.exporter``, ``trtforge.calibration``,
``trtforge.engines``, ``trtforge.parity``); importing this package loads none of torch,
transformers, onnxruntime or tensorrt.
"""

from __future__ import annotations

from trtforge._version import __version__
from trtforge.errors import TrtforgeError

__all__ = ["TrtforgeError", "__version__", "run"]


def __getattr__(name: str):
    # Lazy so that `import trtforge` stays light.
    if name == "run":
        from trtforge.pipeline import run

        return run
    raise AttributeError(name)
