"""Tensor layouts of the unified checkpoint, in numpy: INT4 packing and FP8 re-quantization.

In:  quantized integers / FP8 values as the ONNX artifact stores them (already [out, in]).
Out: the arrays the checkpoint stores.

INT4 (W4A16_AWQ): two signed 4-bit values per byte along the *output* dimension, uint8
``[out/2, in]``: byte[j, k] = (q[2j, k] & 0xF) | (q[2j+1, k] & 0xF) << 4 (even row in the low
nibble). This is Model Optimizer's ``pack_int4_in_uint8`` and what TensorRT-LLM's
W4A16_AWQ_LinearMethod reads (it transposes to [in, out/2] and casts uint8 to int8 bit-for-bit).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from trtforge.numerics import QMAX, as_scale, quantize
from trtforge.vocab import Precision

FP8 = ml_dtypes.float8_e4m3fn


def pack_int4(q: np.ndarray) -> np.ndarray:
    """[out, in] integers in [-8, 7] -> uint8 [out/2, in]."""
    q = np.asarray(q)
    if q.ndim != 2 or q.shape[0] % 2:
        raise ValueError(f"INT4 packing needs a 2-D weight with an even number of output rows, got {q.shape}")
    qi = q.astype(np.int16)
    if qi.min(initial=0) < -8 or qi.max(initial=0) > 7:
        raise ValueError("INT4 values must lie in [-8, 7]")
    nib = (qi & 0x0F).astype(np.uint8)
    return np.ascontiguousarray(nib[0::2] | (nib[1::2] << 4))


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """uint8 or int8 [out/2, in] -> int8 [out, in] (sign-extended nibbles)."""
    p = np.asarray(packed).view(np.uint8).astype(np.int16)
    lo, hi = p & 0x0F, (p >> 4) & 0x0F
    lo = np.where(lo > 7, lo - 16, lo)
    hi = np.where(hi > 7, hi - 16, hi)
    out = np.empty((p.shape[0] * 2, p.shape[1]), np.int8)
    out[0::2], out[1::2] = lo, hi
    return out


def fp8_bits(a: np.ndarray) -> np.ndarray:
    """The raw bytes of an FP8 E4M3 array (for bit-exact comparison)."""
    return np.asarray(a, FP8).view(np.uint8)


def requantize_fp8_per_tensor(weights: list[np.ndarray]) -> tuple[list[np.ndarray], np.float32]:
    """Quantize float weights to FP8 with one shared per-tensor scale amax/448 (float32).

    Used when the ONNX artifact holds per-channel FP8 scales: each weight is dequantized exactly
    and quantized again here, which is a second rounding step. One scale for all the weights the
    loader fuses (q/k/v, gate/up) means its own fused re-scaling changes nothing afterwards.
    """
    amax = max(float(np.abs(w).max()) for w in weights)
    scale = as_scale(amax, QMAX[Precision.FP8], np.float32)
    return [quantize(np.asarray(w, np.float32), scale, Precision.FP8) for w in weights], np.float32(scale)
