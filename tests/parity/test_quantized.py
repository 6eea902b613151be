"""Quantized tiny models against their FP16 reference, and --per-layer's ranking.

The tiny LLaMA has injected outlier channels (trtforge.tinymodels): the activations after each
RMSNorm carry a few channels 20-60x larger than the rest, as real LLMs do. Plain INT8 (no
SmoothQuant) therefore hurts the GEMMs that read those normalized activations (q/k/v, gate/up)
and not o_proj / down_proj; SmoothQuant repairs it.
"""

from __future__ import annotations

import pytest

from trtforge.parity import check_parity

from .conftest import CALIB_TEXT, EVAL_TEXT, copy_artifact, edit_manifest, fast_options

calibration = pytest.importorskip("trtforge.calibration")
if not hasattr(calibration, "quantize"):  # pragma: no cover - while the quantize stage is being written
    pytest.skip("trtforge.calibration.quantize is not available yet", allow_module_level=True)

NORM_READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


@pytest.fixture(scope="session")
def outlier_llama(exported):
    return (exported("llama", task="causal-lm", dtype="fp16", outliers=True),
            exported("llama", task="causal-lm", outliers=True))


def _quantized(fp32, preset: str, out):
    from trtforge.calibration import get_preset, quantize

    recipe = get_preset(preset).replace(num_samples=16, seq_len=64)
    return quantize(fp32, recipe, out, calib=[CALIB_TEXT])


@pytest.fixture(scope="session")
def smoothquant(outlier_llama, tmp_path_factory):
    return _quantized(outlier_llama[1], "int8-sq", tmp_path_factory.mktemp("quantized") / "int8-sq")


@pytest.fixture(scope="session")
def smoothquant_report(outlier_llama, smoothquant, tmp_path_factory):
    ref, _ = outlier_llama
    root = tmp_path_factory.mktemp("quantized")
    cand = smoothquant
    return check_parity(ref.path, cand.path, [EVAL_TEXT], None, root / "report", per_layer=True, options=fast_options())


def test_smoothquant_int8_gets_plausible_figures(smoothquant_report, fp16_vs_fp32, validate_report):
    rep = smoothquant_report
    report = validate_report(rep.path)
    assert report["thresholds"]["name"] == "int8"  # from the candidate's quantization.precision
    assert rep.passed, [c.message for c in rep.failures]
    logits = report["outputs"]["logits"]
    # INT8 noise: clearly above FP16 rounding, well below a broken model
    assert 20 < logits["snr_db"] < fp16_vs_fp32.content["outputs"]["logits"]["snr_db"] - 10
    assert 0.99 < logits["cosine_mean"] < 0.99999
    assert report["logits"]["top1_agreement"] > 0.9 and 0 < report["logits"]["kl_mean"] < 0.01
    assert abs(report["perplexity"]["ppl_change_pct"]) < 5
    q = report["candidate"]["quantization"]
    assert q["precision"] == "int8" and q["quantized_nodes"] > 0
    ex = report["candidate"]["runtime"]["execution"]
    assert ex["quantized_kernels"] or ex["qdq_nodes_left"]  # the Q/DQ graph really ran quantized
    ov = report["data"]["overlap"]
    assert ov["checked"] and not ov["overlaps"]  # GPL-3.0 text vs MPL/LGPL calibration text


def test_per_layer_ranks_every_quantized_layer(smoothquant_report):
    pl = smoothquant_report.content["per_layer"]
    q = smoothquant_report.content["candidate"]["quantization"]
    assert pl["method"] == "quantize one layer at a time" and pl["output"] == "logits"
    assert len(pl["layers"]) == q["quantized_nodes"]
    assert sum(x["share_pct"] for x in pl["layers"]) == pytest.approx(100.0)
    shares = [x["share_pct"] for x in pl["layers"]]
    assert shares == sorted(shares, reverse=True) and [x["rank"] for x in pl["layers"]] == list(range(1, len(shares) + 1))
    # each single-layer candidate is closer to the reference than the whole quantized model
    assert min(x["snr_db"] for x in pl["layers"]) > smoothquant_report.content["outputs"]["logits"]["snr_db"]
    assert set(pl["suggested_exclusions"]) <= {x["node"] for x in pl["layers"][:3]}
    html = (smoothquant_report.path / "report.html").read_text()
    assert "Per-layer error" in html and pl["layers"][0]["node"] in html


def test_per_layer_blames_the_layers_that_read_outliers(outlier_llama, smoothquant_report, tmp_path):
    ref, fp32 = outlier_llama
    cand = _quantized(fp32, "int8", tmp_path / "int8")  # no SmoothQuant
    rep = check_parity(ref.path, cand.path, [EVAL_TEXT], None, tmp_path / "r", per_layer=True, options=fast_options())
    layers = rep.content["per_layer"]["layers"]
    top = [x["node"] for x in layers[:4]]
    assert all(any(r in n for r in NORM_READERS) for n in top), top
    assert rep.content["per_layer"]["suggested_exclusions"]
    assert all(any(r in n for r in NORM_READERS) for n in rep.content["per_layer"]["suggested_exclusions"])
    # and the whole model is measurably worse than with SmoothQuant
    assert rep.content["outputs"]["logits"]["snr_db"] < smoothquant_report.content["outputs"]["logits"]["snr_db"] - 6
    assert "Suggested exclusions" in (rep.path / "report.md").read_text()


def test_per_layer_follows_a_cpu_build_back_to_its_ranges(outlier_llama, smoothquant, tmp_path):
    """A build carries the quantization record but not ranges.json: per-layer finds them upstream."""
    ref, _ = outlier_llama
    build = copy_artifact(smoothquant.path, tmp_path / "cpu-build")
    (build / "ranges.json").unlink()
    for extra in build.glob("ranges.*"):
        extra.unlink()

    def as_build(m):
        m.update(stage="build", upstream={"path": str(smoothquant.path)}, precision={"precision": "int8"},
                 runtime={"provider": "CPUExecutionProvider", "session_config": {}, "graph_optimization_level": "ORT_ENABLE_ALL"})

    edit_manifest(build, as_build)
    rep = check_parity(ref.path, build, [EVAL_TEXT], None, tmp_path / "r", per_layer=True,
                       options=fast_options(num_samples=4))
    assert rep.content["candidate"]["upstream"][0] == str(smoothquant.path)
    assert len(rep.content["per_layer"]["layers"]) == rep.content["candidate"]["quantization"]["quantized_nodes"]
