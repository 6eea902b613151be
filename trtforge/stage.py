"""The skeleton every stage shares: check the output, write into a temporary folder, record
timings and file hashes, write the manifest, rename into place.

    out = StageOutput(out_dir, stage="quantize", kind="onnx", force=force, inputs=[art.path])
    ...                                   # every check that needs no work, then the work
    with out.open() as tmp:               # tmp: a temporary sibling of out_dir
        with out.timed("quantize_s"):
            ...write files into tmp...
        out.manifest.quantization = ...   # typed sections
    # here out_dir exists, complete, with manifest.json (timings and file table filled in)

:class:`StageOutput` checks the output location when it is created, before any work: that it
is not a file, not the stage's own input or inside it, that it does not exist (unless
``force``), that its parent can be written and that its temporary sibling's name fits the
file system; with ``force``, that it does not hold one of the inputs (replacing it would
delete them) nor files trtforge did not write. On any exception in ``open()`` (Ctrl-C included) the temporary folder is removed
and the output is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from trtforge.artifacts import atomic_output_dir, check_output_dir, file_table
from trtforge.errors import InputError
from trtforge.manifest import MANIFEST, Manifest

Input = str | os.PathLike[str] | tuple[str, str | os.PathLike[str]]


class StageOutput:
    def __init__(self, out: str | os.PathLike[str], *, stage: str, kind: str, force: bool = False,
                 inputs: Iterable[Input] = (), what: str = "output folder") -> None:
        # the inputs first: "-o INPUT" must not be answered with "pass --force" (which would then be refused)
        check_not_an_input(Path(out), inputs, what=what)
        self.path = check_output_dir(Path(out), force=force, what=what)
        self.force = force
        self.manifest = Manifest.new(stage, kind)
        self._t0 = time.perf_counter()
        self.dir: Path | None = None

    def elapsed(self) -> float:
        """Seconds since the stage began (since this object was created)."""
        return time.perf_counter() - self._t0

    @contextlib.contextmanager
    def timed(self, key: str) -> Iterator[None]:
        """Add the block's wall time to ``manifest.timings[key]`` (seconds)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.manifest.timings[key] = self.manifest.timings.get(key, 0.0) + time.perf_counter() - t

    @contextlib.contextmanager
    def open(self, *, write_manifest: bool = True) -> Iterator[Path]:
        """The temporary folder; on success the manifest is completed and the folder renamed."""
        with atomic_output_dir(self.path, force=self.force) as tmp:
            self.dir = tmp
            yield tmp
            if write_manifest:
                self.manifest.timings["total_s"] = self.elapsed()
                self.manifest.files = file_table(tmp)
                self.manifest.write(tmp / MANIFEST)
        self.dir = None


def check_not_an_input(out: str | os.PathLike[str], inputs: Iterable[Input], *,
                       what: str = "output folder") -> Path:
    """Refuse an output folder that is one of ``inputs``, lies inside one, or holds one: writing it
    would replace or mix with what the stage reads. An input is a path (named "input artifact" in
    the error) or ``(label, path)``, e.g. ``("held-out data", folder)``. Returns the resolved output."""
    path = Path(out).expanduser().resolve()
    for item in inputs:
        label, src = item if isinstance(item, tuple) else ("input artifact", item)
        src = Path(src).expanduser().resolve()
        if path == src:
            raise InputError(f"{what} {path} is the stage's own {label}", "write the result to another folder")
        if src in path.parents:
            raise InputError(f"{what} {path} is inside the {label} {src}", "write the result outside the input folder")
        if path in src.parents:
            raise InputError(f"{what} {path} holds the {label} {src}", "write the result to a folder of its own")
    return path
