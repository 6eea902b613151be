"""The GPU build path up to the TensorRT seam, with ``engines._trt`` replaced by a recording fake.

Everything ``build()`` does around TensorRT is checked here on the CPU: the plan handed to the
adapter, the files and manifest written, the timing cache saved and reused, the Triton layout,
the latency comparison with an FP16 engine, and that a failed build leaves nothing behind. The
fake returns inspector JSON in the TensorRT 10 shape (see test_inspector.py).
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import trtforge.engines as engines_pkg
import trtforge.env as env
from trtforge.artifacts import EngineArtifact, sha256_file
from trtforge.engines.build import build
from trtforge.engines.check import Machine, check_engine
from trtforge.engines.plan import BuildOptions, Layout
from trtforge.engines.profiles import DimOverride
from trtforge.env import Gpu
from trtforge.errors import BuildError

from ..conftest import leftovers  # noqa: TID252
from .test_inspector import TRT10

H100 = Gpu(0, "NVIDIA H100 80GB HBM3", "9.0")


class FakeTrt:
    """Stands in for engines/_trt.py: records what it is asked, returns canned results."""

    def __init__(self, latency_ms: float = 2.0, layers: dict | None = None, fail: bool = False) -> None:
        self.latency_ms, self.layers, self.fail = latency_ms, layers or TRT10, fail
        self.plans, self.caches, self.feeds = [], [], []

    def version(self) -> str:
        return "10.13.0.35"

    def build(self, plan, cache: bytes):
        self.plans.append(plan)
        self.caches.append(cache)
        if self.fail:
            raise BuildError("TensorRT could not build the engine: error: simulated", "none")
        return SimpleNamespace(engine=b"PLAN" + plan.precision.precision.encode(), layers=self.layers,
                               timing_cache=b"cache-after-build-%d" % len(self.plans), version=self.version(),
                               io=[{"name": "x", "mode": "INPUT", "dtype": "FLOAT", "shape": [-1, 64]}],
                               log=["warning: simulated"], build_s=1.25)

    def measure(self, engine: bytes, feeds: dict, *, iterations: int, version_compatible: bool = False):
        self.feeds.append({k: v.shape for k, v in feeds.items()})
        return [self.latency_ms] * iterations


@pytest.fixture
def fake_trt(monkeypatch, tmp_path):
    def install(**kw) -> FakeTrt:
        fake = FakeTrt(**kw)
        monkeypatch.setitem(sys.modules, "trtforge.engines._trt", fake)
        monkeypatch.setattr(engines_pkg, "_trt", fake, raising=False)
        return fake

    monkeypatch.setattr(env, "tensorrt_status", lambda: {"available": True, "version": "10.13.0.35"})
    monkeypatch.setattr(env, "gpus", lambda: [H100])
    monkeypatch.setenv("TRTFORGE_CACHE", str(tmp_path / "cache"))
    return install


def test_engine_folder_and_manifest(tiny_art, fake_trt, tmp_path):
    fake = fake_trt()
    opts = BuildOptions(profile=(DimOverride.parse("batch=1:4:16"),), benchmark_iterations=7)
    art = build(tiny_art("int8"), "hopper", tmp_path / "eng", opts)
    assert isinstance(art, EngineArtifact)
    m = art.manifest
    assert (m["kind"], m["stage"]) == ("engine", "build")
    assert m["tensorrt"]["version"] == "10.13.0.35" and m["gpu"] == {"name": H100.name, "compute_capability": "9.0", "index": 0}
    assert m["plan"]["network"]["flags"] == ["STRONGLY_TYPED"] and m["plan"]["profiles"][0]["symbols"]["batch"] == [1, 4, 16]
    assert m["engine"]["sha256"] == sha256_file(tmp_path / "eng" / "model.plan") and m["engine"]["bytes"] == 8
    assert m["upstream"]["model_sha256"] and m["timings"]["build_s"] == 1.25
    assert m["layers"]["summary"]["by_precision"]["INT8"] == 2
    assert json.loads((tmp_path / "eng" / "layers.json").read_text()) == TRT10
    assert m["performance"]["latency"]["median_ms"] == 2.0 and m["performance"]["latency"]["iterations"] == 7
    assert fake.feeds[0] == {"x": (4, 64)}  # timed at the profile's opt shape
    (shape,) = fake.plans[0].profile.inputs
    assert (shape.min, shape.opt, shape.max) == ((1, 64), (4, 64), (16, 64))
    assert m["io"]["inputs"][0]["name"] == "x" and m["quantization"]["precision"] == "int8"
    assert check_engine(art, Machine("10.13.0.35", (H100,), None)).loads


def test_timing_cache_is_saved_then_reused(tiny_art, fake_trt, tmp_path):
    fake = fake_trt()
    a = build(tiny_art("int8"), "sm_90", tmp_path / "a")
    assert a.manifest["timing_cache"]["status"] == "new" and fake.caches[0] == b""
    cache = tmp_path / "cache" / "timing-caches" / "trt-10.13.0.35-sm_90.cache"
    assert a.manifest["timing_cache"]["path"] == str(cache) and cache.read_bytes() == b"cache-after-build-1"
    b = build(tiny_art("int8"), "sm_90", tmp_path / "b")
    assert b.manifest["timing_cache"]["status"] == "loaded" and fake.caches[1] == b"cache-after-build-1"
    build(tiny_art("int8"), "sm_90", tmp_path / "c", BuildOptions(use_timing_cache=False))
    assert fake.caches[2] == b"" and cache.read_bytes() == b"cache-after-build-2"


def test_triton_layout_for_engines(tiny_art, fake_trt, tmp_path):
    fake_trt()
    art = build(tiny_art("int8"), "sm_90", tmp_path / "repo",
                BuildOptions(layout=Layout.TRITON, model_name="tiny", profile=(DimOverride.parse("batch=1:8:32"),)))
    assert art.engine_path == tmp_path / "repo" / "tiny" / "1" / "model.plan" and art.engine_path.read_bytes() == b"PLANint8"
    cfg = (tmp_path / "repo" / "tiny" / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in cfg and "max_batch_size: 32" in cfg and "dims: [ 64 ]" in cfg


def test_quantized_engine_slower_than_fp16_is_flagged(tiny_art, fake_trt, tmp_path):
    fake_trt(latency_ms=1.0)
    fp16 = build(tiny_art("fp32", dtype=np.float16, name="fp16"), "sm_90", tmp_path / "fp16-engine")
    assert fp16.manifest["precision"]["precision"] == "fp16"
    fake_trt(latency_ms=1.5)
    slow = build(tiny_art("int8"), "sm_90", tmp_path / "int8", BuildOptions(reference_engine=fp16.path))
    ref = slow.manifest["performance"]["reference"]
    assert ref["comparable"] and ref["speedup_vs_reference"] == round(1 / 1.5, 3)
    assert any("1.50x slower than the FP16 engine" in w for w in slow.manifest["warnings"])
    fake_trt(latency_ms=0.6)
    fast = build(tiny_art("int8"), "sm_90", tmp_path / "int8b", BuildOptions(reference_engine=fp16.path))
    assert fast.manifest["warnings"] == []


def test_no_quantized_layers_is_a_warning(tiny_art, fake_trt, tmp_path):
    fake_trt(layers={"Layers": [TRT10["Layers"][4]], "Bindings": []})
    art = build(tiny_art("int8"), "sm_90", tmp_path / "e")
    assert any("no engine layer runs in INT8" in w for w in art.manifest["warnings"])


def test_failed_build_leaves_nothing(tiny_art, fake_trt, tmp_path):
    fake_trt(fail=True)
    with pytest.raises(BuildError, match="simulated"):
        build(tiny_art("int8"), "sm_90", tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert not (tmp_path / "cache").exists()  # no cache written for a failed build
