"""End to end on the CPU: export -> trtforge.calibration.quantize -> build --target cpu -> run."""

from __future__ import annotations

import numpy as np
import pytest

from trtforge.engines.build import build
from trtforge.ort import session

from ..conftest import DATA  # noqa: TID252
from .qdq import llama_feeds


@pytest.mark.parametrize("preset", ["int8-sq", "fp8", "int4-rtn"])
def test_real_quantized_tiny_model_builds_for_cpu(exported, tmp_path, preset):
    calibration = pytest.importorskip("trtforge.calibration")
    if not hasattr(calibration, "quantize"):
        pytest.skip("the quantize stage is not available")
    src = exported("llama", task="causal-lm")
    recipe = calibration.get_preset(preset).replace(num_samples=8, seq_len=32)
    q = calibration.quantize(src, recipe, tmp_path / "q", calib=[DATA / "calib-apache-2.0.txt"])
    art = build(q, "cpu", tmp_path / "cpu")
    assert art.manifest["precision"]["precision"] == q.precision
    rt = art.manifest["runtime"]
    feeds = llama_feeds(2, 9, art.manifest["dims"]["vocab_size"], n=1, seed=5)[0]
    got = session(art.model_path, config=rt["session_config"], optimization=rt["graph_optimization_level"]).run(None, feeds)[0]
    ref = session(q.model_path, optimization="ORT_DISABLE_ALL").run(None, feeds)[0]
    d = got.astype(np.float64) - ref
    assert np.sqrt((d ** 2).mean() / (ref.astype(np.float64) ** 2).mean()) < 5e-3
    if q.precision == "int8":
        assert art.manifest["build"]["uint8_activation_groups"] > 0
        assert art.manifest["build"]["ops_after"].get("MatMulIntegerToFloat", 0) > 0
