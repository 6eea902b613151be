"""Streaming activation statistics and the amax each calibration method picks from them.

Memory stays bounded however many samples run: per tensor a running absmax, per-channel
absmax and mean |x|, a fixed-size histogram of |x| that re-bins (merging neighbours) when a
larger value arrives, and a reservoir of at most ``keep`` token rows (for SmoothQuant's
automatic alpha and AWQ's search). Nothing else of the activations is kept.

Why not onnxruntime.quantization's calibrators: they give per-tensor ranges only (SmoothQuant
and AWQ need per-channel statistics and sample rows), and their histogram collector keeps
unmerged per-batch histograms of every tensor.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

from trtforge.errors import CalibrationError

INT8_MAX = 127.0
FP8_MAX = 448.0


@dataclass
class TensorStats:
    name: str
    channels: int
    bins: int = 2048
    keep: int = 512
    seed: int = 0
    count: int = 0  # rows (tokens) seen
    absmax: float = 0.0
    channel_absmax: np.ndarray | None = None
    channel_abssum: np.ndarray | None = None
    hist: np.ndarray | None = None
    hist_max: float = 0.0
    sample: np.ndarray | None = None  # [<=keep, channels] float16
    _rng: np.random.Generator | None = field(default=None, repr=False)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        rows = x.reshape(-1, self.channels) if self.channels else x.reshape(-1, 1)
        if not np.isfinite(rows).all():
            raise FloatingPointError(self.name)
        a = np.abs(rows)
        cmax = a.max(axis=0)
        csum = a.sum(axis=0, dtype=np.float64)
        if self.channel_absmax is None:
            self.channel_absmax = cmax
            self.channel_abssum = csum
        else:
            np.maximum(self.channel_absmax, cmax, out=self.channel_absmax)
            self.channel_abssum += csum
        bmax = float(cmax.max()) if cmax.size else 0.0
        self.absmax = max(self.absmax, bmax)
        self._hist_add(a.reshape(-1), bmax)
        self._reservoir(rows)
        self.count += rows.shape[0]

    # -- histogram of |x| over [0, hist_max], widened by powers of two (exact bin merges)
    def _hist_add(self, a: np.ndarray, bmax: float) -> None:
        if bmax <= 0.0:
            if self.hist is None:
                self.hist = np.zeros(self.bins, np.int64)
            self.hist[0] += a.size
            return
        if self.hist is None or self.hist_max <= 0.0:
            old = self.hist
            self.hist = np.zeros(self.bins, np.int64)
            self.hist_max = bmax
            if old is not None:
                self.hist[0] += old.sum()
        elif bmax > self.hist_max:
            k = math.ceil(math.log2(bmax / self.hist_max))
            f = 2**k
            if f >= self.bins:
                total = self.hist.sum()
                self.hist = np.zeros(self.bins, np.int64)
                self.hist[0] = total
            else:
                merged = self.hist.reshape(-1, f).sum(axis=1)
                self.hist = np.concatenate([merged, np.zeros(self.bins - merged.size, np.int64)])
            self.hist_max *= f
        idx = np.minimum((a * (self.bins / self.hist_max)).astype(np.int64), self.bins - 1)
        self.hist += np.bincount(idx, minlength=self.bins)

    def _reservoir(self, rows: np.ndarray) -> None:
        if self.keep <= 0:
            return
        if self._rng is None:
            # crc32, not hash(): str hashes are salted per process, and the kept rows must be the
            # same in every run (they choose SmoothQuant's alpha and AWQ's scales)
            self._rng = np.random.default_rng(self.seed + (zlib.crc32(self.name.encode()) & 0xFFFF))
        # only the rows kept are converted to float16 (a batch has thousands, the reservoir 512)
        if self.sample is None:
            self.sample = rows[: self.keep].astype(np.float16)
            start = min(self.keep, rows.shape[0])
            rest = rows[start:]
            seen = self.count + start
        else:
            rest, seen = rows, self.count
            if self.sample.shape[0] < self.keep:
                take = min(self.keep - self.sample.shape[0], rest.shape[0])
                self.sample = np.concatenate([self.sample, rest[:take].astype(np.float16)])
                rest, seen = rest[take:], seen + take
        if rest.shape[0]:
            # Algorithm R, vectorised: row i (global index seen+i) replaces slot j if j < keep.
            j = (self._rng.random(rest.shape[0]) * (seen + np.arange(1, rest.shape[0] + 1))).astype(np.int64)
            hit = j < self.keep
            self.sample[j[hit]] = rest[hit].astype(np.float16)

    @property
    def channel_absmean(self) -> np.ndarray:
        return (self.channel_abssum / max(self.count, 1)).astype(np.float32)

    # -- serialisation (JSON for statistics, arrays apart)
    def to_json(self) -> dict:
        return {
            "name": self.name,
            "channels": self.channels,
            "count": self.count,
            "absmax": self.absmax,
            "channel_absmax": self.channel_absmax.tolist() if self.channel_absmax is not None else None,
            "channel_absmean": self.channel_absmean.tolist() if self.channel_abssum is not None else None,
            "hist_max": self.hist_max,
            "hist": _rle(self.hist) if self.hist is not None else None,
        }

    @classmethod
    def from_json(cls, d: dict, sample: np.ndarray | None = None) -> TensorStats:
        s = cls(d["name"], d["channels"], bins=0)
        s.count = d["count"]
        s.absmax = d["absmax"]
        if d["channel_absmax"] is not None:
            s.channel_absmax = np.asarray(d["channel_absmax"], np.float32)
            s.channel_abssum = np.asarray(d["channel_absmean"], np.float64) * max(s.count, 1)
        s.hist_max = d["hist_max"]
        s.hist = _unrle(d["hist"]) if d["hist"] is not None else None
        s.bins = len(s.hist) if s.hist is not None else 0
        s.sample = sample
        return s



def count_batch(stats: dict[str, TensorStats], name: str, x: np.ndarray, batch: int, *,
                per_tensor: set[str] | None, bins: int, keep: int, seed: int) -> None:
    """One calibration batch's values of ``name`` into its statistics (created on first sight:
    ``per_tensor`` tensors get no per-channel statistics and no kept rows); the same for the
    whole-graph probe and the layer-by-layer one."""
    st = stats.get(name)
    if st is None:
        flat = per_tensor is not None and name in per_tensor
        st = stats[name] = TensorStats(name, 0 if flat else int(x.shape[-1]), bins=bins,
                                       keep=0 if flat else keep, seed=seed)
    try:
        st.update(x)
    except FloatingPointError:
        raise CalibrationError(
            f"activation {name} is non-finite (inf or NaN) on calibration batch {batch}",
            "the model overflows on this data: calibrate the fp32 export, or check the weights",
        ) from None


def _rle(h: np.ndarray) -> list:
    """Histograms are mostly zeros at the top: store [value, run] pairs."""
    out: list[list[int]] = []
    for v in h.tolist():
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


def _unrle(pairs: list) -> np.ndarray:
    return np.concatenate([np.full(n, v, np.int64) for v, n in pairs]) if pairs else np.zeros(0, np.int64)


# ----------------------------------------------------------------------------- amax choice


def amax_percentile(hist: np.ndarray, hist_max: float, pct: float) -> float:
    total = hist.sum()
    if total == 0:
        return 0.0
    cdf = np.cumsum(hist) / total
    i = int(np.searchsorted(cdf, pct / 100.0))
    return float(min(i + 1, len(hist)) * hist_max / len(hist))


def amax_mse(hist: np.ndarray, hist_max: float, qmax: float = INT8_MAX, start: int = 64) -> float:
    """Threshold minimising the expected squared error of uniform symmetric quantization."""
    n = len(hist)
    if hist.sum() == 0:
        return 0.0
    width = hist_max / n
    centers = (np.arange(n) + 0.5) * width
    counts = hist.astype(np.float64)
    best, best_t = math.inf, hist_max
    # candidate thresholds at bin edges from `start` bins up
    for i in range(min(start, n - 1), n + 1, max(1, n // 256)):
        t = i * width
        step = t / qmax
        inside = centers <= t
        err = (counts[inside].sum()) * step * step / 12.0
        err += (counts[~inside] * (centers[~inside] - t) ** 2).sum()
        if err < best:
            best, best_t = err, t
    return float(best_t)


def amax_mse_fp8(hist: np.ndarray, hist_max: float, steps: int = 48, per_octave: int = 8) -> float:
    """Threshold minimising the expected squared error of FP8 E4M3 quantization (scale t/448).

    E4M3's grid is floating point: its relative rounding error is the same at every scale, so
    lowering the threshold only helps where values fall below its normal range (2^-6 of the
    scale: subnormals, then zero) and always costs the clipped tail. The error of each
    histogram bin is that of FP8-rounding its centre (counts times the squared difference),
    clipping included; candidates are t = hist_max * 2^(-i/per_octave), i < steps.
    """
    n = len(hist)
    if hist.sum() == 0 or hist_max <= 0:
        return 0.0
    width = hist_max / n
    centers = (np.arange(n) + 0.5) * width
    nz = hist > 0
    c, counts = centers[nz], hist[nz].astype(np.float64)
    best, best_t = math.inf, hist_max
    for i in range(steps):
        t = hist_max * 2.0 ** (-i / per_octave)
        scale = np.float32(t / FP8_MAX)
        q = np.clip(c / scale, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * float(scale)
        err = float((counts * (q - c) ** 2).sum())
        if err < best:
            best, best_t = err, t
    return float(best_t)


def amax_entropy(hist: np.ndarray, hist_max: float, levels: int = 128) -> float:
    """TensorRT-style KL-divergence calibration on the |x| histogram (levels = 128 for INT8)."""
    n = len(hist)
    if hist.sum() == 0:
        return 0.0
    h = hist.astype(np.float64)
    best, best_i = math.inf, n
    for i in range(levels, n + 1, max(1, n // 512)):
        p = h[:i].copy()
        p[-1] += h[i:].sum()
        nz = p > 0
        # quantize the first i bins into `levels` groups, expand back over non-empty bins
        idx = (np.arange(i) * levels // i)
        q_sum = np.bincount(idx, weights=h[:i], minlength=levels)
        q_cnt = np.bincount(idx, weights=(h[:i] > 0).astype(np.float64), minlength=levels)
        q = np.where(nz, q_sum[idx] / np.maximum(q_cnt[idx], 1), 0.0)
        ps, qs = p / p.sum(), q / max(q.sum(), 1e-30)
        m = nz & (qs > 0)
        kl = float(np.sum(ps[m] * np.log(ps[m] / qs[m]))) + (1e9 if (nz & (qs == 0)).any() else 0.0)
        if kl < best:
            best, best_i = kl, i
    return float(best_i * hist_max / n)


def choose_amax(stats: TensorStats, method: str, percentile: float = 99.99, qmax: float = INT8_MAX) -> float:
    if method == "max" or stats.hist is None or stats.hist_max <= 0:
        return float(stats.absmax)
    if method == "percentile":
        return min(amax_percentile(stats.hist, stats.hist_max, percentile), stats.absmax)
    if method == "mse":
        return min(_mse(stats.hist, stats.hist_max, qmax), stats.absmax)
    if method == "entropy":
        return min(amax_entropy(stats.hist, stats.hist_max), stats.absmax)
    raise ValueError(method)


def amax_from_rows(rows: np.ndarray, method: str, percentile: float, qmax: float, bins: int = 2048) -> float:
    """The same choice made on explicit rows (e.g. smoothed samples)."""
    a = np.abs(rows.astype(np.float32)).reshape(-1)
    m = float(a.max()) if a.size else 0.0
    if method == "max" or m == 0.0:
        return m
    hist = np.bincount(np.minimum((a * (bins / m)).astype(np.int64), bins - 1), minlength=bins)
    if method == "percentile":
        return min(amax_percentile(hist, m, percentile), m)
    if method == "mse":
        return min(_mse(hist, m, qmax), m)
    return min(amax_entropy(hist, m), m)


def _mse(hist: np.ndarray, hist_max: float, qmax: float) -> float:
    """MSE on the grid qmax names: FP8 E4M3's (448) or a uniform integer grid."""
    return amax_mse_fp8(hist, hist_max) if qmax == FP8_MAX else amax_mse(hist, hist_max, qmax)
