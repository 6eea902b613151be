"""Every command against hostile outputs and inputs: one `error:` line, exit 1, nothing lost or left.

The sweep: each command that writes (export, quantize, build, parity, export-checkpoint, run)
with an output under a read-only folder, under a file, with a 250-byte name, on a folder of the
user's own files (with and without --force), inside its input and equal to it (--force); each
command that reads an ONNX artifact (quantize, build, parity, export-checkpoint, inspect) with a
truncated model.onnx. Every case ends with exit code 1, exactly one line starting ``error:``, no
traceback, no exception but the CLI's own exit, and every file of the workspace as it was.

Read-only: a read-only bind mount where this process may mount (root in a container with
CAP_SYS_ADMIN), chmod 0o555 where it is not root, else EROFS injected where trtforge creates
folders and files under that folder.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from trtforge.cli import main

from .conftest import DATA

CALIB = DATA / "calib-mpl-lgpl.txt"
WRITERS = ("export", "quantize", "build", "parity", "export-checkpoint", "run")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tiny_model, exported, tmp_path_factory) -> dict[str, Path]:
    """The inputs every command reads: a model folder, its export, a quantized artifact, its CPU
    build, and an FP8 decoder artifact for export-checkpoint."""
    from trtforge.calibration import quantize
    from trtforge.engines.build import build
    from trtforge.recipes import load_quant_recipe

    root = tmp_path_factory.mktemp("world")
    model = root / "model"
    shutil.copytree(tiny_model("bert"), model)
    exp = exported("bert").path
    q = quantize(exp, load_quant_recipe("int8", ["num_samples=8", "seq_len=32"]), root / "q", calib=[CALIB]).path
    cpu = build(q, "cpu", root / "cpu").path
    dec = exported("llama", task="causal-lm-with-past", dtype="fp16").path
    fp8 = quantize(dec, load_quant_recipe("fp8", ["num_samples=8", "seq_len=32"]), root / "fp8", calib=[CALIB]).path
    return {"root": root, "model": model, "export": exp, "quantized": q, "cpu": cpu, "fp8": fp8}


def argv(cmd: str, w: dict[str, Path], out: Path, *, inputs: dict[str, Path] | None = None) -> list[str]:
    w = {**w, **(inputs or {})}
    return {
        "export": ["export", str(w["model"]), "-o", str(out)],
        "quantize": ["quantize", str(w["export"]), "--recipe", "int8", "--calib", str(CALIB), "--set", "num_samples=8",
                     "-o", str(out)],
        "build": ["build", str(w["quantized"]), "--target", "cpu", "-o", str(out)],
        # --save-outputs: the full outputs, so the report outgrows the 128 KiB disk of full_disk (without it
        # a tiny model's report folder fits there)
        "parity": ["parity", "--reference", str(w["export"]), "--candidate", str(w["quantized"]), "--save-outputs",
                   "-o", str(out)],
        "export-checkpoint": ["export-checkpoint", str(w["fp8"]), "-o", str(out), "--no-parity"],
        "run": ["run", "cpu-int8", "--set", f"model.path={w['model']}", "--set", f"calibration.data={CALIB}",
                "-o", str(out)],
    }[cmd]


# the input a command's output must stay out of
MAIN_INPUT = {"export": "model", "quantize": "export", "build": "quantized", "parity": "quantized",
              "export-checkpoint": "fp8", "run": "model"}


def snapshot(*folders: Path) -> dict[str, bytes]:
    files = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                files[str(p)] = p.read_bytes()
            elif p.is_dir():
                files[str(p) + "/"] = b""
    return files


def refused(r, *needles: str) -> str:
    """Exit 1, one `error:` line, no traceback, no exception but the CLI's own exit."""
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.output
    assert "Traceback" not in r.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def invoke(args: list[str]):
    return CliRunner().invoke(main, ["-q", *args])


# --------------------------------------------------------------------------- read-only folders


def _try_ro_mount(folder: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    try:
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=10)
        return False
    return True


