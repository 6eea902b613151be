"""`trtforge parity`: the gate's exit codes, --json, and one-line errors that leave nothing behind."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from trtforge.cli import main

from ..conftest import leftovers  # noqa: TID252
from ..conftest import one_line_error as _one_line_error
from .conftest import EVAL_TEXT, copy_artifact, edit_model

FAST = ["--num-samples", "4", "--max-len", "24", "--batch-sizes", "1,3"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_pass_exits_0_and_prints_json_summary(bert, tmp_path):
    r = run("parity", "--reference", bert.path, "--candidate", bert.path, "--data", EVAL_TEXT,
            "-o", tmp_path / "r", "--json", *FAST)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["passed"] is True and summary["exit_code"] == 0 and summary["failures"] == []
    assert summary["headline"]["embedding_cosine_mean"] == pytest.approx(1.0)
    assert summary["files"]["html"] == "report.html" and (tmp_path / "r" / "report.html").is_file()


def test_failed_gate_exits_1_and_writes_the_report(llama_fp16, corrupted_llama, tmp_path):
    out = tmp_path / "r"
    r = run("parity", "--reference", llama_fp16.path, "--candidate", corrupted_llama, "--data", EVAL_TEXT,
            "-o", out, *FAST)
    assert r.exit_code == 1, r.output
    assert r.stdout.startswith("FAIL") and "top1_agreement" in r.stdout and "error:" not in r.output
    assert json.loads((out / "report.json").read_text())["passed"] is False
    # --json on failure: still exit 1, failures listed with their margins
    r = run("parity", "--reference", llama_fp16.path, "--candidate", corrupted_llama, "--data", EVAL_TEXT,
            "-o", out, "--force", "--json", *FAST)
    assert r.exit_code == 1
    summary = json.loads(r.stdout)
    assert {f["metric"] for f in summary["failures"]} >= {"top1_agreement", "kl_mean"}
    assert all(f["margin"] < 0 for f in summary["failures"])


def test_a_looser_threshold_file_turns_the_same_run_into_a_pass(llama_fp16, corrupted_llama, tmp_path):
    loose = tmp_path / "loose.toml"
    loose.write_text("\n".join(f"{k} = false" for k in (
        "cosine_mean", "cosine_min", "snr_db", "top1_agreement", "top5_agreement", "kl_mean", "ppl_change_pct")) + "\n")
    r = run("parity", "--reference", llama_fp16.path, "--candidate", corrupted_llama, "--data", EVAL_TEXT,
            "-o", tmp_path / "r", "--thresholds", loose, *FAST)
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("args", [
    [],  # no options at all
    ["--candidate", "x", "-o", "y"],  # --reference missing
    ["--reference", "x", "--candidate", "x", "-o", "y", "--batch-sizes", "1,zero"],
    ["--reference", "x", "--candidate", "x", "-o", "y", "--num-samples", "0"],
])
def test_usage_errors_exit_2(args):
    assert run("parity", *args).exit_code == 2


def test_missing_artifact(bert, tmp_path):
    _one_line_error(run("parity", "--reference", tmp_path / "nope", "--candidate", bert.path, "-o", tmp_path / "r"),
                    "reference", "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(run("parity", "--reference", bert.path, "--candidate", empty, "-o", tmp_path / "r"),
                    "candidate", "no manifest.json")
    broken = copy_artifact(bert.path, tmp_path / "broken")
    (broken / "model.onnx").unlink()
    _one_line_error(run("parity", "--reference", bert.path, "--candidate", broken, "-o", tmp_path / "r"),
                    "model.onnx is missing")
    assert not (tmp_path / "r").exists() and not leftovers(tmp_path)


def test_mismatched_input_names(bert, tmp_path):
    cand = copy_artifact(bert.path, tmp_path / "renamed")

    def rename(model):
        for i in model.graph.input:
            if i.name == "attention_mask":
                i.name = "mask"
        for node in model.graph.node:
            for k, name in enumerate(node.input):
                if name == "attention_mask":
                    node.input[k] = "mask"

    edit_model(cand, rename)
    line = _one_line_error(run("parity", "--reference", bert.path, "--candidate", cand, "--data", EVAL_TEXT,
                               "-o", tmp_path / "r"), "different inputs", "attention_mask", "mask")
    assert "same model and task" in line
    assert not (tmp_path / "r").exists() and not leftovers(tmp_path)


def test_mismatched_tasks(bert, llama_fp32, tmp_path):
    _one_line_error(run("parity", "--reference", bert.path, "--candidate", llama_fp32.path, "-o", tmp_path / "r"),
                    "feature-extraction", "causal-lm-with-past")


def test_empty_data(bert, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    _one_line_error(run("parity", "--reference", bert.path, "--candidate", bert.path, "--data", empty,
                        "-o", tmp_path / "r"), "is empty")
    folder = tmp_path / "nodata"
    folder.mkdir()
    _one_line_error(run("parity", "--reference", bert.path, "--candidate", bert.path, "--data", folder,
                        "-o", tmp_path / "r"), "holds no .txt")
    _one_line_error(run("parity", "--reference", bert.path, "--candidate", bert.path, "--data", tmp_path / "gone.txt",
                        "-o", tmp_path / "r"), "does not exist")
    assert not (tmp_path / "r").exists() and not leftovers(tmp_path)


def test_too_little_text_for_a_decoder(llama_fp32, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short.\n")
    _one_line_error(run("parity", "--reference", llama_fp32.path, "--candidate", llama_fp32.path, "--data", short,
                        "-o", tmp_path / "r"), "evaluation data", "--max-len")


def test_bad_thresholds_and_existing_output(bert, tmp_path):
    _one_line_error(run("parity", "--reference", bert.path, "--candidate", bert.path, "--thresholds", "int9",
                        "-o", tmp_path / "r"), "neither a preset nor an existing file")
    (tmp_path / "r").mkdir()
    _one_line_error(run("parity", "--reference", bert.path, "--candidate", bert.path, "-o", tmp_path / "r"),
                    "already exists", "--force")
    _one_line_error(run("parity", "--reference", bert.path, "--candidate", bert.path, "--data", EVAL_TEXT,
                        "--inputs", tmp_path / "inputs.json", "-o", tmp_path / "r2"), "both --data and --inputs")


def test_per_layer_needs_a_quantized_candidate(bert, tmp_path):
    _one_line_error(run("parity", "--reference", bert.path, "--candidate", bert.path, "--data", EVAL_TEXT,
                        "-o", tmp_path / "r", "--per-layer", *FAST), "--per-layer needs a quantized candidate")
    assert not (tmp_path / "r").exists() and not leftovers(tmp_path)


def test_option_errors_name_the_field_in_the_library_and_the_flag_on_the_cli(bert, tmp_path):
    """The library says which option field is wrong; the CLI says which flag set it."""
    from trtforge.errors import OptionError
    from trtforge.parity import check_parity, load_thresholds

    with pytest.raises(OptionError) as info:
        check_parity(bert.path, bert.path, [EVAL_TEXT], None, tmp_path / "r", inputs=tmp_path / "inputs.json")
    assert info.value.problem == "both data and inputs given" and set(info.value.fields) == {"data", "inputs"}
    with pytest.raises(OptionError, match="^thresholds 'int9' is neither"):
        load_thresholds("int9", "int8")
    _one_line_error(run("parity", "--reference", bert.path, "--candidate", bert.path, "--thresholds", "int9",
                        "-o", tmp_path / "r"), "--thresholds 'int9' is neither a preset")
    line = _one_line_error(run("parity", "--reference", bert.path, "--candidate", bert.path, "--data", EVAL_TEXT,
                               "--inputs", tmp_path / "inputs.json", "-o", tmp_path / "r"), "both --data and --inputs")
    assert "with --data" in line and "with --inputs" in line
    assert not (tmp_path / "r").exists() and not leftovers(tmp_path)
