from __future__ import annotations

import json
import logging

from trtforge.engines.timing_cache import default_cache_path, load_timing_cache, save_timing_cache, sidecar


def test_saved_cache_is_reused_by_the_same_version_and_gpu(tmp_path):
    p = tmp_path / "c" / "trt.cache"
    assert load_timing_cache(p, "10.13.0.35", "9.0").status == "new"
    meta = save_timing_cache(p, b"\x01cache-bytes", "10.13.0.35", "9.0", "NVIDIA H100")
    assert meta["tensorrt_version"] == "10.13.0.35" and json.loads(sidecar(p).read_text())["gpu"] == "NVIDIA H100"
    got = load_timing_cache(p, "10.13.0.35", "9.0")
    assert got.status == "loaded" and got.data == b"\x01cache-bytes"
    assert list(tmp_path.joinpath("c").iterdir()) and not [x for x in (tmp_path / "c").iterdir() if ".tmp-" in x.name]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_cache_from_another_version_is_ignored_with_a_warning(tmp_path):
    p = tmp_path / "trt.cache"
    save_timing_cache(p, b"abc", "10.12.0.36", "9.0", "NVIDIA H100")
    logger = logging.getLogger("trtforge.engines.timing_cache")
    records = _Records()
    logger.addHandler(records)  # the CLI's logging setup stops propagation to pytest's handler
    try:
        got = load_timing_cache(p, "10.13.0.35", "9.0")
    finally:
        logger.removeHandler(records)
    assert got.status == "ignored" and got.data == b""
    assert "TensorRT 10.12.0.36" in got.reason
    assert len(records.messages) == 1 and "ignored" in records.messages[0] and "10.13.0.35" in records.messages[0]
    other_gpu = load_timing_cache(p, "10.12.0.36", "8.9")
    assert other_gpu.status == "ignored" and "compute capability 9.0" in other_gpu.reason


def test_cache_without_record_or_changed_is_ignored(tmp_path):
    p = tmp_path / "trt.cache"
    p.write_bytes(b"foreign cache")
    assert "no trt.cache.json" in load_timing_cache(p, "10.13.0.35", "9.0").reason
    save_timing_cache(p, b"abc", "10.13.0.35", "9.0", "H100")
    p.write_bytes(b"abd")
    assert "do not match" in load_timing_cache(p, "10.13.0.35", "9.0").reason
    sidecar(p).write_text("{not json")
    assert load_timing_cache(p, "10.13.0.35", "9.0").status == "ignored"
    assert load_timing_cache(None, "10.13.0.35", "9.0").status == "disabled"


def test_default_path_is_keyed_by_version_and_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("TRTFORGE_CACHE", str(tmp_path))
    a = default_cache_path("10.13.0.35", "9.0")
    assert a.parent == tmp_path / "timing-caches" and "10.13.0.35" in a.name and "sm_90" in a.name
    assert a != default_cache_path("11.1.0.1", "9.0") != default_cache_path("10.13.0.35", "8.9")
