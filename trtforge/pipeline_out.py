"""The output folder of `trtforge run`: what is checked before any work, and what a cache hit proves.

In:  OUT, the run's inputs (model folder, data files and folders), the stage folders the plan
     writes, and the stage records of earlier runs (OUT/.trtforge/stages/*.json).
Out: one-line errors (:func:`check_out`), the reason a stage folder is not the one its record
     describes (:func:`changed_on_disk`), and the record's fast check (:func:`with_file_checks`).

OUT must not be, lie inside or hold one of the run's inputs; it must be writable; and it must be
new, empty, or an earlier run's output (a ``manifest.json`` of kind ``pipeline`` or the
``.trtforge`` state folder) whose stage folders hold only files their manifest (or, for reports,
their record and ``report.json``) lists. A folder of the user's own files is refused, never
overwritten; files the user changed inside an artifact are found by the cache check and rebuilt.

A stage record keeps size and modification time (ns) of every file of the folder (``stats``);
folders without a manifest (parity reports) also keep their sha256 table (``files``). A cache hit
needs the same manifest (by hash) and every file of the table with the recorded size and time;
a file whose size or time differs is hashed, and with ``deep`` every file is.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from trtforge.artifacts import (
    check_output_dir,
    file_stats,
    file_table,
    os_error,
    read_json,
    sha256_file,
    verify_files,
)
from trtforge.errors import InputError, TrtforgeError
from trtforge.manifest import MANIFEST, Manifest

STATE = ".trtforge"
REPORT = "report.json"
PIPELINE_KIND = "pipeline"
_HINT = "choose another -o (a new or empty folder, or an earlier run's output, which is reused), or move those files away"


def check_out(out: Path, inputs: list[tuple[str, Path]], folders: list[tuple[str, Path, str]],
              record: Callable[[str], dict | None]) -> None:
    """Every check of OUT that needs no work; raises a one-line error.

    ``inputs``: (what, path) the run reads; ``folders``: (stage, folder, marker file) the plan
    writes; ``record(stage)``: that stage's record from an earlier run, or None.
    """
    for what, p in inputs:
        p = Path(p).expanduser().resolve()
        if out == p:
            raise InputError(f"output folder {out} is the {what}", "choose an -o outside the run's inputs")
        if p.is_dir() and p in out.parents:
            raise InputError(f"output folder {out} is inside the {what} {p}", "choose an -o outside the run's inputs")
        if out in p.parents:
            raise InputError(f"output folder {out} holds the {what} {p}", "choose an -o that holds none of the run's inputs")
    if not out.exists():
        check_output_dir(out, force=False)  # a writable parent, the name's length
        return
    if not out.is_dir():
        raise InputError(f"output path {out} is a file", "choose another -o")
    try:
        Path(tempfile.mkdtemp(prefix=".trtforge-probe-", dir=out)).rmdir()
    except OSError as exc:
        raise os_error(exc, f"checking that output folder {out} can be written") from None
    if not any(out.iterdir()):
        return
    top = out / MANIFEST
    if top.exists():
        try:
            data = read_json(top, "manifest")
        except TrtforgeError:
            data = None
        if not (isinstance(data, dict) and data.get("kind") == PIPELINE_KIND):
            raise InputError(f"output folder {out} holds a {MANIFEST} that 'trtforge run' did not write, so the run "
                             "would overwrite it", _HINT)
    elif not (out / STATE).is_dir():
        raise InputError(f"output folder {out} is not empty and not the output of an earlier 'trtforge run'", _HINT)
    for name, folder, marker in folders:
        problem = _foreign(out, folder, marker, record(name))
        if problem:
            raise InputError(f"{problem}, and the run would replace it", _HINT)


def _foreign(out: Path, folder: Path, marker: str, rec: dict | None) -> str | None:
    """What in a stage folder of OUT trtforge did not write (None: nothing)."""
    for anc in [*reversed(folder.relative_to(out).parents)][1:]:
        if (out / anc).exists() and not (out / anc).is_dir():
            return f"{out / anc} is a file trtforge did not write"
    if not folder.exists():
        return None
    if not folder.is_dir():
        return f"{folder} is a file trtforge did not write"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())
    if not files:
        return None
    allowed: set[str] | None = None
    try:
        if marker == MANIFEST:
            allowed = {MANIFEST, *Manifest.read(folder / MANIFEST).files}
        else:
            rep = read_json(folder / marker, "report")
            if isinstance(rep, dict) and "verdict" in rep:
                allowed = {marker, *(v for v in (rep.get("files") or {}).values() if isinstance(v, str))}
    except TrtforgeError:
        allowed = None
    if allowed is None:
        return f"{folder} holds files but no {marker} trtforge wrote"
    recorded = (rec or {}).get("files")
    allowed |= set(recorded) if isinstance(recorded, dict) else set()
    extra = [f for f in files if f not in allowed]
    if extra:
        more = f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""
        return f"{folder / extra[0]}{more} was not written by trtforge"
    return None


def with_file_checks(folder: Path, marker: str, rec: dict) -> dict:
    """``rec`` with the fast check of ``folder`` (``stats``) and, for report folders, its file table."""
    rec = {**rec, "stats": file_stats(folder)}
    if marker != MANIFEST:
        rec["files"] = file_table(folder)
    return rec


def _table(folder: Path, marker: str, rec: dict) -> dict[str, str] | None:
    if marker == MANIFEST:
        return Manifest.read(folder / MANIFEST).files
    files = rec.get("files")  # None: a report recorded before file tables were (report.json's hash is all there is)
    return files if isinstance(files, dict) else None


def changed_on_disk(folder: Path, marker: str, rec: dict, *, rel: str, deep: bool = False,
                    before_files: bool = False) -> str | None:
    """Why ``folder`` is not what ``rec`` recorded, or None. ``before_files``: only the marker
    (its presence and hash), the cheap part."""
    if not (folder / marker).is_file():
        return f"{rel}/{marker} is missing"
    if sha256_file(folder / marker) != rec.get("manifest_sha256"):
        return f"{rel}/{marker} changed"
    if before_files:
        return None
    table = _table(folder, marker, rec)
    if table is None:
        return None
    stats = rec.get("stats")
    problems = verify_files(folder, table, stats if isinstance(stats, dict) else None, deep=deep)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return f"{rel}/{problems[0]}{more}"
    return None


def needs_refresh(folder: Path, marker: str, rec: dict) -> bool:
    """Whether the record's fast check no longer matches a folder whose content was verified."""
    return rec.get("stats") != file_stats(folder) or (marker != MANIFEST and "files" not in rec)
