"""TensorRT builds on a real GPU (skipped where TensorRT or an NVIDIA GPU is missing).

FP16 engine from the FP16 export; INT8 and FP8 engines from Q/DQ graphs with FP16 scales (the
quantize stage's format). Each is compared with ONNX Runtime running the same ONNX on the CPU,
then through the parity stage against the FP16 export. These have not run in this project yet:
no machine with TensorRT was available (see docs/engines.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trtforge.artifacts import EngineArtifact
from trtforge.engines.build import build
from trtforge.engines.plan import BuildOptions, Layout
from trtforge.engines.profiles import DimOverride
from trtforge.ort import session

from ..conftest import DATA  # noqa: TID252
from .qdq import llama_feeds

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
PROFILE = (DimOverride.parse("batch=1:2:4"), DimOverride.parse("sequence=1:16:64"))


def _gpu_sm() -> int:
    from trtforge.env import gpus

    return gpus()[0].sm


@pytest.fixture(scope="module")
def engines(exported, quantized, tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    cache = tmp_path_factory.mktemp("tc") / "timing.cache"
    out = {}

    def get(precision: str):
        if precision not in out:
            src = exported("llama", task="causal-lm", dtype="fp16") if precision == "fp16" else quantized(precision, "fp16")
            ref = BuildOptions(profile=PROFILE, timing_cache=cache, benchmark_iterations=20,
                               reference_engine=out["fp16"][0].path if precision != "fp16" and "fp16" in out else None)
            out[precision] = (build(src, "auto", root / precision, ref), src)
        return out[precision]

    return get


@pytest.mark.parametrize("precision,tol", [("fp16", 1e-2), ("int8", 5e-2), ("fp8", 8e-2)])
def test_engine_matches_onnx_runtime(engines, precision, tol):
    if precision == "fp8" and _gpu_sm() < 89:
        pytest.skip("FP8 needs SM 8.9+")
    engines("fp16")  # reference engine first, so quantized builds compare latency with it
    art, src = engines(precision)
    assert isinstance(art, EngineArtifact)
    m = art.manifest
    assert m["tensorrt"]["version"] and m["gpu"]["compute_capability"]
    assert m["engine"]["sha256"] and m["upstream"]["model_sha256"]
    by = m["layers"]["summary"]["by_precision"]
    if precision == "int8":
        assert by["INT8"] > 0, m["layers"]["summary"]
    if precision == "fp8":
        assert by["FP8"] > 0, m["layers"]["summary"]
    if precision != "fp16":
        assert m["performance"]["reference"]["comparable"] is True

    from trtforge.engines import _trt

    feeds = llama_feeds(2, 16, m["dims"]["vocab_size"], n=1, seed=11)[0]
    got = _trt.run(art.engine_path.read_bytes(), feeds)["logits"].astype(np.float64)
    ref = session(src.model_path, optimization="ORT_DISABLE_ALL").run(["logits"], feeds)[0].astype(np.float64)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < tol, err


def test_timing_cache_is_reused_and_inspect_says_it_loads(engines, tmp_path):
    from click.testing import CliRunner

    from trtforge.cli import main

    art, src = engines("fp16")
    cache = Path(art.manifest["timing_cache"]["path"])
    assert cache.is_file() and cache.with_name(cache.name + ".json").is_file()
    again = build(src, "auto", tmp_path / "again", BuildOptions(profile=PROFILE, timing_cache=cache))
    assert again.manifest["timing_cache"]["status"] == "loaded"
    r = CliRunner().invoke(main, ["inspect", str(art.path), "--load"])
    assert r.exit_code == 0, r.output


def test_triton_layout_on_gpu(exported, tmp_path):
    src = exported("llama", task="causal-lm", dtype="fp16")
    art = build(src, "auto", tmp_path / "repo", BuildOptions(profile=PROFILE, layout=Layout.TRITON, model_name="llama"))
    assert (tmp_path / "repo" / "llama" / "1" / "model.plan").is_file()
    assert "max_batch_size: 4" in (tmp_path / "repo" / "llama" / "config.pbtxt").read_text()
    assert art.engine_path.name == "model.plan"


def test_parity_stage_runs_the_engine(engines, exported, tmp_path):
    parity = pytest.importorskip("trtforge.parity.check")
    art, _ = engines("int8")
    rep = parity.check_parity(exported("llama", task="causal-lm", dtype="fp16").path, art.path,
                              [DATA / "eval-gpl-3.0.txt"], None, tmp_path / "report")
    assert (tmp_path / "report" / "report.json").is_file()
    assert rep.content["headline"]


def test_int4_engine_with_int8_weight_only_fallback(exported, tmp_path):
    """An accuracy budget's INT4 artifact: INT4 block DequantizeLinear on most GEMMs, per-channel INT8
    weight-only DequantizeLinear (float activations) on the fallback ones; TensorRT builds both into
    float GEMMs and computes what ONNX Runtime computes."""
    from trtforge.calibration import get_preset, quantize

    src = exported("llama", task="causal-lm", dtype="fp16")
    recipe = get_preset("int4-rtn").replace(num_samples=4, seq_len=32, block_size=32, weight_only_int8=["*down_proj*"])
    q = quantize(src, recipe, tmp_path / "q", calib=[DATA / "calib-apache-2.0.txt"])
    assert q.manifest.quantization.extra["counts"]["fallback"] == 2
    art = build(q, "auto", tmp_path / "engine", BuildOptions(profile=PROFILE))
    from trtforge.engines import _trt

    feeds = llama_feeds(2, 16, art.manifest["dims"]["vocab_size"], n=1, seed=11)[0]
    got = _trt.run(art.engine_path.read_bytes(), feeds)["logits"].astype(np.float64)
    ref = session(q.model_path, optimization="ORT_DISABLE_ALL").run(["logits"], feeds)[0].astype(np.float64)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 5e-2
