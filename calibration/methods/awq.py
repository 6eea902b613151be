"""INT4 weight-only (W4A16): block sizes, and AWQ's activation-aware scale and clip search.

AWQ (Lin et al., 2023): weights that meet large activations matter more, so scale input
channel j by s_j = mean|X_j|^a (normalised), quantize diag(s) W, and divide X by s (folded into
the previous op like SmoothQuant's factor, or an explicit Mul where it cannot fold). ``a`` is
searched on a grid per group of GEMMs sharing an input, by the error of the group's outputs on
the calibration rows. Then each (block, output channel) gets the clip ratio of its amax that
minimises that block's output error (AutoAWQ's ``auto_clip``; Model Optimizer's "awq_clip").
"""

from __future__ import annotations

import numpy as np

from trtforge.numerics import int4_fake


def awq_scale(
    x: np.ndarray, x_absmean: np.ndarray, ws: list[np.ndarray], block: int, grid: int
) -> tuple[np.ndarray, float, float]:
    """Best s for a group: returns (s, ratio, relative error). x: [T, K]; ws: [K, N] each."""
    x = x.astype(np.float32)
    refs = [x @ w for w in ws]
    den = sum(float(np.square(r).sum()) for r in refs) or 1e-30
    mean = np.maximum(x_absmean.astype(np.float64), 1e-8)
    best = (np.ones_like(mean), 0.0, np.inf)
    for i in range(grid):
        ratio = i / grid
        s = mean**ratio
        s = s / np.sqrt(s.max() * s.min())
        s = np.clip(s, 1e-4, 1e4)
        xs = (x / s[None, :]).astype(np.float32)
        err = 0.0
        for w, ref in zip(ws, refs):
            wq = int4_fake((w * s[:, None]).astype(np.float32), block)
            err += float(np.square(xs @ wq - ref).sum())
        if err / den < best[2]:
            best = (s, ratio, err / den)
    return best


def awq_clip(x: np.ndarray, w: np.ndarray, block: int, grid: tuple[float, ...], max_rows: int = 256) -> np.ndarray:
    """Clip ratio per (block, output channel) minimising ||X_b (W_b - Q_r(W_b))||^2.

    x: [T, K] (already divided by the AWQ scale), w: [K, N] (already multiplied by it).
    Returns [K/B, N] ratios.
    """
    k, n = w.shape
    nb = k // block
    x = x[:max_rows].astype(np.float32).reshape(-1, nb, block)  # [T, nb, B]
    wb = w.astype(np.float32).reshape(nb, block, n)  # [nb, B, N]
    amax = np.abs(wb).max(axis=1)  # [nb, N]
    best_err = np.full((nb, n), np.inf)
    best_r = np.ones((nb, n))
    for r in grid:
        scale = np.maximum(amax * r / 7.0, 1e-12)  # [nb, N]
        q = np.clip(np.rint(wb / scale[:, None, :]), -8, 7) * scale[:, None, :]
        diff = wb - q  # [nb, B, N]
        # per block: X_b @ diff_b -> [T, N]; error summed over rows
        err = _block_err(x, diff)
        better = err < best_err
        best_err[better] = err[better]
        best_r[better] = r
    return best_r


def _block_err(x: np.ndarray, diff: np.ndarray) -> np.ndarray:
    """sum_t (x[t, b, :] @ diff[b, :, n])^2 for every block b and column n -> [nb, N]."""
    nb = diff.shape[0]
    out = np.empty((nb, diff.shape[2]))
    for b in range(nb):
        y = x[:, b, :] @ diff[b]  # [T, N]
        out[b] = np.einsum("tn,tn->n", y, y)
    return out
