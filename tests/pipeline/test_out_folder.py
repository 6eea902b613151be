"""`trtforge run`'s output folder: refused before any work when it holds the user's files or the
run's inputs; a cache hit proves the artifact is the one recorded, and a changed one is rebuilt."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import trtforge
from trtforge.cli import main
from trtforge.errors import InputError

from ..conftest import DATA, one_line_error  # noqa: TID252


@pytest.fixture(scope="module")
def recipe(tiny_model, tmp_path_factory) -> Path:
    model = tiny_model("llama", outliers=True)
    p = tmp_path_factory.mktemp("recipe") / "r.toml"
    p.write_text(f"""
[model]
path = "{model}"

[calibration]
data = ["{DATA / 'calib-mpl-lgpl.txt'}"]
num_samples = 16
seq_len = 32

[quantize]
recipe = "int8-sq"

[build]
targets = ["cpu"]

[parity]
data = ["{DATA / 'eval-gpl-3.0.txt'}"]
""")
    return p


@pytest.fixture(scope="module")
def finished(recipe, tmp_path_factory) -> Path:
    """A completed run; tests work on copies (copytree keeps sizes and modification times)."""
    out = tmp_path_factory.mktemp("finished") / "out"
    m = trtforge.run(recipe, out)
    assert m["verdict"] == "passed"
    return out


def copy_of(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished, out, symlinks=True)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def statuses(m: dict) -> dict[str, str]:
    return {s["name"]: s["status"] for s in m["stages"]}


def details(m: dict) -> dict[str, str]:
    return {s["name"]: s.get("detail", "") for s in m["stages"]}


def run_cli(recipe: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["-q", "run", str(recipe), "-o", str(out), *extra])


# --------------------------------------------------------------------------- the user's files


@pytest.mark.parametrize("files", [
    {"manifest.json": '{"mine": true}\n'},                       # a manifest.json trtforge did not write
    {"reports/x/notes.md": "my notes\n"},                        # a folder of other files
    {"manifest.json": '{"kind": "onnx", "schema_version": 1}\n', "model.onnx": "x"},  # another stage's artifact
])
def test_a_folder_of_the_users_files_is_refused_untouched(recipe, tmp_path, files):
    out = tmp_path / "mine"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = snapshot(out)
    one_line_error(run_cli(recipe, out), str(out))
    assert snapshot(out) == before and not (out / ".trtforge").exists()


@pytest.mark.parametrize("where", ["reports/int8-sq/notes.md", "engines/cpu/notes.md", "quantized/int8-sq/sub/x.bin"])
def test_user_files_inside_an_earlier_runs_stage_folders_are_refused(finished, tmp_path, recipe, where):
    out = copy_of(finished, tmp_path)
    (out / where).parent.mkdir(parents=True, exist_ok=True)
    (out / where).write_text("mine\n")
    before = snapshot(out)
    line = one_line_error(run_cli(recipe, out, "--set", "quantize.alpha=0.6"), "was not written by trtforge")
    assert where.split("/")[-1] in line
    assert snapshot(out) == before


def test_an_earlier_runs_output_is_reused(finished, tmp_path, recipe):
    out = copy_of(finished, tmp_path)
    (out / "README.md").write_text("a file next to the stage folders is never touched\n")
    m = trtforge.run(recipe, out)
    assert set(statuses(m).values()) == {"cached"}
    assert (out / "README.md").exists()


@pytest.mark.parametrize("case", ["model", "inside-model", "holds-model", "data-folder", "data-file-folder"])
def test_an_output_in_or_around_an_input_is_refused_before_anything_is_written(tiny_model, tmp_path, case):
    src = tiny_model("llama", outliers=True)
    model = tmp_path / "work" / "model"
    shutil.copytree(src, model)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(DATA / "calib-mpl-lgpl.txt", data / "calib.txt")
    calib = str(data) if case == "data-folder" else str(data / "calib.txt")
    out = {"model": model, "inside-model": model / "out", "holds-model": tmp_path / "work",
           "data-folder": data / "out", "data-file-folder": data}[case]
    before = snapshot(tmp_path)
    r = CliRunner().invoke(main, ["run", "cpu-int8", "--set", f"model.path={model}", "--set", f"calibration.data={calib}",
                                  "-o", str(out)])
    one_line_error(r, "output folder")
    assert snapshot(tmp_path) == before
    assert not (model / "manifest.json").exists() and not (model / ".trtforge").exists()


# --------------------------------------------------------------------------- cache hits prove the artifact


def test_a_changed_artifact_is_rebuilt_and_its_dependants_rerun(finished, tmp_path, recipe):
    out = copy_of(finished, tmp_path)
    recorded = json.loads((out / "manifest.json").read_text())["artifacts"]["quantized/int8-sq"]["files"]["model.onnx"]
    with open(out / "quantized" / "int8-sq" / "model.onnx", "ab") as f:
        f.write(b"\0")  # edited by hand: its size differs from the record
    r = CliRunner().invoke(main, ["run", str(recipe), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    st, why = statuses(m), details(m)
    assert st["export/fp32"] == st["export/fp16"] == "cached"
    assert st["quantized/int8-sq"] == "done" and "model.onnx changed" in why["quantized/int8-sq"]
    assert "quantized/int8-sq/model.onnx changed" in r.stderr  # the log says why
    for name in ("engines/cpu", "reports/int8-sq", "reports/int8-sq-cpu"):
        assert st[name] == "done" and "was rebuilt" in why[name], (name, why[name])
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["verdict"] == "passed"
    assert on_disk["artifacts"]["quantized/int8-sq"]["files"]["model.onnx"] == recorded  # the artifact again
    again = trtforge.run(recipe, out)
    assert set(statuses(again).values()) == {"cached"}


def test_same_size_and_time_is_trusted_unless_verify_and_a_touch_is_not_a_change(finished, tmp_path, recipe):
    out = copy_of(finished, tmp_path)
    target = out / "engines" / "cpu" / "model.onnx"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same time: the fast check cannot see it
    assert statuses(trtforge.run(recipe, out))["engines/cpu"] == "cached"
    m = trtforge.run(recipe, out, verify=True)  # --verify hashes every file
    assert statuses(m)["engines/cpu"] == "done" and "engines/cpu/model.onnx changed" in details(m)["engines/cpu"]
    assert statuses(m)["reports/int8-sq-cpu"] == "done" and statuses(m)["reports/int8-sq"] == "cached"

    os.utime(out / "export" / "fp32" / "model.onnx")  # touched: new time, same content
    m = trtforge.run(recipe, out)
    assert set(statuses(m).values()) == {"cached"}
    rec = json.loads((out / ".trtforge" / "stages" / "export__fp32.json").read_text())
    assert rec["stats"]["model.onnx"][1] == (out / "export" / "fp32" / "model.onnx").stat().st_mtime_ns  # refreshed


def test_a_changed_report_or_a_missing_file_is_rebuilt(finished, tmp_path, recipe):
    out = copy_of(finished, tmp_path)
    (out / "reports" / "int8-sq" / "report.html").write_text("<p>edited</p>")
    (out / "export" / "fp16" / "tokenizer.json").unlink()
    m = run_cli(recipe, out, "--verify")
    assert m.exit_code == 0, m.output
    assert "rebuilt" in m.stdout
    m = trtforge.run(recipe, out)
    assert set(statuses(m).values()) == {"cached"}


def test_a_damaged_stage_record_counts_as_none(finished, tmp_path, recipe):
    out = copy_of(finished, tmp_path)
    (out / ".trtforge" / "stages" / "export__fp32.json").write_text("{not json")
    r = CliRunner().invoke(main, ["run", str(recipe), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert "ignoring the stage record" in r.stderr
    assert statuses(json.loads(r.stdout))["export/fp32"] == "done"
    assert set(statuses(trtforge.run(recipe, out)).values()) == {"cached"}


def test_refusals_are_input_errors(recipe, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_text("not json")
    with pytest.raises(InputError, match="did not write"):
        trtforge.run(recipe, out)
