"""Parity memory (issue 13): one model's session at a time, each batch's outputs on disk until they
are measured, the metrics computed a block of rows at a time; the figures are the ones the
whole-array float64 computation gives."""

from __future__ import annotations

import weakref

import numpy as np
import pytest

from trtforge import metrics as M
from trtforge.parity import check_parity
from trtforge.parity.run import SpilledRun

from ..conftest import DATA


def test_spilled_arrays_read_the_slabs_asked_for(tmp_path):
    a = np.arange(2 * 5 * 7, dtype=np.float32).reshape(2, 5, 7)
    run = SpilledRun(tmp_path / "r")
    run.append({"x": a, "y": a[0, 0]})
    s = run[0]["x"]
    assert s.shape == a.shape and s.dtype == a.dtype and len(run) == 1
    for key in (1, -1, (0, slice(1, 4)), (1, slice(3, None)), slice(0, 1), slice(1, 2), (0, 2), (slice(None), 3)):
        np.testing.assert_array_equal(s[key], a[key])
    np.testing.assert_array_equal(np.asarray(run[0]["y"]), a[0, 0])
    np.testing.assert_array_equal(np.asarray(s, np.float64), a.astype(np.float64))


def _oracle(refs, cands, valids):
    """The figures computed on whole arrays in float64 (sampling off)."""
    sel_r = [np.asarray(r, np.float64)[np.broadcast_to(v, r.shape)] for r, v in zip(refs, valids)]
    sel_c = [np.asarray(c, np.float64)[np.broadcast_to(v, c.shape)] for c, v in zip(cands, valids)]
    r, c = np.concatenate(sel_r), np.concatenate(sel_c)
    f = np.isfinite(r) & np.isfinite(c)
    r, c = r[f], c[f]
    floor = M.FLOOR_FRACTION * np.sqrt(np.mean(r * r))
    d = np.abs(c - r)
    rel = d / np.maximum(np.abs(r), floor)
    rows_r = np.concatenate([M.valid_rows(x, v) for x, v in zip(refs, valids)])
    rows_c = np.concatenate([M.valid_rows(x, v) for x, v in zip(cands, valids)])
    ok = np.isfinite(rows_r).all(1) & np.isfinite(rows_c).all(1)
    rows_r, rows_c = rows_r[ok], rows_c[ok]
    cos = M.row_cosine(rows_r, rows_c)
    la = rows_r - rows_r.max(1, keepdims=True)
    la -= np.log(np.exp(la).sum(1, keepdims=True))
    lb = rows_c - rows_c.max(1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(1, keepdims=True))
    kl = np.maximum((np.exp(la) * (la - lb)).sum(1), 0)
    return {"max_abs_err": d.max(), "mean_abs_err": d.mean(), "p99_abs_err": np.quantile(d, 0.99),
            "rel_err_mean": rel.mean(), "rel_err_max": rel.max(), "rel_err_p99": np.quantile(rel, 0.99),
            "cosine_mean": cos.mean(), "cosine_min": cos.min(), "snr_db": M.snr_db(float((r * r).sum()), float((d * d).sum())),
            "top1_agreement": float((rows_r.argmax(1) == rows_c.argmax(1)).mean()), "kl_mean": kl.mean(), "kl_max": kl.max()}


def test_blockwise_metrics_on_spilled_outputs_equal_the_whole_array_figures(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    refs, cands, valids = [], [], []
    for b, t in ((1, 9), (3, 6), (2, 11)):
        r = rng.standard_normal((b, t, 300)).astype(np.float32) * 4
        c = (r + rng.standard_normal(r.shape) * 0.05).astype(np.float32)
        c[0, 1, 7] = np.nan  # a non-finite value is left out everywhere
        mask = np.ones((b, t), bool)
        mask[-1, t - 2 :] = False  # padding
        refs.append(r)
        cands.append(c)
        valids.append(mask[..., None])
    want = _oracle(refs, cands, valids)
    monkeypatch.setattr(M, "SAMPLE_PER_BATCH", 10**9)  # every value kept: percentiles exact
    monkeypatch.setattr(M, "BLOCK_ELEMENTS", 700)  # blocks of two rows: many per sequence
    runs = {side: SpilledRun(tmp_path / side) for side in ("r", "c")}
    for r, c in zip(refs, cands):
        runs["r"].append({"logits": r})
        runs["c"].append({"logits": c})
    got, _ = M.output_metrics("logits", M.column(runs["r"], "logits"), M.column(runs["c"], "logits"), valids,
                              np.random.default_rng(0))
    lm, _ = M.logits_metrics(M.column(runs["r"], "logits"), M.column(runs["c"], "logits"), valids)
    got.update(lm)
    for k, v in want.items():
        assert got[k] == pytest.approx(float(v), rel=1e-9, abs=1e-12), k
    # sampling draws the same values however the batch is cut into blocks
    monkeypatch.setattr(M, "SAMPLE_PER_BATCH", 50)
    a = M.output_metrics("logits", refs, cands, valids, np.random.default_rng(1))
    monkeypatch.setattr(M, "BLOCK_ELEMENTS", 1 << 22)
    b = M.output_metrics("logits", refs, cands, valids, np.random.default_rng(1))
    assert a[1] == b[1]  # the same sampled values: the same histograms
    assert a[0] == pytest.approx(b[0], rel=1e-12)  # p99s equal; sums in another order


def test_parity_holds_one_session_at_a_time_and_leaves_no_outputs(exported, tmp_path, monkeypatch):
    from trtforge.engines.backends import cpu_ort

    ref = exported("llama", task="causal-lm")
    live: list = []
    most, created = [0], [0]
    orig = cpu_ort.session

    def tracked(*a, **k):
        s = orig(*a, **k)
        created[0] += 1
        alive = [w for w in live if w() is not None]
        most[0] = max(most[0], len(alive) + 1)
        live[:] = [*alive, weakref.ref(s)]
        return s

    monkeypatch.setattr(cpu_ort, "session", tracked)
    report = check_parity(ref, ref, [DATA / "eval-gpl-3.0.txt"], None, tmp_path / "report")
    assert report.passed
    assert created[0] == 2 and most[0] == 1  # each side loaded once, never both at once
    assert not (report.path / "_outputs").exists()
    c = report.content
    assert c["logits"]["top1_agreement"] == 1.0 and c["outputs"]["logits"]["max_abs_err"] == 0.0
    assert c["reference"]["runtime"]["providers"] == ["CPUExecutionProvider"]
    assert (report.path / "inputs.json").is_file() and (report.path / "outputs-sample.npz").is_file()


def test_the_nan_inf_verdict_matches_polygraphys():
    from polygraphy.comparator import Comparator, IterationResult, RunResults

    from trtforge.parity.run import _finite

    rng = np.random.default_rng(0)
    for bad in (None, np.nan, np.inf, -np.inf):
        a = rng.standard_normal((3, 4, 5)).astype(np.float32)
        if bad is not None:
            a[2, 1, 3] = bad
        poly = bool(Comparator.validate(RunResults([("r", [IterationResult(outputs={"x": a}, runtime=0.0, runner_name="r")])]),
                                        check_inf=True, check_nan=True))
        assert _finite(a) is poly is (bad is None)
    assert _finite(np.arange(5)) and not _finite(np.array([1.0, np.nan]))
