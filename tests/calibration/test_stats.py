from __future__ import annotations

import numpy as np
import pytest

from trtforge.calibration.stats import TensorStats, amax_entropy, amax_mse, amax_percentile, choose_amax


def _stream(rng, n_batches, scale_growth=True):
    for i in range(n_batches):
        x = rng.standard_normal((4, 16, 32)).astype(np.float32)
        if scale_growth:
            x *= 1 + i  # later batches are larger: the histogram must widen
        yield x


def test_streaming_statistics_match_the_full_data():
    rng = np.random.default_rng(0)
    batches = list(_stream(rng, 12))
    st = TensorStats("x", 32, bins=2048, keep=64)
    for b in batches:
        st.update(b)
    full = np.concatenate([b.reshape(-1, 32) for b in batches])
    assert st.count == full.shape[0]
    np.testing.assert_allclose(st.channel_absmax, np.abs(full).max(0))
    np.testing.assert_allclose(st.channel_absmean, np.abs(full).mean(0), rtol=1e-5)
    assert st.absmax == pytest.approx(float(np.abs(full).max()))
    assert st.hist.sum() == full.size
    # percentile from the re-binned histogram is within one bin of the exact one
    exact = np.percentile(np.abs(full), 99.0)
    got = amax_percentile(st.hist, st.hist_max, 99.0)
    assert abs(got - exact) <= 2 * st.hist_max / st.bins
    # the reservoir holds real rows and never grows past `keep`
    assert st.sample.shape == (64, 32)
    rows = {r.tobytes() for r in full.astype(np.float16)}
    assert all(r.tobytes() in rows for r in st.sample)


def test_memory_stays_bounded_as_samples_grow():
    rng = np.random.default_rng(1)
    st = TensorStats("x", 32, bins=512, keep=16)
    sizes = []
    for x in _stream(rng, 200, scale_growth=False):
        st.update(x)
        sizes.append(st.hist.nbytes + st.sample.nbytes + st.channel_absmax.nbytes + st.channel_abssum.nbytes)
    assert sizes[-1] == sizes[10]


def test_non_finite_activations_are_reported():
    st = TensorStats("x", 4)
    with pytest.raises(FloatingPointError):
        st.update(np.array([[1.0, np.inf, 0.0, 1.0]], np.float32))


def test_methods_clip_outliers_but_max_does_not():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((20000, 8)).astype(np.float32)
    x[0, 0] = 60.0  # one outlier
    st = TensorStats("x", 8, bins=2048, keep=0)
    st.update(x)
    assert choose_amax(st, "max") == pytest.approx(60.0)
    for method in ("percentile", "mse", "entropy"):
        a = choose_amax(st, method, percentile=99.99)
        assert 3.0 < a < 40.0, (method, a)  # below the outlier, above the bulk (|x| < ~4.5)
    assert amax_mse(np.zeros(10, np.int64), 1.0) == 0.0
    assert amax_entropy(np.zeros(10, np.int64), 1.0) == 0.0


def test_json_roundtrip():
    st = TensorStats("t", 8, bins=128, keep=4)
    st.update(np.random.default_rng(3).standard_normal((10, 8)).astype(np.float32))
    back = TensorStats.from_json(st.to_json(), st.sample)
    np.testing.assert_array_equal(back.hist, st.hist)
    np.testing.assert_allclose(back.channel_absmean, st.channel_absmean, rtol=1e-6)
    assert back.absmax == st.absmax
