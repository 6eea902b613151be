"""GPTQ's Hessians (X^T X / rows of each GEMM input) without holding them all in memory.

In:  float32 [K, K] arrays, one per GEMM input, as calibration finishes each one.
Out: a read-only mapping name -> array that loads one Hessian when it is asked for (GPTQ uses
     one input's at a time), and ``ranges.hessians.npz`` written one array at a time.

At 7B a model's Hessians are about 22 GB (K^2 x 4 bytes per distinct input, 4 per layer): more
than the weights. Layer-by-layer calibration finishes a layer's Hessians with its block and
puts them here, in a temporary folder on disk (removed when the store is closed or collected),
so memory holds one block's accumulators; ranges loaded from a file read their npz lazily. A
store opened without a folder keeps its arrays in memory (whole-graph calibration of a model
that fits).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from trtforge.calibration.spill import SpillFolder


class Hessians(Mapping):
    """name -> float32 [K, K]; in memory, spilled to a folder of ``.npy`` files, or read from an npz."""

    def __init__(self, arrays: dict[str, np.ndarray] | None = None) -> None:
        self._mem: dict[str, np.ndarray] = dict(arrays or {})
        self._files: dict[str, tuple[Path, str | None]] = {}  # name -> (.npy file | npz, member)
        self._shapes: dict[str, tuple[int, ...]] = {n: tuple(a.shape) for n, a in self._mem.items()}
        self._dir: Path | None = None
        self._folder: SpillFolder | None = None

    @classmethod
    def spilled(cls, prefix: str = "trtforge-hessians-") -> Hessians:
        """A store writing what it is given to a new temporary folder (calibration/spill.py)."""
        h = cls()
        h._folder = SpillFolder(prefix)
        h._dir = h._folder.path
        return h

    @classmethod
    def from_npz(cls, path: Path, index: dict[str, str]) -> Hessians:
        """``index``: npz member -> tensor name (ranges.json's ``hessians_index``); nothing read yet."""
        h = cls()
        with zipfile.ZipFile(path) as z:
            for member, name in index.items():
                with z.open(f"{member}.npy") as f:
                    major, _ = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    shape, _, _ = read(f)  # the header only
                h._files[name] = (path, member)
                h._shapes[name] = tuple(shape)
        return h

    def put(self, name: str, array: np.ndarray) -> None:
        """Add a finished Hessian: to the folder when the store spills (the caller drops its copy)."""
        array = np.asarray(array, np.float32)
        self._shapes[name] = tuple(array.shape)
        if self._dir is None:
            self._mem[name] = array
            return
        path = self._dir / f"h{len(self._files)}.npy"
        np.save(path, array)
        self._files[name] = (path, None)

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._mem:
            return self._mem[name]
        path, member = self._files[name]
        if member is None:
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as z:
            return z[member]

    def __iter__(self) -> Iterator[str]:
        yield from self._mem
        yield from (n for n in self._files if n not in self._mem)

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, name: object) -> bool:
        return name in self._shapes

    def nbytes(self) -> int:
        return sum(int(np.prod(s)) * 4 for s in self._shapes.values())

    @property
    def spills(self) -> bool:
        return self._dir is not None

    def save_npz(self, path: Path) -> dict[str, str]:
        """Write every Hessian into ``path`` (uncompressed npz, one array in memory at a time);
        returns the member -> name index."""
        index = {}
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for i, name in enumerate(self):
                member = f"h{i}"
                with z.open(f"{member}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(self[name], np.float32), allow_pickle=False)
                index[member] = name
        return index

    def close(self) -> None:
        """Remove the spill folder (also done when the store is garbage-collected)."""
        if self._folder is not None:
            self._folder.close()
