"""check_parity end to end on tiny exports: identical, FP16 vs FP32, a planted bad weight."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from trtforge.cli import main
from trtforge.parity import check_parity

from ..conftest import leftovers, one_line_error  # noqa: TID252
from .conftest import EVAL_TEXT, copy_artifact, edit_manifest, fast_options, write_prompts


def test_identical_candidate_passes_with_zero_error(bert, tmp_path, validate_report):
    cand = copy_artifact(bert.path, tmp_path / "copy")
    rep = check_parity(bert.path, cand, [EVAL_TEXT], None, tmp_path / "r", options=fast_options())
    assert rep.passed and rep.exit_code == 0 and not rep.failures
    out = rep.content["outputs"]["last_hidden_state"]
    assert out["max_abs_err"] == 0 and out["mean_abs_err"] == 0 and out["snr_db"] == 200
    assert rep.content["embeddings"]["embedding_cosine_min"] == pytest.approx(1.0, abs=1e-12)
    assert rep.content["thresholds"]["name"] == "fp16"  # an fp32 export is held to the fp16 preset
    report = validate_report(rep.path)
    assert report["passed"] is True and report["verdict"] == "pass"
    # encoders: right padding, an unpadded single row first, padded batches after
    cases = report["data"]["cases"]
    assert cases[0]["padding"] == "none" and cases[0]["batch"] == 1
    assert {c["padding"] for c in cases[1:]} == {"right"}
    for name in ("report.json", "report.html", "report.md", "inputs.json", "outputs-sample.npz"):
        assert (rep.path / name).is_file(), name
    # the full outputs only on request (gigabytes for an LLM); a small sample of both sides instead
    assert not (rep.path / "outputs.json").exists()
    assert report["files"]["outputs"] is None and report["files"]["outputs_sample"] == "outputs-sample.npz"
    with np.load(rep.path / "outputs-sample.npz", allow_pickle=False) as z:
        ref_rows, cand_rows = z["reference/last_hidden_state/1/rows"], z["candidate/last_hidden_state/1/rows"]
        assert ref_rows.shape[0] == len(z["last_hidden_state/1/row_index"]) > 1 and ref_rows.dtype == np.float16
        assert np.array_equal(ref_rows, cand_rows)  # identical models
    assert all(c["missed_limits"] == [] for c in cases)


def test_fp16_reference_vs_fp32_export_gives_plausible_figures(fp16_vs_fp32, validate_report):
    rep = fp16_vs_fp32
    report = validate_report(rep.path)
    assert rep.passed, [c.message for c in rep.failures]
    logits = report["outputs"]["logits"]
    # FP16 rounding, not zero and not large
    assert 0 < logits["max_abs_err"] < 0.05 and 40 < logits["snr_db"] < 120
    assert 0.9999 < logits["cosine_mean"] < 1.0
    assert report["logits"]["top1_agreement"] >= 0.99 and report["logits"]["kl_mean"] < 1e-4
    ppl = report["perplexity"]
    assert ppl["reference"] > 1 and abs(ppl["ppl_change_pct"]) < 0.5 and ppl["num_tokens"] > 100
    assert set(report["outputs"]) == {"logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"}
    # decoders: left padding, an empty past (prefill)
    assert {c["padding"] for c in report["data"]["cases"][1:]} == {"left"}
    # how the FP16 reference was computed on the CPU
    rt = report["reference"]["runtime"]
    assert rt["engine"] == "onnxruntime" and rt["providers"] == ["CPUExecutionProvider"] and rt["model_dtype"] == "fp16"
    assert rt["execution"]["analysed"] and rt["execution"]["fp32_fallback_ops"].get("MatMul", 0) > 0
    assert "float32" in rt["execution"]["summary"]
    assert "FP16 ops computed in FP32" in (rep.path / "report.md").read_text()
    # hashes of both artifacts and of the data
    from trtforge.artifacts import sha256_file

    assert report["reference"]["model_sha256"] == sha256_file(rep.content["reference"]["path"] + "/model.onnx")
    assert report["data"]["sources"][0]["sha256"] == sha256_file(EVAL_TEXT)
    assert len(report["data"]["feeds_sha256"]) == 64


def test_planted_corrupted_weight_fails_on_the_right_metric(corrupted_report, validate_report):
    rep = corrupted_report
    report = validate_report(rep.path)
    assert not rep.passed and rep.exit_code == 1 and report["verdict"] == "fail"
    failed = {(c.metric, c.scope) for c in rep.failures}
    assert ("top1_agreement", "logits") in failed and ("kl_mean", "logits") in failed
    assert ("ppl_change_pct", "perplexity") in failed
    # the bad weight is in the LM head: the KV-cache outputs, computed before it, stay within limits
    assert all(c.scope in ("logits", "perplexity") for c in rep.failures)
    assert all(c.passed for c in rep.checks if c.scope.startswith("present."))
    top1 = next(c for c in rep.failures if c.metric == "top1_agreement")
    assert top1.value < 0.9 and top1.margin < 0 and "short by" in top1.message
    assert report["failures"] and report["summary"].startswith("FAIL")
    md = (rep.path / "report.md").read_text()
    assert "Parity FAILED" in md and "top1_agreement" in md and len(md.splitlines()) < 40


def test_saved_inputs_repeat_the_run(fp16_vs_fp32, llama_fp16, llama_fp32, tmp_path):
    first = fp16_vs_fp32
    again = check_parity(llama_fp16.path, llama_fp32.path, None, None, tmp_path / "again",
                         inputs=first.path / "inputs.json", options=fast_options())
    assert again.content["data"]["feeds_sha256"] == first.content["data"]["feeds_sha256"]
    assert again.content["outputs"]["logits"]["max_abs_err"] == first.content["outputs"]["logits"]["max_abs_err"]
    assert again.content["perplexity"] == first.content["perplexity"]
    # Polygraphy's saved outputs load back as RunResults with both runners
    from polygraphy.comparator import RunResults

    from trtforge.parity.run import quiet_polygraphy

    with quiet_polygraphy():
        results = RunResults.load(str(first.path / "outputs.json"))
    assert list(results.keys()) == ["reference", "candidate"]
    ref0 = results["reference"][0]["logits"]
    assert ref0.dtype == np.float16  # what the FP16 reference computed, as it computed it


def test_build_runtime_is_honoured(bert, tmp_path):
    cand = copy_artifact(bert.path, tmp_path / "cpu-build")

    def as_build(m):
        m["stage"] = "build"
        m["target"] = "cpu"
        m["runtime"] = {"provider": "CPUExecutionProvider", "graph_optimization_level": "ORT_DISABLE_ALL",
                        "session_config": {"session.intra_op.allow_spinning": "0"}}
        m["precision"] = {"precision": "fp8", "float_dtype": "fp32"}  # how the build stage records it

    edit_manifest(cand, as_build)
    rep = check_parity(bert.path, cand, [EVAL_TEXT], None, tmp_path / "r", options=fast_options(num_samples=4))
    rt = rep.content["candidate"]["runtime"]
    assert rt["from_build_runtime"] and rt["graph_optimization_level"] == "ORT_DISABLE_ALL"
    assert rt["session_config"]["session.intra_op.allow_spinning"] == "0"
    assert rep.content["candidate"]["stage"] == "build" and rep.passed
    assert rep.content["candidate"]["precision"] == "fp8" and rep.content["thresholds"]["name"] == "fp8"


def test_overlap_with_calibration_data_is_warned_and_recorded(bert, tmp_path, caplog):
    cand = copy_artifact(bert.path, tmp_path / "fake-quantized")
    edit_manifest(cand, lambda m: m.update(quantization={
        "precision": "int8", "calibration": {"sha256": "0" * 64, "sources": [str(EVAL_TEXT)]}, "nodes": []}))
    with caplog.at_level("WARNING", logger="trtforge"):
        rep = check_parity(bert.path, cand, [EVAL_TEXT], None, tmp_path / "r", options=fast_options(num_samples=4))
    ov = rep.content["data"]["overlap"]
    assert ov["checked"] and ov["overlaps"] and "both calibration and evaluation data" in ov["reasons"][0]
    assert any("overlaps calibration" in w for w in rep.content["warnings"])
    assert any("overlaps calibration" in r.getMessage() for r in caplog.records)
    assert rep.content["thresholds"]["name"] == "int8"  # preset from the candidate's precision


def test_report_json_is_plain_json(fp16_vs_fp32):
    text = (fp16_vs_fp32.path / "report.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


@pytest.mark.parametrize(("calibration", "reason"), [
    ("copy", "has the same content as calibration file"),  # the same bytes under another name
    ("superset", "evaluation sentences also appear in calibration file"),  # the text inside a larger file
])
def test_overlap_by_content_and_by_sentence(bert, tmp_path, calibration, reason):
    calib = tmp_path / "calib.txt"
    text = EVAL_TEXT.read_text()
    calib.write_text(text if calibration == "copy" else "Some other calibration text comes first here.\n\n" + text)
    cand = copy_artifact(bert.path, tmp_path / "fake-quantized")
    edit_manifest(cand, lambda m: m.update(quantization={
        "precision": "int8", "calibration": {"sha256": "0" * 64, "sources": [str(calib)]}, "nodes": []}))
    rep = check_parity(bert.path, cand, [EVAL_TEXT], "fp16", tmp_path / "r", options=fast_options(num_samples=4))
    ov = rep.content["data"]["overlap"]
    assert ov["overlaps"] and reason in ov["reasons"][0], ov


def test_sequence_classification_compares_one_row_per_text(exported, tmp_path, validate_report):
    art = exported("bert-cls")
    rep = check_parity(art.path, art.path, [EVAL_TEXT], None, tmp_path / "r", options=fast_options(num_samples=7))
    report = validate_report(rep.path)
    lg = report["logits"]
    assert lg["num_rows"] == 7 and lg["vocab_size"] == 3 and lg["top1_agreement"] == 1.0
    assert lg["top5_agreement"] is None and not any(c["metric"] == "top5_agreement" for c in report["checks"])
    assert report["perplexity"] is None and report["embeddings"] is None and rep.passed


@pytest.fixture(scope="module")
def bert_calibrated_on_eval_text(bert, tmp_path_factory):
    """INT8 of the tiny BERT calibrated on a copy of the evaluation text, given by a relative path
    from a folder of its own (as a user in another shell would), then built for the CPU."""
    import os

    from trtforge.calibration import get_preset, quantize
    from trtforge.engines import build

    root = tmp_path_factory.mktemp("calib-cwd")
    (root / "data").mkdir()
    (root / "data" / "text.txt").write_text(EVAL_TEXT.read_text())
    old = os.getcwd()
    os.chdir(root)
    try:
        q = quantize(bert, get_preset("int8").replace(num_samples=8, seq_len=32), root / "q", calib=["data/text.txt"])
    finally:
        os.chdir(old)
    return q, build(q, "cpu", root / "cpu")


@pytest.mark.parametrize("side", ["quantized", "build"])
def test_overlap_is_found_by_content_from_another_folder_and_through_a_build(bert, bert_calibrated_on_eval_text,
                                                                            tmp_path, monkeypatch, side):
    """Issue 12: the calibration record's relative path does not resolve here, and a build's own
    manifest is not the quantize manifest; the content hashes the record keeps still match."""
    q, cpu = bert_calibrated_on_eval_text
    assert q.manifest["quantization"]["calibration"]["sources"] == ["data/text.txt"]  # as given: relative
    files = q.manifest["quantization"]["calibration"]["files"]
    assert files[0]["path"].endswith("data/text.txt") and len(files[0]["sha256"]) == 64
    monkeypatch.chdir(tmp_path)  # another folder: data/text.txt does not exist here
    cand = q.path if side == "quantized" else cpu.path
    rep = check_parity(bert.path, cand, [EVAL_TEXT], "int8", tmp_path / "r", options=fast_options(num_samples=4))
    ov = rep.content["data"]["overlap"]
    assert ov["overlaps"] and "has the same content as calibration file" in ov["reasons"][0], ov
    assert any("overlaps calibration" in w for w in rep.content["warnings"])
    # the calibration file moved away: its hash is still compared
    moved = tmp_path / "moved"
    copy_artifact(Path(cand), moved)
    edit_manifest(moved, lambda m: m["quantization"]["calibration"]["files"][0].update(path="/nonexistent/text.txt"))
    rep = check_parity(bert.path, moved, [EVAL_TEXT], "int8", tmp_path / "r2", options=fast_options(num_samples=4))
    ov = rep.content["data"]["overlap"]
    assert ov["overlaps"] and "compared by content hash only" not in ov.get("note", "")
    # an older record without hashes, from another folder: said, not silently passed
    edit_manifest(moved, lambda m: m["quantization"]["calibration"].pop("files"))
    rep = check_parity(bert.path, moved, [EVAL_TEXT], "int8", tmp_path / "r3", options=fast_options(num_samples=4))
    ov = rep.content["data"]["overlap"]
    assert not ov["overlaps"] and "not compared (no content hash recorded): data/text.txt" in ov["note"]


def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(bert, llama_fp16, tmp_path, monkeypatch):
    """Issue 12: ENOSPC from Polygraphy's saved inputs/outputs or from the report files is a one-line
    error, not a traceback, and the report folder is not left half-written."""
    import errno

    import polygraphy.util as putil

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    args = ["parity", "--reference", str(bert.path), "--candidate", str(bert.path), "--data", str(EVAL_TEXT),
            "--num-samples", "4", "--max-len", "24", "--batch-sizes", "1,3"]
    with monkeypatch.context() as m:
        m.setattr(putil, "save_file", full)  # Polygraphy's inputs.json / outputs.json
        line = one_line_error(CliRunner().invoke(main, [*args, "-o", str(tmp_path / "r")]), "No space left on device")
    assert "free disk space" in line
    with monkeypatch.context() as m:
        m.setattr("trtforge.parity.report.render_html", lambda c: full())  # the report files
        line = one_line_error(CliRunner().invoke(main, [*args, "-o", str(tmp_path / "r")]), "No space left on device")
    assert "report" in line
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "One, two,", "category": "count"}])
    with monkeypatch.context() as m:  # prompts only: no Polygraphy files, the report alone
        m.setattr("trtforge.parity.report.write_json", full)
        one_line_error(CliRunner().invoke(main, ["parity", "--reference", str(llama_fp16.path), "--candidate",
                                                 str(llama_fp16.path), "--prompts", str(prompts), "--max-new-tokens", "2",
                                                 "-o", str(tmp_path / "r")]), "No space left on device")
    assert not (tmp_path / "r").exists() and not leftovers(tmp_path)


def test_the_report_folder_cannot_be_inside_either_artifact(bert, llama_fp16, tmp_path):
    """Issue 12: writing the report into (or around) an artifact would mix it with the model's files."""
    ref = copy_artifact(bert.path, tmp_path / "ref")
    for out, needle in ((ref / "report", "is inside the input artifact"), (ref, "is the stage's own input"),
                        (tmp_path, "holds the input artifact")):
        for role in ("--reference", "--candidate"):
            other = "--candidate" if role == "--reference" else "--reference"
            r = CliRunner().invoke(main, ["parity", role, str(ref), other, str(bert.path), "-o", str(out), "--force"])
            one_line_error(r, needle)
    assert sorted(p.name for p in ref.iterdir()) == sorted(p.name for p in bert.path.iterdir())


def test_a_report_folder_inside_the_data_folder_is_refused(bert, tmp_path):
    """Issue 12: the next parity run over that folder would read the report as evaluation text."""
    from trtforge.errors import InputError

    data = tmp_path / "data"
    data.mkdir()
    (data / "eval.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    with pytest.raises(InputError, match="inside the held-out data"):
        check_parity(bert.path, bert.path, [data], None, data / "report")
    assert sorted(p.name for p in data.iterdir()) == ["eval.txt"]
