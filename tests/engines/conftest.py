"""Fixtures for the build stage: tiny Q/DQ graphs, quantize-stage artifacts of a tiny LLaMA."""

from __future__ import annotations

import numpy as np
import pytest

from .qdq import llama_feeds, quantize_artifact, tiny_graph, tiny_manifest, write_artifact


@pytest.fixture
def tiny_art(tmp_path):
    """tiny_art("int8") -> OnnxArtifact of the two-GEMM graph, with a quantize-style manifest."""
    from trtforge.artifacts import OnnxArtifact

    def make(precision: str = "int8", *, dtype=np.float32, model=None, manifest=None, name: str | None = None):
        model = model if model is not None else tiny_graph(precision, dtype=dtype)
        man = manifest if manifest is not None else tiny_manifest(precision)
        folder = write_artifact(tmp_path / (name or f"tiny-{precision}-{np.dtype(dtype).name}"), model, man)
        return OnnxArtifact.open(folder)

    return make


@pytest.fixture(scope="session")
def quantized(exported, tmp_path_factory):
    """quantized("int8", dtype="fp32") -> quantize-stage artifact of the tiny LLaMA (causal-lm)."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("qdq")

    def get(precision: str, dtype: str = "fp32"):
        key = (precision, dtype)
        if key not in cache:
            art = exported("llama", task="causal-lm", dtype=dtype)
            feeds = llama_feeds(2, 16, art.manifest["dims"]["vocab_size"], n=2)
            cache[key] = quantize_artifact(art, root / f"{precision}-{dtype}", precision, feeds)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def cpu_built(quantized, exported, tmp_path_factory):
    """cpu_built("int8") -> the CPU-target build of quantized("int8") (or of the export for fp32/fp16)."""
    from trtforge.engines.build import build

    cache: dict = {}
    root = tmp_path_factory.mktemp("cpu-builds")

    def get(precision: str, dtype: str = "fp32"):
        key = (precision, dtype)
        if key not in cache:
            src = exported("llama", task="causal-lm", dtype=dtype) if precision in ("fp32", "fp16") else quantized(precision, dtype)
            cache[key] = build(src, "cpu", root / f"{precision}-{dtype}")
        return cache[key]

    return get
