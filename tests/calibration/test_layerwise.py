"""Layer-by-layer calibration (calibration/layerwise.py) on tiny models forced into external data:
the statistics equal the whole-graph probe's, each block's session holds only its layers' weights,
and nothing is left on disk."""

from __future__ import annotations

import numpy as np
import pytest

from trtforge.calibration.collect import collect_ranges
from trtforge.calibration.layerwise import node_layers, plan_blocks, wants_layerwise
from trtforge.exporter import ExportOptions, Task, export_onnx
from trtforge.onnx_io import load_graph
from trtforge.textdata import build_samples, load_tokenizer

from ..conftest import DATA


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    out = {}

    def get(preset, **kw):
        key = (preset, tuple(sorted(kw.items())))
        if key not in out:
            art = export_onnx(tiny_model(preset, **kw), tmp_path_factory.mktemp("lw") / preset,
                              ExportOptions(task=Task("causal-lm"), external_data=True))
            model = load_graph(art.model_path)
            dims = art.manifest["dims"]
            watched = sorted({n.input[0] for n in model.graph.node if n.op_type == "MatMul"})
            samples = build_samples([DATA / "calib-mpl-lgpl.txt"], load_tokenizer(art.path), mode="windows",
                                    num_samples=6, seq_len=24, seed=0, max_positions=dims["max_positions"],
                                    vocab_size=dims["vocab_size"], text_field="text")
            out[key] = (art, model, dims, watched, samples)
        return out[key]
    return get


@pytest.mark.parametrize("preset,per_block,layers", [("llama", 1, 5), ("qwen3", 1, None), ("gemma3_text", 2, None)])
def test_layerwise_ranges_equal_the_whole_graph(setup, preset, per_block, layers, tmp_path):
    # five layers: what the first blocks spill must outlive later blocks' files (the mask, rotary)
    art, model, dims, watched, samples = setup(preset, **({"num_hidden_layers": layers} if layers else {}))
    kw = dict(batch_size=2, bins=256, keep=64, seed=0, base_dir=art.path)
    whole = collect_ranges(model, watched, samples, dims, layerwise=False, **kw)
    layered = collect_ranges(model, watched, samples, dims, layerwise=True, layers_per_block=per_block, **kw)
    assert "layer_blocks" in layered.meta and "layer_blocks" not in whole.meta
    assert layered.meta["layer_blocks"] >= 2
    assert list(layered.tensors) == list(whole.tensors)
    for name, w in whole.tensors.items():
        lw = layered.tensors[name]
        assert lw.count == w.count
        assert lw.absmax == pytest.approx(w.absmax, rel=1e-5, abs=1e-6), name
        if w.channel_absmax is not None:
            np.testing.assert_allclose(lw.channel_absmax, w.channel_absmax, rtol=1e-5, atol=1e-6)
        if w.sample is not None:
            np.testing.assert_allclose(lw.sample, w.sample, rtol=1e-5, atol=1e-6)
        if w.hist is not None:  # a value on a bin edge may land in the next bin
            assert np.abs(lw.hist - w.hist).sum() <= max(2, 1e-3 * w.hist.sum()), name



def test_layerwise_accumulates_the_same_hessians(setup):
    """GPTQ on a model calibrated layer by layer gets the X^T X of the whole-graph probe."""
    art, model, dims, watched, samples = setup("llama")
    kw = dict(batch_size=2, bins=256, keep=64, seed=0, base_dir=art.path, hessians=set(watched[:3]))
    whole = collect_ranges(model, watched, samples, dims, layerwise=False, **kw)
    layered = collect_ranges(model, watched, samples, dims, layerwise=True, **kw)
    assert set(layered.hessians) == set(whole.hessians) == set(watched[:3])
    for name, h in whole.hessians.items():
        np.testing.assert_allclose(layered.hessians[name], h, rtol=1e-4, atol=1e-5)
    assert layered.meta["hessians"]["tensors"] == 3

def test_blocks_follow_the_layers(setup):
    art, model, dims, watched, samples = setup("llama")
    layers = node_layers(model)
    names = [n.name for n in model.graph.node]
    assert all(layers[k] == 0 for k, n in enumerate(names) if "/layers.0/" in n)
    assert all(layers[k] == 1 for k, n in enumerate(names) if "/layers.1/" in n)
    assert all(layers[k] == -1 for k, n in enumerate(names) if "embed_tokens" in n)
    blocks = plan_blocks(model, watched, 1)
    assert len(blocks) == dims["num_layers"] + 1  # the embedding block, then one per layer (norm and lm_head join the last)
    # each block reads only its own layer's weights
    for b, nodes in enumerate(blocks[1:]):
        used = {i for k in nodes for i in model.graph.node[k].input if i.startswith("model.layers.")}
        assert used and all(i.startswith(f"model.layers.{b}.") for i in used), used


def test_layerwise_is_chosen_by_size_or_the_environment(monkeypatch):
    monkeypatch.setenv("TRTFORGE_CALIB_LAYERWISE", "1")
    assert wants_layerwise(1)
    monkeypatch.setenv("TRTFORGE_CALIB_LAYERWISE", "0")
    assert not wants_layerwise(1 << 50)
    monkeypatch.delenv("TRTFORGE_CALIB_LAYERWISE")
    assert wants_layerwise(1 << 50) and not wants_layerwise(1 << 20)
    assert wants_layerwise(3 << 30)  # over 2 GiB (the 1.17B model's 4.4 GB) whatever the memory


def test_spilled_activations_are_removed(setup, tmp_path):
    art, model, dims, watched, samples = setup("llama")
    spill = tmp_path / "spill"
    from trtforge.calibration.collect import batches
    from trtforge.calibration.layerwise import layer_stats

    stats, meta = layer_stats(model, watched, samples, dims, groups=batches(samples, 2), base_dir=art.path,
                              spill_dir=spill, bins=64, keep=8)
    assert set(stats) == set(watched)
    assert list(spill.iterdir()) == []
