from __future__ import annotations

import numpy as np

from trtforge.engines.build import build
from trtforge.engines.plan import BuildOptions, Layout
from trtforge.engines.profiles import DimOverride, derive_profile
from trtforge.engines.triton import config_pbtxt, model_name_for


def _io():
    return {"inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
                       {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]}],
            "outputs": [{"name": "logits", "dtype": "float16", "shape": ["batch", "sequence", 1000]}]}


def test_config_for_a_batched_model():
    man = {"io": _io(), "dims": {"max_positions": 256}}
    prof = derive_profile(man, (DimOverride.parse("batch=1:4:16"),))
    text = config_pbtxt("llama-int8", "tensorrt_plan", man["io"], prof)
    assert 'name: "llama-int8"' in text and 'platform: "tensorrt_plan"' in text
    assert "max_batch_size: 16" in text and "kind: KIND_GPU" in text and "dynamic_batching" in text
    assert 'name: "input_ids"\n    data_type: TYPE_INT64\n    dims: [ -1 ]' in text
    assert 'name: "logits"\n    data_type: TYPE_FP16\n    dims: [ -1, 1000 ]' in text


def test_batch_not_first_everywhere_means_max_batch_size_zero():
    io = {"inputs": [{"name": "x", "dtype": "float32", "shape": [1, "sequence", 64]}],
          "outputs": [{"name": "y", "dtype": "float32", "shape": [1, "sequence", 8]}]}
    prof = derive_profile({"io": io, "dims": {"max_positions": 32}})
    text = config_pbtxt("m", "onnxruntime_onnx", io, prof)
    assert "max_batch_size: 0" in text and "dims: [ 1, -1, 64 ]" in text and "KIND_CPU" in text


def test_model_name():
    assert model_name_for({"source": {"model_type": "llama", "task": "causal-lm"}}, "int8") == "llama-causal-lm-int8"
    assert model_name_for({}, "fp16") == "model-fp16"


def test_cpu_build_with_triton_layout(quantized, tmp_path):
    src = quantized("int8")
    opts = BuildOptions(layout=Layout.TRITON, model_name="tiny-llama", profile=(DimOverride.parse("batch=1:2:4"),))
    art = build(src, "cpu", tmp_path / "repo", opts)
    assert art.manifest["model"]["file"] == "tiny-llama/1/model.onnx"
    assert (tmp_path / "repo" / "tiny-llama" / "1" / "model.onnx").is_file()
    cfg = (tmp_path / "repo" / "tiny-llama" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in cfg and "max_batch_size: 4" in cfg
    assert [p.name for p in (tmp_path / "repo").iterdir() if p.is_dir()] == ["tiny-llama"]  # one model, nothing else
    from trtforge.ort import session

    sess = session(art.model_path, config=art.manifest["runtime"]["session_config"])
    out = sess.run(None, {"input_ids": np.ones((2, 5), np.int64), "attention_mask": np.ones((2, 5), np.int64),
                          "position_ids": np.tile(np.arange(5), (2, 1))})
    assert out[0].shape == (2, 5, 1000)
