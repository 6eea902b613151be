"""--cpu-lm-head int8: a decoder's float lm_head as an exact U8U8 INT8 GEMM on the CPU target."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from trtforge.cli import main
from trtforge.engines.build import build
from trtforge.engines.cpu_lm_head import find_lm_head
from trtforge.engines.plan import BuildOptions
from trtforge.errors import OptionError
from trtforge.ort import session

from .qdq import llama_feeds


def _logits(path, rt=None, feeds=None):
    rt = rt or {}
    s = session(path, providers=[rt.get("provider", "CPUExecutionProvider")], config=rt.get("session_config"),
                optimization=rt.get("graph_optimization_level", "ORT_DISABLE_ALL"))
    return s.run(["logits"], feeds)[0].astype(np.float64)


def _rel_rms(a, b):
    return float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))


@pytest.fixture(scope="module")
def built_int8_head(quantized, tmp_path_factory):
    src = quantized("int8")
    return src, build(src, "cpu", tmp_path_factory.mktemp("lmh") / "cpu", BuildOptions(cpu_lm_head="int8"))


def test_lm_head_becomes_an_exact_integer_gemm_close_to_float(built_int8_head, cpu_built):
    src, art = built_int8_head
    b = art.manifest["build"]
    assert b["lm_head"]["shape"][1] == art.manifest["dims"]["vocab_size"] == 1000
    assert art.manifest["options"]["cpu_lm_head"] == "int8"
    model = onnx.load(str(art.model_path))
    inits = {t.name for t in model.graph.initializer}
    assert b["lm_head"]["weight"] not in inits  # the float weight is gone, not stored beside the INT8 one
    assert find_lm_head(model, 1000) is None  # no float MatMul onto the vocabulary is left
    # the per-GEMM check covers the lm_head too: one more exact integer GEMM than the plain build
    plain = cpu_built("int8").manifest["build"]
    assert b["gemm_check"]["checked"] == plain["gemm_check"]["checked"] + 1 and not b["gemm_check"]["failed"]
    assert b["self_check"]["relative_rms_err"] < 1e-4 and "lm_head" in b["self_check"]["reference"]
    feeds = llama_feeds(3, 10, 1000, n=1, seed=7)[0]
    got = _logits(art.model_path, art.manifest["runtime"], feeds)
    ref = _logits(src.model_path, feeds=feeds)
    float_head = _logits(cpu_built("int8").model_path, cpu_built("int8").manifest["runtime"], feeds)
    err = _rel_rms(got, ref)
    assert 1e-6 < err < 0.03, err  # INT8 rounding of the lm_head: visible, but small
    assert _rel_rms(float_head, ref) < 1e-4  # the default build keeps the artifact's own values
    # per token: a row of large activations does not coarsen the others (per-tensor scaling would)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_lm_head_option_is_refused_where_it_cannot_apply(quantized, exported, tmp_path):
    with pytest.raises(OptionError, match="FP32 graph"):
        build(quantized("int8", "fp16"), "cpu", tmp_path / "a", BuildOptions(cpu_lm_head="int8"))
    with pytest.raises(OptionError, match="no float lm_head"):
        build(exported("bert"), "cpu", tmp_path / "b", BuildOptions(cpu_lm_head="int8"))
    with pytest.raises(OptionError, match="cpu target"):
        build(quantized("int8"), "sm_90", tmp_path / "c", BuildOptions(cpu_lm_head="int8"))
    with pytest.raises(OptionError, match="not one of"):
        BuildOptions(cpu_lm_head="int4").check(__import__("trtforge.engines.targets", fromlist=["x"]).resolve_target("cpu"))
    assert not any((tmp_path / n).exists() for n in "abc")


def test_cli_flag_and_recipe_key(quantized, tmp_path):
    r = CliRunner().invoke(main, ["build", str(quantized("int4-weight-only").path), "-t", "cpu", "--cpu-lm-head", "int8",
                                  "-o", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.output
    assert BuildOptions.from_table({"cpu_lm_head": "int8"}).cpu_lm_head == "int8"
    r = CliRunner().invoke(main, ["build", str(quantized("int8").path), "-t", "cpu", "--cpu-lm-head", "int4",
                                  "-o", str(tmp_path / "p")])
    assert r.exit_code == 2 and "int4" in r.output
