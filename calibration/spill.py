"""What layer-by-layer calibration keeps for later, on disk instead of in memory.

A model's kept calibration rows (SmoothQuant's and AWQ's searches: up to ``keep_tokens`` rows of
every GEMM input, 512 x K float16 each) and GPTQ's Hessians (K^2 float32 each) grow with its depth;
layer by layer, each block's are written to a temporary folder when the block is done and read
back one tensor at a time when a search asks for them, so calibration memory does not grow with
the number of layers. The folder is removed when nothing refers to it any more.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np


class SpillFolder:
    """A temporary folder, removed when this object is collected (or :meth:`close` is called)."""

    def __init__(self, prefix: str = "trtforge-spill-") -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.path), True)
        self._n = 0

    def new_file(self, stem: str = "a") -> Path:
        self._n += 1
        return self.path / f"{stem}{self._n}.npy"

    def close(self) -> None:
        self._cleanup()


class RowsOnDisk:
    """An array saved in a :class:`SpillFolder`, read back whenever it is used as an array
    (``np.asarray``, ``astype``, slicing); holds the folder alive."""

    def __init__(self, folder: SpillFolder, array: np.ndarray) -> None:
        self.folder = folder
        self.path = folder.new_file("rows")
        np.save(self.path, np.ascontiguousarray(array), allow_pickle=False)
        self.shape, self.dtype = tuple(array.shape), array.dtype

    def load(self) -> np.ndarray:
        return np.load(self.path, allow_pickle=False)

    def __array__(self, dtype=None, copy=None):
        a = self.load()
        return a if dtype is None else a.astype(dtype)

    def astype(self, dtype, **kw) -> np.ndarray:
        return self.load().astype(dtype, **kw)

    def __getitem__(self, key):
        return self.load()[key]

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize
