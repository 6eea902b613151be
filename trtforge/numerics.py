"""Quantization arithmetic in numpy, bit-compatible with ONNX QuantizeLinear/DequantizeLinear.

INT8: symmetric, zero point 0, round half to even (what QuantizeLinear does), saturating.
FP8 E4M3 (float8_e4m3fn): x / scale saturated to +-448, then rounded to nearest-even by the
cast (ml_dtypes implements the same rounding as ONNX's saturating cast).
INT4: symmetric block-wise, values in [-8, 7], scale = amax / 7 (Model Optimizer's convention).
Scales are always rounded to the graph's float type *before* weights are quantized with them,
so the stored integers and the stored scale reproduce exactly what TensorRT computes.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from trtforge.vocab import Precision

QMAX = {Precision.INT8: 127.0, Precision.FP8: 448.0, Precision.INT4: 7.0}
FP8 = ml_dtypes.float8_e4m3fn
INT4 = ml_dtypes.int4
_MIN_SCALE = {np.float32: 1e-12, np.float16: 2.0**-24}


def as_scale(amax: np.ndarray | float, qmax: float, dtype) -> np.ndarray:
    """amax / qmax rounded to ``dtype`` and kept strictly positive (TensorRT requires it)."""
    s = np.asarray(amax, np.float64) / qmax
    lo = _MIN_SCALE[np.dtype(dtype).type]
    return np.maximum(s, lo).astype(dtype)


def quantize(x: np.ndarray, scale: np.ndarray, precision: Precision) -> np.ndarray:
    """x / scale on the integer or FP8 grid (scale broadcast against x)."""
    y = x.astype(np.float32) / scale.astype(np.float32)
    if precision == Precision.INT8:
        return np.clip(np.rint(y), -128, 127).astype(np.int8)
    if precision == Precision.FP8:
        return np.clip(y, -448.0, 448.0).astype(FP8)
    if precision == Precision.INT4:
        return np.clip(np.rint(y), -8, 7).astype(INT4)
    raise ValueError(precision)


def fake_quant(x: np.ndarray, scale: np.ndarray, precision: Precision) -> np.ndarray:
    """``quantize`` then back to float32, times the scale; the integer grids in place on one
    float32 array (the values ``quantize`` gives, without its integer copy: the searches call
    this on every weight of a model, several times)."""
    if precision in (Precision.INT8, Precision.INT4):
        s = np.asarray(scale).astype(np.float32)
        lo, hi = (-128, 127) if precision == Precision.INT8 else (-8, 7)
        y = np.divide(np.asarray(x, dtype=np.float32), s)
        np.rint(y, out=y)
        np.clip(y, lo, hi, out=y)
        y *= s
        return y
    return quantize(x, scale, precision).astype(np.float32) * scale.astype(np.float32)


def weight_scales(w_kn: np.ndarray, precision: Precision, dtype) -> np.ndarray:
    """Per-output-channel scales of a [K, N] weight."""
    return as_scale(np.abs(w_kn).max(axis=0), QMAX[precision], dtype)


def block_size_for(k: int, requested: int) -> int | None:
    """The requested block size, or the largest power of two >= 16 below it that divides K."""
    b = requested
    while b >= 16:
        if k % b == 0:
            return b
        b //= 2
    return None


def int4_block_scales(w_kn: np.ndarray, block: int, dtype, clip: np.ndarray | None = None) -> np.ndarray:
    """[K/B, N] scales of a [K, N] weight, blocks along K (optionally shrunk by clip ratios)."""
    k, n = w_kn.shape
    amax = np.abs(w_kn.reshape(k // block, block, n)).max(axis=1)
    if clip is not None:
        amax = amax * clip
    return as_scale(amax, QMAX[Precision.INT4], dtype)


def int4_quantize(w_kn: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    return quantize(w_kn, np.repeat(scales, block, axis=0), Precision.INT4)


def int4_fake(w_kn: np.ndarray, block: int, dtype=np.float32, clip: np.ndarray | None = None) -> np.ndarray:
    """Round-to-nearest INT4 blocks along K, back in float: [K, N] (float32 for float32 weights;
    blocks broadcast, no repeated scale array, rounding in place)."""
    k, n = w_kn.shape
    s = int4_block_scales(w_kn, block, dtype, clip).astype(np.float32)[:, None, :]
    y = np.divide(np.asarray(w_kn).reshape(k // block, block, n), s)
    np.rint(y, out=y)
    np.clip(y, -8, 7, out=y)
    y *= s
    return y.reshape(k, n)
