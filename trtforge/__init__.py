"""trtforge: Hugging Face transformer -> ONNX -> quantized ONNX -> TensorRT engine, with parity reports.

The stages are importable on their own (``trtforge.exporter``, ``trtforge.calibration``,
``trtforge.engines``, ``trtforge.parity``); ``trtforge.run(recipe)`` runs them all like
``trtforge run`` and returns the top-level manifest. Importing this package loads none of
torch, transformers, onnxruntime or tensorrt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trtforge._version import __version__
from trtforge.errors import TrtforgeError

if TYPE_CHECKING:  # pragma: no cover
    from trtforge.pipeline import run

__all__ = ["TrtforgeError", "__version__", "run"]


def __getattr__(name: str):
    # Lazy so that `import trtforge` stays light.
    if name == "run":
        from trtforge.pipeline import run

        return run
    raise AttributeError(name)