@pytest.fixture(params=["native", "injected"])
def readonly_dir(request, tmp_path, monkeypatch):
    """A folder nothing can be created in: the system's own refusal ("native": a read-only mount,
    or chmod where not root; skipped where neither works), or EROFS injected ("injected")."""
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "keep.txt").write_text("the user's\n")
    if request.param == "native":
        if os.geteuid() != 0:
            ro.chmod(0o555)
            yield ro
            ro.chmod(0o755)
            return
        if not _try_ro_mount(ro):
            pytest.skip("root without the right to mount: chmod does not stop root, and no read-only mount")
        yield ro
        subprocess.run(["umount", "-l", str(ro)], capture_output=True, timeout=10)
        return

    def refuse(path) -> None:
        p = Path(os.fspath(path)).absolute()
        if p == ro or ro in p.parents:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(p))

    real_mkdtemp, real_mkdir, real_open = tempfile.mkdtemp, os.mkdir, os.open

    def mkdtemp(suffix=None, prefix=None, dir=None):
        if dir is not None:
            refuse(Path(dir) / "x")
        return real_mkdtemp(suffix, prefix, dir)

    def mkdir(path, mode=0o777, *a, **k):
        refuse(path)
        return real_mkdir(path, mode, *a, **k)

    def os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", os_open)
    yield ro


@pytest.fixture(params=["native", "injected"])
def full_disk(request, tmp_path, monkeypatch):
    """A folder on a disk with almost no space: a 128 KiB tmpfs ("native", where this process may
    mount; skipped elsewhere), or ENOSPC injected into every file opened for writing under it
    ("injected"). Creating folders still works, so every check before the work passes."""
    full = tmp_path / "full"
    full.mkdir()
    if request.param == "native":
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("needs root to mount a small tmpfs")
        try:
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(full)], check=True,
                           capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            pytest.skip("no right to mount a tmpfs here")
        yield full
        subprocess.run(["umount", "-l", str(full)], capture_output=True, timeout=10)
        return
    import builtins
    import io

    real_open = io.open

    def open_(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            p = Path(os.fspath(file)).absolute()
            if full in p.parents:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(p))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    yield full


# --------------------------------------------------------------------------- the sweep over outputs


