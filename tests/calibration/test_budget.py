"""Quantizing under an accuracy budget (calibration/budget.py) on tiny models with injected outliers.

The outliers sit in one group only (layer 1's MLP input of a LLaMA, layer 1's attention-output
LayerNorm of a BERT), so under per-tensor INT8 activations that group carries most of the error:
the search must keep exactly it, the budget must hold on the held-out samples (measured on the
written model), and the manifest must list every GEMM with its precision and sensitivity.

The decoder is calibrated on token ids sampled from the float model itself: on text drawn from
the model, the expected perplexity increase of a perturbed model is its KL divergence, so the
budget measures quantization error rather than a random model's luck on English text.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from trtforge.calibration import get_preset, quantize
from trtforge.calibration.budget import split_held_out
from trtforge.calibration.budget_spec import check_applies, parse_budget
from trtforge.cli import main
from trtforge.errors import OptionError, RecipeError
from trtforge.manifest import Manifest
from trtforge.pipeline_recipe import load_pipeline_recipe
from trtforge.textdata import Samples
from trtforge.vocab import Task

from ..conftest import DATA, one_line_error  # noqa: TID252

CH = [3, 17, 40]


def _sampled_decoder(root, edit):
    """(export, calibration .npz) of a tiny LLaMA edited by ``edit(model)`` (same function in float),
    calibrated on token ids sampled from the model itself (module docstring)."""
    import torch
    import transformers

    from trtforge.exporter import ExportOptions, export_onnx
    from trtforge.testing.tinymodels import make_model

    src = make_model("llama", root / "src", seed=1)
    m = transformers.AutoModelForCausalLM.from_pretrained(str(src)).eval()
    with torch.no_grad():
        m.model.norm.weight *= 8.0  # confident logits: the perplexity responds to hidden-state noise
        edit(m)
        torch.manual_seed(0)
        ids = m.generate(torch.randint(0, m.config.vocab_size, (24, 1)), do_sample=True, max_new_tokens=47,
                         min_new_tokens=47, top_k=0, pad_token_id=0)
    out = root / "model"
    m.save_pretrained(str(out), safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
    npz = root / "sampled.npz"
    np.savez(npz, input_ids=ids.numpy().astype(np.int64))
    return export_onnx(out, root / "export", ExportOptions()), npz


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """LLaMA with activation outliers into layers.1 gate/up, sharp logits."""
    def edit(m):
        layer = m.model.layers[1]
        layer.post_attention_layernorm.weight[CH] *= 80.0
        for lin in (layer.mlp.gate_proj, layer.mlp.up_proj):
            lin.weight[:, CH] /= 80.0

    return _sampled_decoder(tmp_path_factory.mktemp("budget-decoder"), edit)


# one input channel in every 32-wide INT4 block of layers.1 down_proj (K = 160)
WCH = [5, 37, 69, 101, 133]


@pytest.fixture(scope="module")
def weight_outliers(tmp_path_factory):
    """LLaMA whose layers.1 down_proj has 40x weight columns in every INT4 block (up_proj's rows
    divided by 40: the same function in float): INT4 rounds the rest of those blocks to zero,
    per-channel INT8 keeps ~5 levels for them."""
    def edit(m):
        mlp = m.model.layers[1].mlp
        mlp.down_proj.weight[:, WCH] *= 40.0
        mlp.up_proj.weight[WCH] /= 40.0

    return _sampled_decoder(tmp_path_factory.mktemp("budget-weights"), edit)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """BERT whose layer-1 FFN has three 40x intermediate channels (what layer 1's output dense reads)."""
    import torch
    import transformers

    from trtforge.exporter import ExportOptions, export_onnx
    from trtforge.testing.tinymodels import make_model

    root = tmp_path_factory.mktemp("budget-encoder")
    src = make_model("bert", root / "src", seed=1)
    m = transformers.AutoModel.from_pretrained(str(src)).eval()
    with torch.no_grad():
        ffn = m.encoder.layer[1]
        ffn.intermediate.dense.weight[CH] *= 40.0
        ffn.intermediate.dense.bias[CH] = 3.0
        ffn.output.dense.weight[:, CH] /= 40.0
    out = root / "model"
    m.save_pretrained(str(out), safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
    return export_onnx(out, root / "export", ExportOptions())


def _kept(q) -> set[str]:
    return {ly["name"] for ly in q.layers if ly["precision"] != q.precision.value and "budget" in ly["reason"]}


def _check_manifest(art, budget_text: str) -> dict:
    q = Manifest.from_json(json.loads((art.path / "manifest.json").read_text())).quantization
    b = q.budget
    assert b["met"] is True and b["text"] == budget_text
    for key in ("metric", "limit", "measured", "measured_all_quantized", "held_out_samples", "met"):
        assert key in b
    assert b["held_out_samples"] >= 1
    # every GEMM of the plain record is in layers, with the schema the report renders
    assert {ly["name"] for ly in q.layers} == {n["node"] for n in q.nodes}
    for ly in q.layers:
        assert set(ly) >= {"name", "group", "precision", "sensitivity", "reason", "weight_bytes"}
        assert ly["weight_bytes"] > 0
    shares = b["weight_share"]
    assert abs(sum(shares.values()) - 1.0) < 1e-9
    # ranges and the budget came from disjoint parts of the calibration data
    cal = q.calibration
    assert cal["held_out"]["num_samples"] == b["held_out_samples"]
    assert cal["num_samples"] + cal["held_out"]["num_samples"] >= 2
    return b


def test_decoder_keeps_the_outlier_group_and_meets_the_budget(decoder, tmp_path):
    """Judged by the expected change (KL): plain INT8 measures about +0.3% on the held-out windows
    (their own perplexity says +1.0%, with a standard error of half that), the outlier group kept
    brings it to about +0.01%; a 0.1% budget separates the two."""
    exp, npz = decoder
    out = tmp_path / "q"
    r = CliRunner().invoke(main, ["quantize", str(exp.path), "--recipe", "int8", "--set", "num_samples=24",
                                  "--budget", "perplexity=0.1%", "--calib", str(npz), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["quantization"]["budget"]["measured_all_quantized"] > 0.1  # the plain recipe misses it
    art_q = Manifest.from_json(m).quantization
    assert _kept(art_q) == {"/model/model/layers.1/mlp/gate_proj/MatMul", "/model/model/layers.1/mlp/up_proj/MatMul"}
    from trtforge.artifacts import OnnxArtifact

    b = _check_manifest(OnnxArtifact.open(out), "perplexity=0.1%")
    assert b["measured_bound"] <= 0.1 < b["measured_all_quantized"]
    assert b["observed"] is not None and "KL" in b["judged_by"] and b["estimator"].startswith("kl:")
    # the outlier group is the most sensitive one measured
    sens = {ly["name"]: ly["sensitivity"] for ly in art_q.layers if ly["sensitivity"] is not None}
    assert max(sens, key=sens.get).startswith("/model/model/layers.1/mlp/")
    # parity's --per-layer record: the kept GEMMs are excluded in the recorded recipe, so a re-quantization matches
    assert any("layers.1/mlp/gate_proj" in p for p in m["quantization"]["recipe"]["exclude"])
    # the zero-byte lever came first: GPTQ rounding of the INT8 weights, measured fully quantized; it
    # cannot fix per-tensor activation outliers, so the outlier group is still kept after it
    rnd = b["rounding"]
    assert rnd["lever"] == "weight_rounding=gptq, gptq_act_order=true" and rnd["tried"] is True
    assert rnd["measured_plain"] == b["measured_all_quantized"] or rnd["used"]
    assert rnd["measured"] > 0.1 and rnd["seconds"] > 0
    assert [e.get("rounding") for e in b["evaluations"][:3]] == [None, None, rnd["lever"]]
    assert m["quantization"]["recipe"]["weight_rounding"] == ("gptq" if rnd["used"] else "nearest")


def test_encoder_keeps_the_outlier_group_and_meets_the_budget(encoder, tmp_path):
    # a random tiny BERT's embeddings barely move (its output is mostly the residual stream), hence 5 nines
    recipe = get_preset("int8").replace(budget="embedding_cosine=0.99999")
    art = quantize(encoder, recipe, tmp_path / "q", calib=[DATA / "calib-mpl-lgpl.txt"])
    q = art.manifest.quantization
    b = _check_manifest(art, "embedding_cosine=0.99999")
    assert b["measured_all_quantized"] < 0.99999 <= b["measured"]
    assert _kept(q) == {"/model/encoder/layer.1/output/dense/MatMul"}
    # judged by the lower bound of the per-sentence cosines' mean: mean - t(0.95, m - 1) * se
    from trtforge.calibration.budget_spec import t_quantile

    m = b["held_out_samples"]
    assert b["quantile"] == pytest.approx(t_quantile(0.95, m - 1)) and b["standard_error"] > 0
    assert b["measured_bound"] == pytest.approx(b["measured"] - b["quantile"] * b["standard_error"], abs=1e-12)
    assert 0.99999 <= b["measured_bound"] < b["measured"] and b["standard_error_unit"] == "cosine"
    # a budget the plain recipe already meets keeps nothing
    easy = quantize(encoder, get_preset("int8").replace(budget="embedding_cosine=0.999"), tmp_path / "easy",
                    calib=[DATA / "calib-mpl-lgpl.txt"])
    assert not _kept(easy.manifest.quantization)
    assert easy.manifest.quantization.budget["groups_kept"] == 0
    rnd = easy.manifest.quantization.budget["rounding"]
    assert (rnd["tried"], rnd["used"]) == (False, False) and rnd["reason"].startswith("not needed")
    # collected for the lever in the one calibration pass, not saved where the recipe does not read them
    assert not (easy.path / "ranges.hessians.npz").exists()
    saved = json.loads((easy.path / "ranges.json").read_text())
    assert not saved.get("hessians_file") and "hessians" not in saved.get("meta", {})
    assert easy.manifest.quantization.recipe["weight_rounding"] == "nearest"


def test_an_impossible_budget_is_one_error_and_writes_nothing(encoder, tmp_path):
    out = tmp_path / "q"
    r = CliRunner().invoke(main, ["quantize", str(encoder.path), "--recipe", "int8", "--set", "dtype=fp16",
                                  "--budget", "embedding_cosine=1", "--calib", str(DATA / "calib-mpl-lgpl.txt"),
                                  "-o", str(out)])
    line = one_line_error(r, "cannot be met", "no GEMM quantized", "embedding_cosine 0.9999")
    assert "held-out" in line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name != "q"]


@pytest.mark.parametrize("text,needle", [
    ("perplexity=abc", "'abc' is not a number"),
    ("perplexity", "is not METRIC=VALUE"),
    ("bleu=3", "unknown metric 'bleu'"),
    ("embedding_cosine=1.5", "must be in (0, 1]"),
    ("perplexity=-1%", "cannot be negative"),
])
def test_malformed_budgets_are_refused_naming_the_flag(exported, tmp_path, text, needle):
    out = tmp_path / "q"
    r = CliRunner().invoke(main, ["quantize", str(exported("llama").path), "--recipe", "fp8", "--budget", text,
                                  "--calib", str(DATA / "calib-mpl-lgpl.txt"), "-o", str(out)])
    line = one_line_error(r, needle)
    assert "--budget" in line and "(e.g. --budget " in line  # the flag and an example
    assert not out.exists()


def test_an_encoder_metric_on_a_decoder_is_refused_before_any_work(exported, tmp_path):
    out = tmp_path / "q"
    r = CliRunner().invoke(main, ["quantize", str(exported("llama").path), "--recipe", "fp8", "--budget",
                                  "embedding_cosine=0.999", "--calib", str(DATA / "calib-mpl-lgpl.txt"), "-o", str(out)])
    line = one_line_error(r, "compares sentence embeddings", "causal-lm")
    assert "--budget perplexity=1%" in line and not out.exists()
    with pytest.raises(OptionError, match="measures a causal LM"):
        check_applies(parse_budget("perplexity=2"), Task.FEATURE_EXTRACTION)


def test_budget_parsing():
    b = parse_budget("perplexity=1%")
    assert (b.metric.name, b.limit) == ("perplexity", 1.0) and parse_budget("perplexity=1.5").limit == 1.5
    assert b.met(0.99) and not b.met(1.01) and not b.met(None) and not b.met(float("nan"))
    c = parse_budget(" embedding_cosine = 0.999 ")
    assert c.met(0.9995) and not c.met(0.998)


def test_held_out_part_is_disjoint_and_spread():
    s = Samples([np.arange(i, i + 4) for i in range(50)], "windows", ["x"])
    rest, held = split_held_out(s)
    assert len(held.ids) == 10 and len(rest.ids) == 40
    firsts = [int(a[0]) for a in held.ids]
    assert not set(firsts) & {int(a[0]) for a in rest.ids}
    assert firsts[0] < 10 and firsts[-1] > 40  # spread over the data, not its tail
    with pytest.raises(Exception, match="at least 2 calibration samples"):
        split_held_out(Samples([np.arange(4)], "windows", ["x"]))


def test_short_samples_hold_out_more_than_32_long_ones_at_most_32():
    """An encoder's sentences are short: the held-out cap is 32 samples or 8192 tokens, whichever
    holds more, so 300 sentences of 40 tokens hold out a fifth of them (60), 200 windows of 256
    tokens 32 (8192 tokens), as before."""
    _, held = split_held_out(Samples([np.arange(i, i + 40) for i in range(300)], "sentences", ["x"]))
    assert len(held.ids) == 60
    _, held = split_held_out(Samples([np.arange(i, i + 256) for i in range(200)], "windows", ["x"]))
    assert len(held.ids) == 32
    _, held = split_held_out(Samples([np.arange(i, i + 8) for i in range(10000)], "sentences", ["x"]))
    assert len(held.ids) == 1024 and held.num_tokens == 8192


def test_pipeline_budget_key(tmp_path, tiny_model):
    model = tiny_model("llama")
    calib = DATA / "calib-mpl-lgpl.txt"
    p = tmp_path / "r.toml"
    p.write_text(f'[model]\npath = "{model}"\n\n[calibration]\ndata = ["{calib}"]\n\n[quantize]\nrecipe = "fp8"\n'
                 'budget = "perplexity=1%"\n')
    assert load_pipeline_recipe(p).quant.budget == "perplexity=1%"
    p.write_text(p.read_text().replace('"perplexity=1%"', '"perplexity=abc"'))
    with pytest.raises(RecipeError, match=r"r\.toml:9: \[quantize\] budget 'perplexity=abc': 'abc' is not a number"):
        load_pipeline_recipe(p)
    # an encoder metric on a decoder: refused by trtforge run before anything is written
    p.write_text(p.read_text().replace('"perplexity=abc"', '"embedding_cosine=0.99"'))
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["run", str(p), "-o", str(out)])
    one_line_error(r, "[quantize] budget 'embedding_cosine=0.99' compares sentence embeddings")
    assert not out.exists()


def test_int4_search_matches_the_written_model(decoder, tmp_path):
    """INT4 blocks behind switches: what the search measured is what the written model measures."""
    exp, npz = decoder
    recipe = get_preset("int4-rtn").replace(budget="perplexity=0.5%", num_samples=24, block_size=32)
    art = quantize(exp, recipe, tmp_path / "q", calib=[npz])
    q = art.manifest.quantization
    b = _check_manifest(art, "perplexity=0.5%")
    assert b["measured_all_quantized"] > 0.5 >= b["measured"]
    assert b["groups_kept"] >= 1 and b["measured"] == pytest.approx(b["measured_search"], abs=1e-6)
    kept = _kept(q)
    # INT8 weight-only is the first fallback of INT4; the budget holds without any float GEMM here
    assert kept and {ly["precision"] for ly in q.layers if ly["name"] in kept} == {"int8"}
    assert b["groups_float"] == 0 and b["groups_int8"] == b["groups_kept"]
    assert set(b["weight_share"]) == {"int4-weight-only", "int8", "fp32"}  # fp32: the lm_head the recipe excludes
    assert b["fallbacks"] == ["int8", "fp32"]


def test_int4_outlier_gemm_lands_in_int8_first(weight_outliers, tmp_path):
    import onnx

    from trtforge.inputs import make_feeds
    from trtforge.ort import session

    exp, npz = weight_outliers
    # the rounding lever off: GPTQ alone meets this budget on this model (test_gptq_rounding_is_the_first_lever).
    # group granularity: with each GEMM switched alone (gemm, the standalone default), two v_proj in
    # INT8 (6144 weights) meet this budget for fewer bytes than down_proj and o_proj (24576) and are taken
    recipe = get_preset("int4-rtn").replace(budget="perplexity=1%", num_samples=24, block_size=32, budget_rounding=False,
                                            budget_granularity="group")
    art = quantize(exp, recipe, tmp_path / "q", calib=[npz])
    q = art.manifest.quantization
    b = _check_manifest(art, "perplexity=1%")
    assert b["measured_all_quantized"] > 1.0 >= b["measured"]
    assert b["measured"] == pytest.approx(b["measured_search"], abs=1e-6)  # RTN: the switched graph is exact
    assert b["rounding"]["tried"] is False and "budget_rounding is off" in b["rounding"]["reason"]
    down = "/model/model/layers.1/mlp/down_proj/MatMul"
    layers = {ly["name"]: ly for ly in q.layers}
    # the outlier GEMM is the most sensitive, gains the most from INT8, is among the search's first
    # two moves (by gain per byte: a smaller group's INT8 move may go first), and goes to INT8, not float
    sens = {n: ly["sensitivity"] for n, ly in layers.items() if ly["sensitivity"] is not None}
    assert max(sens, key=sens.get) == down
    gain = {n: ly["sensitivity"] - ly["sensitivity_int8"] for n, ly in layers.items() if ly["sensitivity"] is not None}
    assert max(gain, key=gain.get) == down
    assert layers[down]["precision"] == "int8" and re.search(r"move [12] of", layers[down]["reason"])
    assert layers[down]["sensitivity_int8"] < layers[down]["sensitivity"] / 10
    assert b["groups_float"] == 0 and not [n for n, ly in layers.items() if ly["precision"] == "fp32"
                                          and "budget" in ly["reason"]]
    # the manifest's node record: an INT8 weight-only fallback with per-channel scales
    node = next(n for n in q.nodes if n["node"] == down)
    assert (node["status"], node["precision"], node["weight_dtype"]) == ("fallback", "int8", "int8")
    assert node["scale_shape"] == [node["n"]] and b["groups_int8"] >= 1
    assert q.extra["counts"]["fallback"] == sum(ly["precision"] == "int8" for ly in q.layers)  # GEMMs, not groups
    assert any("layers.1/mlp/down_proj" in p for p in q.recipe["weight_only_int8"])
    # three precisions in the size report, and the expected bytes follow them
    share = b["weight_share"]
    assert set(share) == {"int4-weight-only", "int8", "fp32"} and share["int8"] > 0
    assert b["expected_gemm_weight_bytes"] == sum(ly["weight_bytes"] for ly in q.layers)
    assert layers[down]["weight_bytes"] == node["k"] * node["n"]
    # the graph: an INT8 DequantizeLinear (axis = output channel) straight into the GEMM, no activation Q/DQ
    g = onnx.load(str(art.model_path), load_external_data=False).graph
    prod = {o: n for n in g.node for o in n.output}
    mm = next(n for n in g.node if n.name == down)
    dq = prod[mm.input[1]]
    inits = {t.name: t for t in g.initializer}
    assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].data_type == onnx.TensorProto.INT8
    assert not dq.attribute or all(a.name == "axis" for a in dq.attribute)
    assert mm.input[0] not in prod or prod[mm.input[0]].op_type != "DequantizeLinear"
    # ONNX Runtime's CPU provider runs it, close to the float export
    ids = np.load(npz)["input_ids"][:2]
    qs, fs = session(art.model_path), session(exp.model_path)
    feeds = make_feeds(ids, [i.name for i in qs.get_inputs()], art.dims, np.float32)
    got, ref = (s.run(["logits"], feeds)[0] for s in (qs, fs))
    assert np.isfinite(got).all() and np.abs(got - ref).max() < 0.5 * np.abs(ref).max()


@pytest.fixture(scope="module")
def v_outliers(tmp_path_factory):
    """LLaMA whose layers.1 v_proj alone has 40x weight columns (q_proj and k_proj read the same
    input and are left as they are): per-channel INT8 keeps few levels for v_proj's other weights."""
    def edit(m):
        m.model.layers[1].self_attn.v_proj.weight[:, CH] *= 40.0

    return _sampled_decoder(tmp_path_factory.mktemp("budget-v"), edit)


def test_gemm_granularity_keeps_the_one_gemm_and_the_group_granularity_its_group(v_outliers, tmp_path):
    """budget_granularity: "group" switches q/k/v together, "gemm" (what "auto", the default, means
    for a standalone quantize) each GEMM alone,
    so it keeps v_proj in float without q_proj and k_proj, for fewer bytes, and still meets the budget."""
    exp, npz = v_outliers
    attn = "/model/model/layers.1/self_attn/"
    base = get_preset("int8").replace(budget="perplexity=0.05%", num_samples=24, budget_rounding=False)
    grp = quantize(exp, base.replace(budget_granularity="group"), tmp_path / "group", calib=[npz])
    one = quantize(exp, base, tmp_path / "gemm", calib=[npz])  # auto: gemm
    bg, b1 = _check_manifest(grp, "perplexity=0.05%"), _check_manifest(one, "perplexity=0.05%")
    assert bg["measured_all_quantized"] > 0.05 and b1["measured_all_quantized"] > 0.05
    assert {f"{attn}{p}_proj/MatMul" for p in "qkv"} <= _kept(grp.manifest.quantization)
    kept = _kept(one.manifest.quantization)
    assert f"{attn}v_proj/MatMul" in kept and f"{attn}q_proj/MatMul" not in kept
    assert b1["expected_gemm_weight_bytes"] < bg["expected_gemm_weight_bytes"]
    assert b1["groups"] > bg["groups"]  # one switch per GEMM: q/k/v and gate/up split
    layers = {ly["name"]: ly for ly in one.manifest.quantization.layers}
    assert layers[f"{attn}v_proj/MatMul"]["group"] == f"{attn}v_proj/MatMul"
    sens = {n: ly["sensitivity"] for n, ly in layers.items() if ly["sensitivity"] is not None}
    assert max(sens, key=sens.get) == f"{attn}v_proj/MatMul"
    # the written graph: v_proj reads the float input, q_proj and k_proj the quantized one
    import onnx

    g = onnx.load(str(one.model_path), load_external_data=False).graph
    prod = {o: n for n in g.node for o in n.output}
    reads = {p: prod.get(next(n for n in g.node if n.name == f"{attn}{p}_proj/MatMul").input[0]) for p in "qkv"}
    assert reads["q"].op_type == reads["k"].op_type == "DequantizeLinear"
    assert reads["v"] is None or reads["v"].op_type != "DequantizeLinear"


def test_bad_budget_granularity_is_one_error(exported, tmp_path):
    out = tmp_path / "q"
    r = CliRunner().invoke(main, ["quantize", str(exported("llama").path), "--recipe", "fp8", "--budget",
                                  "perplexity=1%", "--set", "budget_granularity=layer",
                                  "--calib", str(DATA / "calib-mpl-lgpl.txt"), "-o", str(out)])
    line = one_line_error(r, "budget_granularity 'layer' is not auto, group or gemm")
    assert "gemm" in line and not out.exists()


def test_the_return_pass_gives_back_a_large_move_the_budget_does_not_need():
    """The ranking over-rates group 0 (a large GEMM): the shortest prefix takes it, but with the
    others taken the budget holds without it, so the return pass puts it back in the recipe's
    precision; group 1's return would break the budget, so it stays taken. The returned move is
    the next one Search.more takes again, and every try is recorded."""
    from types import SimpleNamespace

    from trtforge.calibration.budget import Move, Search, return_pass
    from trtforge.calibration.budget_graph import SwitchGroup
    from trtforge.calibration.budget_spec import Measured
    from trtforge.vocab import Precision

    budget = parse_budget("perplexity=1%")
    groups = [SwitchGroup(f"g{i}", "mlp", [f"n{i}"], e, flag=f"keep_{i}") for i, e in enumerate((1000, 400, 10, 10))]
    true_err = [0.0005, 0.006, 0.005, 0.005]  # nats each group adds while quantized; the float export: 0
    runs = []

    def value(sess, flags):
        runs.append(dict(flags))
        nats = sum(e for g, e in zip(groups, true_err) if not flags.get(g.flag))
        pct = 100 * np.expm1(nats)
        return Measured(pct, pct + 0.05)

    ev = SimpleNamespace(value=value)
    fp16 = Precision.FP16
    moves = [Move(0, fp16, 0.01, 1000.0), Move(1, fp16, 0.004, 400.0), Move(2, fp16, 0.004, 10.0),
             Move(3, fp16, 0.004, 10.0)]
    s = Search(budget, ev, groups, moves, 3, "fp16", "fp8")  # the prefix: groups 0, 1, 2 in float
    return_pass(s, None, tries=8)
    assert set(s.assignment()) == {1, 2} and s.kept == 2
    assert [r["group"] for r in s.returns] == ["g0", "g1", "g2"]  # largest first; g3 was not taken
    assert [r["returned"] for r in s.returns] == [True, False, False]
    assert budget.met(s.searched) and s.searched.point == pytest.approx(100 * np.expm1(0.0055))
    assert s.moves[2].group == 0 and s.more() and set(s.assignment()) == {0, 1, 2}
    assert len(runs) == 3 and all("keep_0" not in r for r in runs[1:])  # later tries build on the return
    # at most ``tries`` runs
    s2 = Search(budget, SimpleNamespace(value=value), groups, list(moves), 3, "fp16", "fp8")
    runs.clear()
    return_pass(s2, None, tries=1)
    assert len(runs) == 1 and len(s2.returns) == 1


def test_moves_int8_before_float_and_cost_aware():
    from trtforge.calibration.budget import Move, order_moves
    from trtforge.vocab import Precision

    fp16 = Precision.FP16
    moves = [Move(0, Precision.INT8, 1.0, 100.0), Move(0, fp16, 0.9, 200.0),  # float move better per byte...
             Move(1, Precision.INT8, 1.0, 10.0), Move(1, fp16, 0.01, 20.0),
             Move(2, Precision.INT8, 0.5, 10.0), Move(2, fp16, 0.001, 20.0)]
    order = [(m.group, m.to) for m in order_moves(moves)]
    assert order[:2] == [(1, Precision.INT8), (2, Precision.INT8)]  # a small layer first for more error per byte
    assert order.index((0, fp16)) == order.index((0, Precision.INT8)) + 1  # ...but only right after its INT8 move
    for gi in range(3):
        assert order.index((gi, Precision.INT8)) < order.index((gi, fp16))


def _prefix_case(errors_nats, se=0.0, limit="perplexity=1%"):
    """(n, measure, calls) for a budget whose k-move prefix measures ``errors_nats[k]`` nats."""
    from trtforge.calibration.budget_spec import Measured

    budget = parse_budget(limit)
    calls: list[int] = []

    def at(k):
        calls.append(k)
        e = float(errors_nats[k])
        return Measured(100 * np.expm1(e), 100 * np.expm1(e + se))

    return budget, at, calls


def test_the_prefix_search_finds_the_shortest_prefix_in_two_runs_where_errors_add_up():
    """Additive sensitivities (as the one-group KLs are on Gemma 3): the line through the ends
    lands on the answer, and the prefix before it proves it the shortest: 2 runs besides the two
    ends the search has measured already, where a bisection of 72 moves takes about 10."""
    from trtforge.calibration.budget import shortest_prefix

    rng = np.random.default_rng(0)
    for trial in range(50):
        n = int(rng.integers(5, 150))
        gains = rng.lognormal(-8, 1.0, n)
        gains[::-1].sort()  # best first, as order_moves leaves them per byte
        cum = np.concatenate([[0.0], np.cumsum(gains)])
        total = cum[-1] * rng.uniform(1.05, 6.0)  # the plain recipe's error: 1.05-6x what the limit allows
        errors = (cum[-1] - cum) * total / cum[-1]
        limit = 100 * np.expm1(total / rng.uniform(1.05, 6.0))
        budget, at, calls = _prefix_case(errors, limit=f"perplexity={limit}%")
        want = next(i for i in range(n + 1) if budget.met(at(i)))
        calls.clear()
        k = shortest_prefix(n, list(cum), at, budget)
        assert k == want, trial
        inner = [c for c in calls if 0 < c < n]
        assert len(inner) <= 2, (trial, inner)


@pytest.mark.parametrize("shape", ["convex", "concave", "steps", "noisy"])
def test_the_prefix_search_is_right_and_no_slower_than_bisection_where_they_do_not(shape):
    """Where the error is not a straight line in the removed sensitivity, every answer is still a
    measured bracket (k meets, k - 1 misses), the shortest one where the errors fall monotonically,
    in at most about as many runs as a bisection."""
    from trtforge.calibration.budget import shortest_prefix

    rng = np.random.default_rng(1)
    for trial in range(40):
        n = int(rng.integers(8, 200))
        cum = np.concatenate([[0.0], np.cumsum(np.sort(rng.lognormal(-8, 1.0, n))[::-1])])
        x = cum / cum[-1]
        if shape == "convex":
            errors = 0.03 * (1 - x) ** 4
        elif shape == "concave":
            errors = 0.03 * (1 - x ** 4)
        elif shape == "steps":
            errors = 0.03 * (1 - np.floor(x * 4) / 4)
        else:
            errors = np.maximum(0.03 * (1 - x) + rng.normal(0, 0.002, n + 1), 0.0)
            errors[0], errors[-1] = 0.05, 0.0
        limit = float(rng.uniform(0.2, 2.5))
        budget, at, calls = _prefix_case(errors, limit=f"perplexity={limit}%")
        if budget.met(at(0)):
            continue
        calls.clear()
        k = shortest_prefix(n, list(cum), at, budget)
        runs = len(set(c for c in calls if 0 < c < n))
        assert budget.met(at(k)) and not budget.met(at(k - 1)), trial
        if shape != "noisy":
            assert k == next(i for i in range(n + 1) if budget.met(at(i)))
        assert runs <= 2 * int(np.ceil(np.log2(n))) + 2, (trial, runs)


def test_budget_error_scale():
    """The additive scale the prefix search interpolates on: nats for a perplexity change, 1 - cosine."""
    from trtforge.calibration.budget_spec import Measured

    ppl, cos = parse_budget("perplexity=1%"), parse_budget("embedding_cosine=0.999")
    assert ppl.error(1.0) == pytest.approx(np.log(1.01)) and ppl.error(Measured(0.5, 2.0)) == pytest.approx(np.log(1.02))
    assert cos.error(0.999) == pytest.approx(0.001) and cos.error(Measured(0.9, 0.8)) == pytest.approx(0.2)
    assert ppl.error(float("nan")) == np.inf and cos.error(float("inf")) == np.inf


def test_weight_only_int8_recipe_key(weight_outliers, tmp_path):
    exp, npz = weight_outliers
    with pytest.raises(RecipeError, match="weight_only_int8 is the INT8 fallback of an INT4"):
        get_preset("fp8").replace(weight_only_int8=["*down_proj*"])
    # without a budget: the pattern alone puts those GEMMs in INT8 weight-only; exclude still wins
    recipe = get_preset("int4-rtn").replace(num_samples=8, block_size=32, weight_only_int8=["*down_proj*", "*lm_head*"])
    q = quantize(exp, recipe, tmp_path / "q", calib=[npz]).manifest.quantization
    status = {n["node"]: n["status"] for n in q.nodes}
    assert {n for n, s in status.items() if s == "fallback"} == {
        "/model/model/layers.0/mlp/down_proj/MatMul", "/model/model/layers.1/mlp/down_proj/MatMul"}
    assert status["/model/lm_head/MatMul"] == "excluded"
    # the CPU target builds it, and the optimized graph computes what the Q/DQ graph computes
    r = CliRunner().invoke(main, ["build", str(tmp_path / "q"), "--target", "cpu", "-o", str(tmp_path / "cpu"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["build"]["self_check"]["relative_rms_err"] < 1e-4


@pytest.mark.parametrize("preset,lever", [("int4-rtn", "int4_method=gptq")])
def test_gptq_rounding_is_the_first_lever(weight_outliers, tmp_path, preset, lever):
    """Where GPTQ's rounding of the same weights meets the budget, nothing is kept in a higher precision
    (judged by the point estimate here: on 5 held-out windows the expected change is +1.24% with
    round-to-nearest, +1.14% with GPTQ, whose 95% bound is above 1.2%)."""
    from trtforge.artifacts import OnnxArtifact

    exp, npz = weight_outliers
    r = CliRunner().invoke(main, ["quantize", str(exp.path), "--recipe", preset, "--set", "num_samples=24", "--set",
                                  "block_size=32", "--set", "budget_confidence=0", "--budget", "perplexity=1.2%", "--calib", str(npz), "-o", str(tmp_path / "q")])
    assert r.exit_code == 0, r.output
    assert f"GPTQ rounding ({lever}) used: every GEMM quantized +" in r.stdout and "0 of " in r.stdout  # said to the user
    art = OnnxArtifact.open(tmp_path / "q")
    q = art.manifest.quantization
    b = _check_manifest(art, "perplexity=1.2%")
    rnd = b["rounding"]
    assert (rnd["lever"], rnd["tried"], rnd["used"]) == (lever, True, True)
    assert rnd["measured"] < 1.2 < rnd["measured_plain"]
    assert "at no extra weight byte" in rnd["reason"] and "without keeping any GEMM" in rnd["reason"]
    # nothing kept: every GEMM the plain recipe quantizes stays INT4, at the plain recipe's bytes
    assert b["groups_kept"] == 0 and b["kept_share_of_planned"] == 0.0 and not _kept(q)
    assert b["measured_all_quantized"] == rnd["measured"] and b["measured"] == pytest.approx(rnd["measured"], abs=1e-6)
    assert b["ranking_tokens"] == 0  # no sensitivity was measured
    # the recorded recipe is the one that was applied (so --ranges and parity --per-layer reproduce it), and the
    # Hessians it reads, collected in the one calibration pass, are saved beside the ranges
    assert q.recipe["int4_method"] == lever.partition("=")[2] and q.recipe["name"] == preset
    assert (art.path / "ranges.hessians.npz").exists()
    assert all("GPTQ" in ly["reason"] for ly in q.layers if ly["precision"] == "int4-weight-only")
    assert all("gptq" in n for n in q.nodes if n["status"] == "quantized")
    # parity --per-layer re-quantizes one GEMM from the record and the saved ranges: GPTQ's weights again, exactly
    import onnx
    from onnx import numpy_helper

    from trtforge.requantize import layer_quantizer

    node = "/model/model/layers.1/mlp/down_proj/MatMul"
    g = next(n for n in q.nodes if n["node"] == node)["gptq"]
    assert "fallback" not in g and g["error_vs_rtn"] < 1.0  # GPTQ's integers, not round-to-nearest's
    one = layer_quantizer(q, art.path / "ranges.json", dims=art.dims, dtype=None)(onnx.load(str(exp.model_path)), node)

    def int4_weight(model) -> np.ndarray:
        prod = {o: n for n in model.graph.node for o in n.output}
        dq = prod[next(n for n in model.graph.node if n.name == node).input[1]]
        t = next(t for t in model.graph.initializer if t.name == dq.input[0])
        return numpy_helper.to_array(t)

    written = onnx.load(str(art.model_path))
    np.testing.assert_array_equal(int4_weight(one), int4_weight(written))
    if preset == "int4-awq":  # AWQ's factors found once, reused by the GPTQ graph and the written model
        assert q.extra["smoothing"] and all(sm["alpha"] is not None for sm in q.extra["smoothing"])


def test_rounding_lever_of_each_preset():
    from trtforge.calibration.budget import rounding_lever

    gptq8 = "weight_rounding=gptq, gptq_act_order=true"  # 8-bit: GPTQ in act order (per-channel scales: exact)
    want = {"fp8": gptq8, "int8-sq": gptq8, "int8": gptq8,
            "int4-awq": "int4_method=awq-gptq", "int4-rtn": "int4_method=gptq", "fp8-gptq": "gptq_act_order=true",
            "int8-sq-gptq": "gptq_act_order=true", "int4-gptq": None, "int4-awq-gptq": None}
    for name, what in want.items():
        got = rounding_lever(get_preset(name))
        assert (got[1] if got else None) == what, name
        if got:  # the same recipe otherwise
            diff = {k for k, v in got[0].to_dict().items() if get_preset(name).to_dict()[k] != v}
            assert diff == {kv.partition("=")[0] for kv in what.split(", ")}
    assert rounding_lever(get_preset("fp8").replace(budget_rounding=False)) is None
    assert rounding_lever(get_preset("fp8-gptq").replace(gptq_act_order=True)) is None


@pytest.mark.parametrize("plain,lever", [("int4-awq", "int4-awq-gptq"), ("int8-sq", "int8-sq-gptq")])
def test_reused_smoothing_factors_are_the_ones_a_fresh_search_finds(exported, tmp_path, plain, lever):
    """The budget's GPTQ graph and the written model reuse the plain graph's smoothing factors
    (prepare(smoothings=...)) instead of searching again: the same factors, the same weights."""
    import onnx

    from trtforge.calibration.collect import ActivationRanges
    from trtforge.calibration.quantize import finish, prepare

    exp = exported("llama", outliers=True)
    src = quantize(exp, get_preset(lever).replace(num_samples=8), tmp_path / "q", calib=[DATA / "calib-mpl-lgpl.txt"])
    ranges = ActivationRanges.load(src.path / "ranges.json")
    model = onnx.load(str(exp.model_path))
    found = prepare(model, get_preset(plain), ranges, exp.dims).smoothings
    assert found
    fresh = prepare(model, get_preset(lever), ranges, exp.dims)
    reused = prepare(model, get_preset(lever), ranges, exp.dims, smoothings=found)
    assert set(fresh.smoothings) == set(reused.smoothings) == set(found)
    for act, sm in fresh.smoothings.items():
        np.testing.assert_array_equal(sm.s, reused.smoothings[act].s)
        assert reused.smoothings[act].group.gemms == sm.group.gemms
    a, _ = finish(fresh, dtype="fp32")
    b, _ = finish(reused, dtype="fp32")
    wa = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    wb = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    # a group excluded since (the budget kept it) gets no factor, and nothing is searched for it
    first = next(iter(found.values())).group.gemms
    fewer = prepare(model, get_preset(lever).replace(exclude=list(first)), ranges, exp.dims, smoothings=found)
    assert set(fewer.smoothings) == set(found) - {next(iter(found))}


# --------------------------------------------------------------------------- the confidence bound


def test_bound_and_t_quantile_by_hand():
    from trtforge.calibration.budget_eval import bound
    from trtforge.calibration.budget_spec import Measured, t_quantile

    # equal weights: sample sd (ddof 1) over sqrt(m): values 1, 2, 3, 6 -> mean 3, sd sqrt(14/3), se sd / 2
    mean, se = bound(np.array([1.0, 2.0, 3.0, 6.0]), np.ones(4))
    assert mean == pytest.approx(3.0) and se == pytest.approx((14 / 3) ** 0.5 / 2)
    # token weights 1 and 3 on values 1 and 3: mean 2.5, SE^2 = 2/1 * (1 * 1.5^2 + 9 * 0.5^2) / 16 = 0.5625
    mean, se = bound(np.array([1.0, 3.0]), np.array([1.0, 3.0]))
    assert mean == pytest.approx(2.5) and se == pytest.approx(0.75)
    assert bound(np.array([4.0]), np.ones(1)) == (4.0, None)  # one sample: no standard error
    # Student t one-sided quantiles (tables): 1, 4, 8 and 30 degrees of freedom
    for p, dof, want in ((0.95, 1, 6.313752), (0.95, 4, 2.131847), (0.95, 8, 1.859548), (0.99, 30, 2.457262),
                         (0.9, 2, 1.885618)):
        assert t_quantile(p, dof) == pytest.approx(want, rel=1e-3)
    assert t_quantile(0.5, 5) == 0.0
    b = parse_budget("perplexity=1%")
    assert b.met(Measured(0.9, 0.99)) and not b.met(Measured(0.9, 1.01))  # judged by the bound, not the point
    c = parse_budget("embedding_cosine=0.999")
    assert c.met(Measured(0.9995, 0.9991)) and not c.met(Measured(0.9995, 0.9985))
    assert "upper bound +1.010%" in b.show(Measured(0.9, 1.01)) and "lower bound" in c.show(Measured(0.9995, 0.9985))


def _held_logprobs(art, ids: np.ndarray):
    """Next-token log-probabilities of ``art`` on ``ids`` (computed here with torch, not by trtforge)."""
    import torch

    from trtforge.inputs import make_feeds
    from trtforge.ort import session

    sess = session(art.model_path)
    feeds = make_feeds(ids, [i.name for i in sess.get_inputs()], art.dims, np.float32)
    logits = torch.from_numpy(sess.run(["logits"], feeds)[0].astype(np.float64))
    return torch.log_softmax(logits[:, :-1], dim=-1)


def _per_window(exp, art, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per window: (mean NLL difference of ``art`` over the export, mean KL(export || art)); the
    tiny LLaMA's 1000-token vocabulary lies within the KL's kept top tokens, so it is the full KL."""
    import torch

    ref, got = _held_logprobs(exp, ids), _held_logprobs(art, ids)
    tgt = torch.from_numpy(ids[:, 1:, None])
    d = (ref.gather(-1, tgt) - got.gather(-1, tgt)).squeeze(-1).mean(1).numpy()
    kl = (ref.exp() * (ref - got)).sum(-1).mean(1).numpy()
    return d, kl


T4 = 2.131847  # Student t, one-sided 95%, 4 degrees of freedom


@pytest.mark.parametrize("estimator", ["kl", "nll"])
def test_the_bound_in_the_manifest_is_the_hand_computed_one(decoder, tmp_path, estimator):
    """measured = exp(mean per-window KL from the export) - 1 (kl) or the pooled perplexity change
    (nll) on the held-out windows; measured_bound = exp(mean + t(0.95, m - 1) * its standard error)
    - 1; under kl the held-out text's own change is recorded beside it (observed). Computed here
    from the export's and the written model's logits."""
    exp, npz = decoder
    recipe = get_preset("int4-rtn").replace(budget="perplexity=1%", num_samples=24, block_size=32, budget_rounding=False,
                                            budget_estimator=estimator)
    art = quantize(exp, recipe, tmp_path / "q", calib=[npz])
    b = art.manifest.quantization.budget
    ids = np.load(npz)["input_ids"]
    _, held = split_held_out(Samples(list(ids), "windows", ["x"]))
    h = np.stack(held.ids)
    assert b["held_out_samples"] == len(h) == 5 and b["confidence"] == 0.95
    d, kl = _per_window(exp, art, h)
    judged, other = (kl, d) if estimator == "kl" else (d, None)
    se = judged.std(ddof=1) / np.sqrt(len(judged))
    assert b["measured"] == pytest.approx(100 * np.expm1(judged.mean()), abs=1e-4)
    assert b["standard_error"] == pytest.approx(se, rel=1e-3)
    assert b["measured_bound"] == pytest.approx(100 * np.expm1(judged.mean() + T4 * se), abs=1e-3)
    assert b["quantile"] == pytest.approx(T4, rel=1e-3) and b["measured_bound"] <= 1.0 and b["met"]
    assert "95% bound" in b["judged_by"] and ("KL" in b["judged_by"]) == (estimator == "kl")
    if other is None:
        assert b["observed"] is None
    else:
        ose = other.std(ddof=1) / np.sqrt(len(other))
        assert b["observed"] == pytest.approx(100 * np.expm1(other.mean()), abs=1e-4)
        assert b["observed_bound"] == pytest.approx(100 * np.expm1(other.mean() + T4 * ose), abs=1e-3)
        # every measurement of the search records both estimates
        assert all("observed" in e for e in b["evaluations"])


def test_the_expected_change_is_what_much_more_text_shows(decoder, tmp_path):
    """On text drawn from the float model, a perturbed model's perplexity change has its KL as
    expectation: on 400 fresh windows the observed change and the KL agree (within 3 standard
    errors of the observed one), and the KL's own standard error is several times smaller, which
    is what lets the budget's bound sit close to its estimate."""
    import torch
    import transformers

    from trtforge.artifacts import OnnxArtifact

    exp, npz = decoder
    art = quantize(exp, get_preset("int8").replace(num_samples=24), tmp_path / "q", calib=[npz])
    m = transformers.AutoModelForCausalLM.from_pretrained(str(npz.parent / "model")).eval()
    torch.manual_seed(123)
    with torch.no_grad():
        ids = m.generate(torch.randint(0, m.config.vocab_size, (400, 1)), do_sample=True, max_new_tokens=47,
                         min_new_tokens=47, top_k=0, pad_token_id=0).numpy()
    parts = [_per_window(exp, OnnxArtifact.open(art.path), ids[i : i + 100]) for i in range(0, 400, 100)]
    d, kl = (np.concatenate([p[j] for p in parts]) for j in (0, 1))
    se_d, se_kl = d.std(ddof=1) / 20, kl.std(ddof=1) / 20
    assert kl.mean() > 0 and abs(d.mean() - kl.mean()) < 3 * se_d
    assert se_kl < se_d / 4


def test_a_noisy_held_out_set_keeps_more_and_confidence_0_is_the_point_estimate(decoder, tmp_path):
    """At confidence 0 the search stops at the first prefix whose point estimate is within the
    budget (the choice before the bound existed); that choice's own spread puts its 95% bound
    outside the budget, so at 0.95 the search keeps more groups, and its bound holds. Judged by the
    held-out text's own perplexity (nll), whose spread is large on 5 windows."""
    exp, npz = decoder
    base = get_preset("int4-rtn").replace(budget="perplexity=1%", num_samples=24, block_size=32, budget_rounding=False,
                                          budget_estimator="nll")
    zero = quantize(exp, base.replace(budget_confidence=0.0), tmp_path / "zero", calib=[npz]).manifest.quantization.budget
    assert zero["measured_bound"] == zero["measured"] <= 1.0 and zero["quantile"] == 0.0
    assert zero["judged_by"] == "point estimate"
    # the point estimate's choice: the smallest prefix measured within the budget, every smaller one outside
    ev = {e["moves"]: e["value"] for e in zero["evaluations"] if isinstance(e["moves"], int) and "rounding" not in e}
    assert ev[zero["moves_taken"]] <= 1.0 and all(v > 1.0 for k, v in ev.items() if k < zero["moves_taken"])
    # its standard error is recorded at confidence 0 too: its one-sided 95% bound misses the budget
    bound0 = 100 * np.expm1(np.log1p(zero["measured"] / 100) + T4 * zero["standard_error"])
    assert bound0 > 1.0
    conf = quantize(exp, base, tmp_path / "conf", calib=[npz]).manifest.quantization.budget
    assert conf["moves_taken"] > zero["moves_taken"] and conf["groups_kept"] > zero["groups_kept"]
    assert conf["measured_bound"] <= 1.0 < bound0 and conf["measured_bound"] > conf["measured"]
    assert conf["kept_share_of_planned"] > zero["kept_share_of_planned"]


@pytest.mark.parametrize("value", ["1.5", "0.3", "-1", "1", "abc"])
def test_bad_budget_confidence_is_one_error(exported, tmp_path, value):
    out = tmp_path / "q"
    r = CliRunner().invoke(main, ["quantize", str(exported("llama").path), "--recipe", "fp8", "--budget",
                                  "perplexity=1%", "--set", f"budget_confidence={value}",
                                  "--calib", str(DATA / "calib-mpl-lgpl.txt"), "-o", str(out)])
    line = one_line_error(r, "budget_confidence")
    assert ("0.95" in line or "number" in line) and not out.exists()


def test_bad_budget_estimator_is_one_error(exported, tmp_path):
    out = tmp_path / "q"
    r = CliRunner().invoke(main, ["quantize", str(exported("llama").path), "--recipe", "fp8", "--budget",
                                  "perplexity=1%", "--set", "budget_estimator=mse",
                                  "--calib", str(DATA / "calib-mpl-lgpl.txt"), "-o", str(out)])
    line = one_line_error(r, "budget_estimator")
    assert "kl" in line and "nll" in line and not out.exists()



def test_a_budget_that_will_not_fit_in_memory_is_said_before_any_work(monkeypatch, caplog):
    """The search holds about 2.5x the export's weights (docs/benchmarks.md); with less available
    the stage warns up front with the figures and what to do."""
    import logging

    from trtforge.calibration import stage

    monkeypatch.setattr(stage, "available_bytes", lambda: 4 * 2**30)
    with caplog.at_level(logging.WARNING, logger="trtforge.calibration.stage"):
        stage._warn_budget_memory(1 * 2**30, "perplexity=1%")
    assert not caplog.records  # 2.5 GiB needed, 4 available
    with caplog.at_level(logging.WARNING, logger="trtforge.calibration.stage"):
        stage._warn_budget_memory(3 * 2**30, "perplexity=1%")
    (rec,) = caplog.records
    msg = rec.getMessage()
    assert "7.5 GiB" in msg and "4.0 GiB is available" in msg and "without a budget" in msg
    monkeypatch.setattr(stage, "available_bytes", lambda: None)  # unknown: nothing said
    caplog.clear()
    stage._warn_budget_memory(100 * 2**30, "perplexity=1%")
    assert not caplog.records
