"""The layer summary on inspector JSON in TensorRT 10 and TensorRT 11 shapes.

The TensorRT 10 sample uses the keys and value strings NVIDIA's own tools read (Polygraphy's
backend/trt/util.py, trt-engine-explorer's layer.py/activations.py). TensorRT 11 replaced
``Bindings`` with ``I/O Tensors`` and split ``Format/Datatype``; its per-layer key names are
assumed (``DataType`` + ``Format``), see engines/inspector.py.
"""

from __future__ import annotations

from trtforge.engines.inspector import classify_dtype, layer_precision, quantized_kernel_warning, summarize


def _io(name, fmt, key="Format/Datatype"):
    return {"Name": name, "Location": "Device", "Dimensions": [1, 128, 96], key: fmt}


TRT10 = {
    "Layers": [
        {"Name": "Reformatting CopyNode for Input Tensor 0", "LayerType": "Reformat",
         "Inputs": [_io("x", "Row major linear FP32")], "Outputs": [_io("x'", "Row major linear FP16 format")]},
        {"Name": "/l0/attn/q/MatMul", "LayerType": "gemm", "Inputs": [_io("x", "Int8")], "Outputs": [_io("q", "Half")],
         "TacticName": "sm90_xmma_gemm_i8f16_i8i32_f32_tn_n", "Metadata": "[ONNX Layer: /l0/attn/q/MatMul]"},
        {"Name": "/l0/mlp/up/MatMul", "LayerType": "CaskGemmMatrixMultiply",
         "Inputs": [_io("h", "Row major Int8 format")], "Outputs": [_io("u", "Row major linear FP16 format")]},
        {"Name": "/l0/mlp/down/MatMul", "LayerType": "gemm", "Inputs": [_io("u", "FP8")], "Outputs": [_io("d", "Half")]},
        {"Name": "/l0/attn/softmax", "LayerType": "Softmax", "Inputs": [_io("s", "Half")], "Outputs": [_io("p", "Half")]},
        {"Name": "/l0/norm", "LayerType": "Normalization", "Inputs": [_io("r", "Float")], "Outputs": [_io("n", "Float")]},
        {"Name": "w4a16 gemm", "LayerType": "gemm", "Inputs": [_io("n", "Half")], "Outputs": [_io("o", "Half")],
         "Weights": {"Type": "Int4", "Count": 9216}},
        {"Name": "shape", "LayerType": "Shuffle", "Inputs": [_io("ids", "Int64")], "Outputs": [_io("ids2", "Int64")]},
    ],
    "Bindings": ["input_ids", "logits"],
}

TRT11 = {
    "Layers": [
        {"Name": "q_proj", "LayerType": "gemm", "Inputs": [{"Name": "x", "DataType": "INT8", "Format": "LINEAR"}],
         "Outputs": [{"Name": "q", "DataType": "HALF", "Format": "LINEAR"}]},
        {"Name": "o_proj", "LayerType": "gemm", "Inputs": [{"Name": "a", "DataType": "FP8", "Format": "LINEAR"}],
         "Outputs": [{"Name": "o", "DataType": "HALF", "Format": "LINEAR"}]},
        {"Name": "norm", "LayerType": "Normalization", "Inputs": [{"Name": "h", "DataType": "FLOAT", "Format": "LINEAR"}],
         "Outputs": [{"Name": "n", "DataType": "HALF", "Format": "LINEAR"}]},
        {"Name": "myelin", "LayerType": "kgen", "TacticName": "sm90_xmma_gemm_e4m3f16_f32_tn"},
    ],
    "I/O Tensors": [{"Name": "input_ids", "IOMode": "INPUT", "DataType": "INT64", "Dimensions": [-1, -1]}],
}


def test_dtype_strings():
    cases = {"Row major linear FP16 format": "FP16", "Half": "FP16", "Row major Int8 format": "INT8", "FP8": "FP8",
             "Row major linear BFloat16 format": "BF16", "Float": "FP32", "Row major linear FP32": "FP32",
             "kHALF": "FP16", "FLOAT": "FP32", "Int4": "INT4", "Int32": "other", "Channel major FP16 format where channel % 8 == 0": "FP16"}
    for text, want in cases.items():
        assert classify_dtype(text) == want, text
    assert classify_dtype("Something new") is None


def test_tensorrt_10_summary():
    s = summarize(TRT10)
    assert s["format"] == "tensorrt-10" and s["detailed"] and s["layers"] == 8
    assert s["by_precision"] == {"FP8": 1, "INT8": 2, "INT4": 1, "FP16": 1, "BF16": 0, "FP32": 2, "other": 1}
    assert s["quantized_layers"] == 4 and "/l0/attn/q/MatMul" in s["quantized_layer_names"]


def test_tensorrt_11_summary():
    s = summarize(TRT11)
    assert s["format"] == "tensorrt-11"
    assert s["by_precision"]["INT8"] == 1 and s["by_precision"]["FP8"] == 2 and s["by_precision"]["FP32"] == 1
    assert layer_precision(TRT11["Layers"][3]) == "FP8"  # from the tactic name alone


def test_names_only_without_detailed_verbosity():
    s = summarize({"Layers": ["Reformatting CopyNode for Input Tensor 0", "gemm_0"], "Bindings": ["x", "y"]})
    assert s["detailed"] is False and s["by_precision"]["unknown"] == 2
    assert quantized_kernel_warning(s, "int8") is None  # cannot tell, so no false alarm


def test_warning_when_no_quantized_kernel_was_chosen():
    fp16_only = {"Layers": [TRT10["Layers"][4], TRT10["Layers"][5]], "Bindings": []}
    w = quantized_kernel_warning(summarize(fp16_only), "int8")
    assert w and "no engine layer runs in INT8" in w
    assert quantized_kernel_warning(summarize(TRT10), "int8") is None
    assert quantized_kernel_warning(summarize(fp16_only), "fp16") is None
