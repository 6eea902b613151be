"""Model families trtforge supports, one module each; see :class:`Architecture` in base.py.

``ARCHITECTURES.get(model_type)`` (trtforge.registry) is the only way stages look a family up.
"""

from __future__ import annotations

from trtforge.architectures.base import Architecture, CacheLayout, Checkpoint, NormKind
from trtforge.registry import ARCHITECTURES

__all__ = ["ARCHITECTURES", "Architecture", "CacheLayout", "Checkpoint", "NormKind"]
