"""A TensorRT engine as the candidate, run by Polygraphy's TrtRunner (needs a GPU and TensorRT).

The engine is built here with Polygraphy from the tiny BERT export, and wrapped in a folder laid
out as the build stage writes it (kind "engine", model.plan, upstream -> the ONNX artifact), so
this test depends only on TensorRT, not on the build stage.
"""

from __future__ import annotations

import json

import pytest

from trtforge.parity import check_parity

from .conftest import EVAL_TEXT, fast_options

pytestmark = pytest.mark.gpu


def test_engine_candidate_runs_under_trtrunner(bert, tmp_path, validate_report):
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    profile = Profile()
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        profile.add(name, (1, 1), (4, 32), (8, 40))
    plan = EngineBytesFromNetwork(NetworkFromOnnxPath(str(bert.model_path), strongly_typed=True),
                                  config=CreateConfig(profiles=[profile]))()
    folder = tmp_path / "engine"
    folder.mkdir()
    (folder / "model.plan").write_bytes(plan)
    manifest = {"schema_version": 1, "kind": "engine", "stage": "build", "engine": {"file": "model.plan"},
                "upstream": {"path": str(bert.path)}, "precision": {"precision": "fp32"},
                "profile": {"symbols": {"batch": [1, 4, 8], "sequence": [1, 32, 40]}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))

    rep = check_parity(bert.path, folder, [EVAL_TEXT], None, tmp_path / "r", options=fast_options(max_len=64))
    report = validate_report(rep.path)
    rt = report["candidate"]["runtime"]
    assert rt["engine"] == "tensorrt" and rt["runner"] == "polygraphy TrtRunner" and rt["gpu"]
    assert report["reference"]["runtime"]["engine"] == "onnxruntime"
    assert max(c["seq_len"] for c in report["data"]["cases"]) <= 40  # fitted to the engine's profile
    out = report["outputs"]["last_hidden_state"]
    assert out["cosine_mean"] > 0.999 and out["snr_db"] > 30  # an FP32 engine vs FP32 ONNX Runtime
    assert rep.passed, [c.message for c in rep.failures]
