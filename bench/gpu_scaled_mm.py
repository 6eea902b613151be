"""Does a real Hopper GEMM compute what our CPU emulation of the Q/DQ graph computes?

For real (activation rows, weight) pairs of all-MiniLM-L6-v2 (saved by ``--prepare`` from a
trtforge quantization run), this script
1. computes trtforge's scales (per-tensor activation, per-channel weight) and quantized values
   with ``trtforge.numerics`` (the code the quantize stage uses);
2. computes the reference the way the Q/DQ ONNX graph defines it: dequantize both operands and
   multiply in float64 (exact for these operands), and the same graph in ONNX Runtime (CPU);
3. runs the same integers / FP8 values through ``torch._scaled_mm`` (FP8 E4M3) and
   ``torch._int_mm`` (INT8) on the GPU and compares;
4. checks that PyTorch's own FP8 cast of x/scale gives bit-identical FP8 values to ours.

Usage:  python bench/gpu_scaled_mm.py --prepare OUT.npz   (here, CPU: extracts the pairs)
        python bench/gpu_scaled_mm.py PAIRS.npz --json RESULT.json   (on the GPU machine)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np


def prepare(out: Path, export_dir: Path, ranges: Path, names: list[str]) -> None:
    import onnx
    from onnx import numpy_helper

    from trtforge.calibration import ActivationRanges
    from trtforge.calibration.patterns import find_gemms

    model = onnx.load(str(export_dir / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    r = ActivationRanges.load(ranges)
    arrays = {}
    for g in find_gemms(model):
        if not any(n in g.node for n in names):
            continue
        st = r.tensors[g.act]
        key = g.node.strip("/").replace("/", ".")
        arrays[f"{key}|x"] = st.sample.astype(np.float32)
        arrays[f"{key}|w"] = numpy_helper.to_array(inits[g.weight]).astype(np.float32)  # [K, N]
    np.savez_compressed(out, **arrays)
    print(f"wrote {len(arrays) // 2} pairs to {out}")


def ort_qdq(x, w, sx, sw, precision):
    """The Q/DQ MatMul graph trtforge writes, run by ONNX Runtime (CPU)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from trtforge.calibration.recipe import Precision
    from trtforge.numerics import quantize

    p = Precision(precision)
    wq = quantize(w, sw[None, :], p)
    zp_t = TensorProto.INT8 if p == Precision.INT8 else TensorProto.FLOAT8E4M3FN
    inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(sw, "sw"),
             numpy_helper.from_array(np.asarray(sx, np.float32), "sx"), helper.make_tensor("zp", zp_t, [], [0])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "sw"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.shape[0], w.shape[1]])], inits)
    # IR 10: readable by every onnxruntime that runs opset 19 (newer onnx writes IR 13+)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=10)
    so = ort.SessionOptions()
    # Plain Q/DQ semantics: onnxruntime 1.30 fuses an FP8 Q/DQ MatMul into MatMulIntegerToFloat
    # and then rejects its own graph (seen on the GPU machine's onnxruntime 1.30; 1.32 is fine).
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def check(pairs: Path) -> dict:
    import ml_dtypes
    import torch

    from trtforge.calibration.recipe import Precision
    from trtforge.numerics import QMAX, as_scale, quantize, weight_scales

    dev = torch.device("cuda")
    z = np.load(pairs)
    keys = sorted({k.split("|")[0] for k in z.files})
    results = []
    for key in keys:
        x, w = z[f"{key}|x"], z[f"{key}|w"]
        m = (x.shape[0] // 16) * 16
        x = np.ascontiguousarray(x[:m])
        row = {"gemm": key, "M": m, "K": w.shape[0], "N": w.shape[1], "x_absmax": float(np.abs(x).max())}
        for precision in (Precision.FP8, Precision.INT8):
            sx = as_scale(np.abs(x).max(), QMAX[precision], np.float32)
            sw = weight_scales(w, precision, np.float32)
            xq, wq = quantize(x, sx, precision), quantize(w, sw[None, :], precision)
            # reference: the Q/DQ graph's definition, exact in float64
            ref = (xq.astype(np.float64) * float(sx)) @ (wq.astype(np.float64) * sw[None, :].astype(np.float64))
            float_ref = x.astype(np.float64) @ w.astype(np.float64)
            ort_y = ort_qdq(x, w, sx, sw, precision.value)
            entry = {"quant_vs_float_rel_err": rel(ref, float_ref), "ort_cpu_vs_ref": rel(ort_y, ref)}
            if precision == Precision.FP8:
                # PyTorch's cast of x/scale must produce the same FP8 bytes as ours
                t_fp8 = (torch.from_numpy(x).to(dev) / float(sx)).clamp(-448, 448).to(torch.float8_e4m3fn)
                ours = xq.view(np.uint8)
                entry["fp8_cast_bit_identical"] = bool((t_fp8.view(torch.uint8).cpu().numpy() == ours).all())
                a = torch.from_numpy(xq.view(np.uint8)).to(dev).view(torch.float8_e4m3fn)
                b = torch.from_numpy(np.ascontiguousarray(wq.T).view(np.uint8)).to(dev).view(torch.float8_e4m3fn).t()
                sa = torch.tensor(float(sx), device=dev)
                # per-tensor scales, FP32 output: the scalar weight scale is applied after
                one = torch.tensor(1.0, device=dev)
                y = torch._scaled_mm(a, b, scale_a=sa, scale_b=one, out_dtype=torch.float32)
                y = (y * torch.from_numpy(sw).to(dev)[None, :]).cpu().numpy()
                entry["gpu_scaled_mm_tensorwise_fp32_vs_ref"] = rel(y, ref)
                try:  # rowwise scales (our per-channel weight scales inside the GEMM)
                    sa_r = torch.full((m, 1), float(sx), device=dev)
                    sb_r = torch.from_numpy(sw).to(dev)[None, :].contiguous()
                    yr = torch._scaled_mm(a, b, scale_a=sa_r, scale_b=sb_r, out_dtype=torch.bfloat16)
                    entry["gpu_scaled_mm_rowwise_bf16_vs_ref"] = rel(yr.float().cpu().numpy(), ref)
                except RuntimeError as exc:
                    entry["gpu_scaled_mm_rowwise_bf16_vs_ref"] = f"not supported: {str(exc).splitlines()[0]}"
                entry["bf16_rounding_bound"] = 2.0**-8
            else:
                a = torch.from_numpy(xq).to(dev)
                b = torch.from_numpy(np.ascontiguousarray(wq)).to(dev)
                acc = torch._int_mm(a, b)  # int32 accumulate
                y = acc.double() * float(sx) * torch.from_numpy(sw).to(dev).double()[None, :]
                entry["gpu_int_mm_vs_ref"] = rel(y.cpu().numpy(), ref)
                entry["int32_accumulator_exact"] = bool(
                    (acc.cpu().numpy().astype(np.int64) == xq.astype(np.int64) @ wq.astype(np.int64)).all())
            row[precision.value] = entry
        results.append(row)
    return {
        "device": torch.cuda.get_device_name(0),
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "torch": torch.__version__,
        "ml_dtypes": ml_dtypes.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "pairs": results,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("pairs", nargs="?", type=Path)
    ap.add_argument("--prepare", type=Path)
    ap.add_argument("--export", type=Path)
    ap.add_argument("--ranges", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.prepare:
        names = ["layer.0/attention/self/query", "layer.0/intermediate", "layer.0/output/dense",
                 "layer.5/attention/output", "layer.3/output/dense"]
        prepare(args.prepare, args.export, args.ranges, names)
        return 0
    res = check(args.pairs)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
