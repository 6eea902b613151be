"""GPTQ's Hessians bounded (issue 13): layer by layer, each block's Hessians (and kept rows) are
finished, spilled to disk and freed when the block is done, ranges files are read one Hessian at a time, and GPTQ
holds one input's factor at a time; the quantized model is the same as with every Hessian held
in memory."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from trtforge.calibration import collect, get_preset, quantize
from trtforge.calibration.collect import ActivationRanges, collect_ranges
from trtforge.calibration.hessians import Hessians
from trtforge.calibration.methods import gptq as gptq_mod
from trtforge.calibration.quantize import watched_tensors
from trtforge.calibration.spill import RowsOnDisk
from trtforge.exporter import ExportOptions, Task, export_onnx
from trtforge.onnx_io import load_graph
from trtforge.textdata import build_samples, load_tokenizer

from ..conftest import DATA

CALIB = [DATA / "calib-mpl-lgpl.txt"]


@pytest.fixture(scope="module")
def art(tiny_model, tmp_path_factory):
    return export_onnx(tiny_model("llama", num_hidden_layers=3), tmp_path_factory.mktemp("lwh") / "llama",
                       ExportOptions(task=Task("causal-lm"), external_data=True))


def _samples(art):
    d = art.manifest["dims"]
    return build_samples(CALIB, load_tokenizer(art.path), mode="windows", num_samples=6, seq_len=24, seed=0,
                         max_positions=d["max_positions"], vocab_size=d["vocab_size"], text_field="text")


def test_layerwise_hessians_are_spilled_block_by_block(art, monkeypatch):
    model = load_graph(art.model_path)
    watched = watched_tensors(model)
    live: list[int] = []
    orig = collect._add_hessian

    def counting(hess, name, x):
        orig(hess, name, x)
        live.append(len(hess))  # accumulators held at once

    monkeypatch.setattr(collect, "_add_hessian", counting)
    kw = dict(batch_size=2, bins=256, keep=64, seed=0, base_dir=art.path, hessians=set(watched))
    layered = collect_ranges(model, watched, _samples(art), art.manifest["dims"], layerwise=True, **kw)
    store = layered.hessians
    assert isinstance(store, Hessians) and store.spills
    kept = [st.sample for st in layered.tensors.values() if st.sample is not None]
    assert kept and all(isinstance(k, RowsOnDisk) and k.path.exists() for k in kept)  # the rows wait on disk
    per_layer = len(watched) / art.manifest["dims"]["num_layers"]
    assert len(store) == len(watched) and max(live) <= per_layer + 1 < len(watched)
    monkeypatch.setattr(collect, "_add_hessian", orig)
    whole = collect_ranges(model, watched, _samples(art), art.manifest["dims"], layerwise=False, **kw)
    assert set(whole.hessians) == set(store)
    for name, h in whole.hessians.items():
        np.testing.assert_allclose(store[name], h, rtol=1e-4, atol=1e-5)
    assert layered.meta["hessians"]["mib"] == whole.meta["hessians"]["mib"]
    folder = store._dir
    store.close()
    assert not folder.exists()


def test_saved_hessians_are_read_one_at_a_time(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"t{i}": rng.normal(size=(k, k)).astype(np.float32) for i, k in enumerate((8, 16, 12))}
    spilled = Hessians.spilled()
    for name, a in arrays.items():
        spilled.put(name, a)
    r = ActivationRanges("key", {}, hessians=spilled)
    r.save(tmp_path / "ranges.json")
    back = ActivationRanges.load(tmp_path / "ranges.json")
    assert isinstance(back.hessians, Hessians) and not back.hessians.spills
    assert list(back.hessians) == list(arrays) and back.hessians.nbytes() == sum(a.nbytes for a in arrays.values())
    for name, a in arrays.items():
        assert np.array_equal(back.hessians[name], a)
    with np.load(tmp_path / "ranges.hessians.npz") as z:  # a plain npz numpy reads
        assert sorted(z.files) == ["h0", "h1", "h2"]
    # a dict saves the same way
    ActivationRanges("key", {}, hessians=arrays).save(tmp_path / "plain.json")
    assert np.array_equal(ActivationRanges.load(tmp_path / "plain.json").hessians["t1"], arrays["t1"])


def _initializers(path):
    m = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def test_gptq_from_spilled_hessians_equals_gptq_from_memory(art, tmp_path, monkeypatch):
    """Layer by layer, int4-gptq from Hessians spilled to disk writes exactly the weights it
    writes with every Hessian held in memory (the behaviour before they were bounded), holding
    one Hessian factor at a time."""
    monkeypatch.setenv("TRTFORGE_CALIB_LAYERWISE", "1")
    recipe = get_preset("int4-gptq").replace(num_samples=8, seq_len=32)
    factors: list[int] = []
    orig = gptq_mod.GPTQ.plan_weight

    def watch(self, ctx, d, granularity, shared):
        factors.append(len(self._factors))
        return orig(self, ctx, d, granularity, shared)

    monkeypatch.setattr(gptq_mod.GPTQ, "plan_weight", watch)
    spilled = quantize(art, recipe, tmp_path / "spilled", calib=CALIB)
    assert ActivationRanges.load(spilled.path / "ranges.json").meta["layer_blocks"] >= 3
    assert max(factors) <= 1
    monkeypatch.setattr(Hessians, "spilled", classmethod(lambda cls, prefix="": cls()))  # held in memory
    held = quantize(art, recipe, tmp_path / "held", calib=CALIB)
    a, b = _initializers(spilled.model_path), _initializers(held.model_path)
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    gptq = [n["gptq"] for n in spilled.manifest["quantization"]["nodes"] if n["status"] == "quantized"]
    assert gptq and all("output_error" in g for g in gptq)


def test_layer_by_layer_progress_names_the_layer_and_windows_with_an_eta(art, caplog, monkeypatch):
    import logging

    from trtforge import progress as progress_mod

    monkeypatch.setattr(progress_mod, "LOG_EVERY_S", 0.0)  # a line per step
    model = load_graph(art.model_path)
    watched = watched_tensors(model)
    with caplog.at_level(logging.INFO, logger="trtforge.progress"):
        r = collect_ranges(model, watched, _samples(art), art.manifest["dims"], batch_size=4, bins=64, keep=8,
                           base_dir=art.path, layerwise=True)
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "trtforge.progress"]
    blocks, batches = r.meta["layer_blocks"], r.meta["batches"]
    assert len(lines) == blocks * batches
    assert f"layer block {blocks}/{blocks}, windows 5-6/6" in lines[-1] and "ETA 0s" in lines[-1]
    assert "layer block 1/" in lines[0] and "ETA" in lines[0]
    steps = [rec for rec in caplog.records if rec.name == "trtforge.progress"]
    assert steps[-1].progress == steps[-1].total == blocks * batches and steps[-1].eta_s == 0


def test_quantize_manifest_times_every_step(art, tmp_path, monkeypatch):
    monkeypatch.setenv("TRTFORGE_CALIB_LAYERWISE", "1")
    q = quantize(art, get_preset("int8-sq").replace(num_samples=4, seq_len=16), tmp_path / "q", calib=CALIB)
    t = q.manifest["timings"]
    assert {"load_s", "tokenize_s", "calibrate_s", "prepare_s", "smoothing_check_s", "quantize_s", "write_s", "check_s",
            "total_s"} <= set(t)
    assert sum(v for k, v in t.items() if k != "total_s") <= t["total_s"] + 1e-6


def test_a_quantized_graph_is_cut_with_each_layer_dequantizing_its_own_weights(art, tmp_path):
    from trtforge.calibration.layerwise import node_layers, plan_blocks, run_by_blocks
    from trtforge.ort import session

    q = quantize(art, get_preset("int8-sq").replace(num_samples=4, seq_len=16), tmp_path / "q", calib=CALIB)
    model = load_graph(q.model_path)
    outputs = [o.name for o in model.graph.output]
    layers = node_layers(model)
    dq = [k for k, n in enumerate(model.graph.node) if n.op_type == "DequantizeLinear" and n.input[0].startswith("model.layers.")]
    assert dq
    for k in dq:
        want = int(model.graph.node[k].input[0].split(".")[2])
        assert layers[k] == want, model.graph.node[k].name
    for b, nodes in enumerate(plan_blocks(model, outputs)[1:]):
        used = {i for k in nodes for i in model.graph.node[k].input if i.startswith("model.layers.")}
        assert used and all(i.startswith(f"model.layers.{b}.") for i in used), used
    rng = np.random.default_rng(0)
    cases = [{"input_ids": rng.integers(1, 100, (1, n)), "attention_mask": np.ones((1, n), np.int64),
              "position_ids": np.arange(n)[None]} for n in (5, 9)]
    cases = [{k: v for k, v in c.items() if k in {i.name for i in model.graph.input}} for c in cases]
    got = run_by_blocks(model, cases, base_dir=q.path)
    sess = session(q.model_path)
    for c, g in zip(cases, got):
        for name, want in zip(outputs, sess.run(outputs, c)):
            np.testing.assert_allclose(g[name], want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))
