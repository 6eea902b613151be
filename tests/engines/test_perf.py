from __future__ import annotations

import copy

from trtforge.engines.perf import Latency, compare_with_reference


def _manifest(precision: str, median: float, gpu: str = "NVIDIA H100 80GB HBM3", trt: str = "10.13.0.35") -> dict:
    return {
        "precision": {"precision": precision},
        "source": {"weights_sha256": "abc"},
        "gpu": {"name": gpu, "compute_capability": "9.0"},
        "tensorrt": {"version": trt},
        "performance": {"latency": {"median_ms": median, "shapes": {"input_ids": [1, 128]}}},
    }


def test_latency_from_samples():
    lat = Latency.from_samples([3.0, 1.0, 2.0, 10.0, 2.5], {"x": [1, 2]})
    assert lat.median_ms == 2.5 and lat.p90_ms == 10.0 and lat.iterations == 5


def test_quantized_engine_slower_than_fp16_warns():
    r = compare_with_reference(_manifest("int8", 2.6), _manifest("fp16", 2.0))
    assert r["comparable"] and r["warning"]
    assert "int8 engine is 1.30x slower than the FP16 engine" in r["warning"] and "Q/DQ placement" in r["warning"]
    assert r["speedup_vs_reference"] == round(2.0 / 2.6, 3)


def test_faster_or_within_tolerance_does_not_warn():
    assert compare_with_reference(_manifest("fp8", 1.2), _manifest("fp16", 2.0))["warning"] is None
    assert compare_with_reference(_manifest("int8", 2.08), _manifest("fp16", 2.0), tolerance=0.05)["warning"] is None
    assert compare_with_reference(_manifest("fp16", 3.0), _manifest("fp16", 2.0))["warning"] is None  # not quantized


def test_not_comparable_across_gpus_versions_models_or_shapes():
    assert "timed on" in compare_with_reference(_manifest("int8", 9.0), _manifest("fp16", 2.0, gpu="NVIDIA L4"))["reason"]
    assert "TensorRT version" in compare_with_reference(_manifest("int8", 9.0), _manifest("fp16", 2.0, trt="10.12"))["reason"]
    other = _manifest("fp16", 2.0)
    other["source"]["weights_sha256"] = "def"
    assert "another model" in compare_with_reference(_manifest("int8", 9.0), other)["reason"]
    shapes = copy.deepcopy(_manifest("fp16", 2.0))
    shapes["performance"]["latency"]["shapes"] = {"input_ids": [8, 128]}
    assert "different shapes" in compare_with_reference(_manifest("int8", 9.0), shapes)["reason"]
    assert "not an unquantized" in compare_with_reference(_manifest("int8", 9.0), _manifest("int8", 2.0))["reason"]
    for r in (compare_with_reference(_manifest("int8", 9.0), _manifest("fp16", 2.0, gpu="L4")),):
        assert r["warning"] is None and r["comparable"] is False
