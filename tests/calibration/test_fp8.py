"""FP8 E4M3 calibration: the MSE threshold on FP8's own grid, and smoothing that FP8 only takes where it helps."""

from __future__ import annotations

import numpy as np

from trtforge.calibration.methods.smoothquant import choose_smoothing, relative_gemm_error
from trtforge.calibration.patterns import Group
from trtforge.calibration.stats import TensorStats, amax_from_rows, choose_amax
from trtforge.numerics import as_scale, fake_quant
from trtforge.vocab import Precision


def _fp8_err(a: np.ndarray, t: float) -> float:
    return float(np.square(fake_quant(a, as_scale(t, 448.0, np.float32), Precision.FP8) - a).sum())


def _stats(a: np.ndarray) -> TensorStats:
    st = TensorStats("x", channels=0, bins=2048, keep=0)
    st.update(a.reshape(-1, 1).astype(np.float32))
    return st


def test_fp8_mse_keeps_the_tail_that_int8_mse_clips():
    rng = np.random.default_rng(0)
    a = np.abs(rng.standard_t(3, 200_000)).astype(np.float32)  # heavy tailed, like LLM activations
    st = _stats(a)
    t8 = choose_amax(st, "mse", qmax=127.0)
    tf = choose_amax(st, "mse", qmax=448.0)
    # INT8's uniform grid pays for range: its MSE threshold clips the tail hard; FP8's relative
    # rounding error is the same at every scale, so clipping buys nothing there
    assert t8 < 0.7 * st.absmax
    assert 0.8 * st.absmax <= tf <= st.absmax and tf > t8
    assert _fp8_err(a, tf) <= _fp8_err(a, st.absmax) * 1.01


def _group(k: int) -> Group:
    return Group(act="x", gemms=["g0", "g1"], channels=k, fold="norm")


def test_fp8_smoothing_never_adds_error_and_is_skipped_without_outliers():
    rng = np.random.default_rng(2)
    k = 64
    x = rng.standard_normal((256, k)).astype(np.float32)
    ws = [rng.standard_normal((k, 48)).astype(np.float32) * 0.05 for _ in range(2)]
    xmax = np.abs(x).max(axis=0)
    ident = relative_gemm_error(x, ws, np.ones(k), Precision.FP8, float(xmax.max()))
    sm = choose_smoothing(_group(k), ws, xmax, x.astype(np.float16), Precision.FP8, None, (0.3, 0.5, 0.7, 0.9))
    assert sm is None or sm.error < ident
    # INT8 keeps smoothing every group (its grid pays for range everywhere): unchanged behaviour
    sm8 = choose_smoothing(_group(k), ws, xmax, x.astype(np.float16), Precision.INT8, None, (0.3, 0.5, 0.7, 0.9))
    assert sm8 is not None and sm8.alpha in (0.3, 0.5, 0.7, 0.9)


def test_fp8_smoothing_taken_where_one_channel_would_flush_the_others():
    rng = np.random.default_rng(3)
    k = 64
    x = rng.standard_normal((256, k)).astype(np.float32) * 0.01
    x[:, 5] *= 3e5  # a massive-activation channel: 2^17 times the rest, past E4M3's normal range
    ws = [rng.standard_normal((k, 48)).astype(np.float32) * 0.05 for _ in range(2)]
    xmax = np.abs(x).max(axis=0)
    ident = relative_gemm_error(x, ws, np.ones(k), Precision.FP8, float(xmax.max()))
    sm = choose_smoothing(_group(k), ws, xmax, x.astype(np.float16), Precision.FP8, None, (0.3, 0.5, 0.7, 0.9))
    assert sm is not None and sm.error < 0.5 * ident
    # the search scores the weight scales the recipe stores: with one per tensor, shared by the
    # group, a factor that blows up one weight row costs the other rows their range, and the
    # per-channel score would not see it
    pt = relative_gemm_error(x, ws, sm.s, Precision.FP8, float(np.max(xmax / sm.s)), per_tensor=True)
    assert pt > 1.5 * sm.error
    smt = choose_smoothing(_group(k), ws, xmax, x.astype(np.float16), Precision.FP8, None, (0.3, 0.5, 0.7, 0.9),
                           per_tensor=True)
    assert smt is not None and smt.error < pt and smt.error < ident
    rows = x.astype(np.float16).astype(np.float32)  # the kept rows are float16
    assert smt.error == relative_gemm_error(rows, ws, smt.s, Precision.FP8, float(np.max(xmax / smt.s)), per_tensor=True)


def test_int8_alpha_search_scores_with_the_range_the_recipe_uses():
    """With a clipping range method (percentile / mse on the kept rows), each alpha is scored with
    the range X / s will get, not with its max: the chosen factor's recorded error is that one."""
    rng = np.random.default_rng(4)
    k = 64
    x = rng.standard_t(3, (512, k)).astype(np.float32)  # heavy-tailed tokens
    x[:, 3] *= 20.0
    ws = [rng.standard_normal((k, 48)).astype(np.float32) * 0.05 for _ in range(2)]
    xmax = np.abs(x).max(axis=0)
    grid = (0.3, 0.5, 0.7, 0.9)
    rows = x.astype(np.float16).astype(np.float32)
    by_max = choose_smoothing(_group(k), ws, xmax, x.astype(np.float16), Precision.INT8, None, grid)
    for method in ("mse", "percentile"):
        sm = choose_smoothing(_group(k), ws, xmax, x.astype(np.float16), Precision.INT8, None, grid,
                              range_method=method)
        amax = min(amax_from_rows(rows / sm.s[None, :], method, 99.99, 127.0), float(np.max(xmax / sm.s)))
        assert sm.error == relative_gemm_error(rows, ws, sm.s, Precision.INT8, amax)
        # at least as good as the alpha chosen for the max range, then given this method's range
        # (what the search did before it scored the range it uses)
        before = min(amax_from_rows(rows / by_max.s[None, :], method, 99.99, 127.0), float(np.max(xmax / by_max.s)))
        assert sm.error <= relative_gemm_error(rows, ws, by_max.s, Precision.INT8, before)