@pytest.mark.parametrize("cmd", WRITERS)
def test_a_full_disk_while_writing(cmd, world, full_disk):
    before = snapshot(world["root"])
    line = refused(invoke(argv(cmd, world, full_disk / "out")))
    # export-checkpoint measures the free space first and refuses before writing
    assert "No space left on device" in line or "of disk but" in line, line
    assert snapshot(world["root"]) == before
    left = [p for p in full_disk.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert not left, left  # no half-written artifact, no temporary folder
    out = full_disk / "out"
    if cmd == "run":  # the run's own folder stays (the lock, the record of how it ended), no artifact in it
        assert not [p for p in out.rglob("*") if p.is_file() and p.parent.name not in (".trtforge", "out")]
    else:
        assert not out.exists()



@pytest.mark.parametrize("cmd", WRITERS)
def test_an_output_under_a_read_only_folder(cmd, world, readonly_dir):
    before = snapshot(world["root"], readonly_dir)
    refused(invoke(argv(cmd, world, readonly_dir / "out")), "can be written")
    assert snapshot(world["root"], readonly_dir) == before


@pytest.mark.parametrize("cmd", WRITERS)
def test_an_output_under_a_file(cmd, world, tmp_path):
    (tmp_path / "afile").write_text("x")
    before = snapshot(world["root"], tmp_path)
    refused(invoke(argv(cmd, world, tmp_path / "afile" / "out")), "is a file")
    assert snapshot(world["root"], tmp_path) == before


@pytest.mark.parametrize("cmd", WRITERS)
def test_a_250_byte_output_name(cmd, world, tmp_path):
    before = snapshot(world["root"], tmp_path)
    refused(invoke(argv(cmd, world, tmp_path / ("n" * 250))), "250 bytes")
    assert snapshot(world["root"], tmp_path) == before


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("cmd", WRITERS)
def test_a_folder_of_the_users_files(cmd, force, world, tmp_path):
    mine = tmp_path / "mine"
    (mine / "reports" / "x").mkdir(parents=True)
    (mine / "manifest.json").write_text('{"mine": true}\n')
    (mine / "reports" / "x" / "notes.md").write_text("notes\n")
    before = snapshot(world["root"], tmp_path)
    args = argv(cmd, world, mine) + (["--force"] if force and cmd != "run" else [])
    refused(invoke(args), str(mine))
    assert snapshot(world["root"], tmp_path) == before


@pytest.mark.parametrize("where", ["inside", "equal"])
@pytest.mark.parametrize("cmd", WRITERS)
def test_an_output_inside_or_equal_to_its_input(cmd, where, world):
    src = world[MAIN_INPUT[cmd]]
    out = src / "sub" if where == "inside" else src
    before = snapshot(world["root"])
    args = argv(cmd, world, out) + (["--force"] if where == "equal" and cmd != "run" else [])
    refused(invoke(args), str(src))
    assert snapshot(world["root"]) == before


# --------------------------------------------------------------------------- corrupt inputs


@pytest.fixture
def truncated(world, tmp_path):
    """truncated("quantized") -> a copy of that artifact whose model.onnx lost its second half."""

    def make(name: str) -> Path:
        dst = tmp_path / f"{name}-truncated"
        shutil.copytree(world[name], dst)
        model = dst / "model.onnx"
        data = model.read_bytes()
        model.write_bytes(data[: len(data) // 2])
        return dst

    return make


@pytest.mark.parametrize("cmd,name", [("quantize", "export"), ("build", "quantized"), ("parity", "quantized"),
                                      ("export-checkpoint", "fp8")])
def test_a_truncated_model_onnx_in_the_input(cmd, name, world, truncated, tmp_path):
    bad = truncated(name)
    key = {"parity": "quantized"}.get(cmd, name)
    before = snapshot(world["root"], tmp_path)
    refused(invoke(argv(cmd, world, tmp_path / "out", inputs={key: bad})), "model.onnx")
    assert snapshot(world["root"], tmp_path) == before


def test_inspect_of_a_truncated_build(world, truncated):
    """inspect answers with its report (exit 1: will not load), naming the changed file."""
    bad = truncated("cpu")
    before = snapshot(bad)
    for extra in ([], ["--load"], ["--json"]):
        r = invoke(["inspect", str(bad), *extra])
        assert r.exit_code == 1 and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
        assert "Traceback" not in r.output and "model.onnx changed" in r.output
    assert snapshot(bad) == before


def test_a_truncated_safetensors_file_in_the_model_folder(world, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    w = next(model.glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:100])
    before = snapshot(tmp_path)
    refused(invoke(["export", str(model), "-o", str(tmp_path / "out")]), "safetensors")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("content", [b'[model]\npath = "caf\xe9"\n', b"\x89PNG\r\n\x1a\n\x00\x00", "folder"])
def test_a_recipe_that_is_not_text(content, tmp_path):
    p = tmp_path / "r.toml"
    if content == "folder":
        p.mkdir()
    else:
        p.write_bytes(content)
    before = snapshot(tmp_path)
    refused(invoke(["run", str(p), "-o", str(tmp_path / "out")]), "recipe file")
    refused(invoke(["quantize", str(tmp_path), "--recipe", str(p), "-o", str(tmp_path / "q")]), "recipe file")
    assert snapshot(tmp_path) == before


def test_a_checkpoint_into_its_float_reference_is_refused(world, tiny_model):
    ref = world["root"] / "float-ref"
    if not ref.exists():
        shutil.copytree(tiny_model("llama"), ref)
    before = snapshot(world["root"])
    for out, extra in ((ref, ["--force"]), (ref / "ck", [])):
        args = ["export-checkpoint", str(world["fp8"]), "-o", str(out), "--reference", str(ref), *extra]
        refused(invoke(args), "float reference")
    assert snapshot(world["root"]) == before
