"""The quantize stage on tiny models built from configs: accuracy, structure, reuse, errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import transformers
from click.testing import CliRunner

from trtforge.artifacts import sha256_file
from trtforge.calibration import ActivationRanges, get_preset, prepare, quantize
from trtforge.calibration.stage import _run
from trtforge.cli import main
from trtforge.errors import CalibrationError, InputError, RecipeError
from trtforge.inputs import positions_from_mask, tokenize_batch
from trtforge.ort import session

from ..conftest import DATA, leftovers  # noqa: TID252

CALIB = [DATA / "calib-mpl-lgpl.txt"]
EVAL = (DATA / "eval-gpl-3.0.txt").read_text().split("\n\n")[5:17]


def _eval_feeds(art):
    tok = transformers.AutoTokenizer.from_pretrained(str(art.path))
    side = art.manifest["io"]["padding_side"]
    ids, mask, tt = tokenize_batch(tok, [" ".join(t.split()) for t in EVAL], side, 48, art.manifest["io"]["pad_token_id"])
    feeds = {"input_ids": ids, "attention_mask": mask}
    names = [i["name"] for i in art.inputs]
    if "token_type_ids" in names:
        feeds["token_type_ids"] = tt
    if "position_ids" in names:
        feeds["position_ids"] = positions_from_mask(mask, ids.shape[1])
    d = art.manifest["dims"]
    f16 = any(i["dtype"] == "float16" for i in art.inputs)
    for n in names:
        if n.startswith("past_key_values"):
            feeds[n] = np.zeros((ids.shape[0], d["num_kv_heads"], 0, d["head_dim"]), np.float16 if f16 else np.float32)
    return feeds, mask.astype(bool)


def rel_error(ref_art, cand_art) -> float:
    """Relative L2 error of the first output on valid positions of held-out text."""
    feeds, valid = _eval_feeds(ref_art)
    cand_feeds = {k: (v.astype(np.float16) if v.dtype == np.float32 and any(i["dtype"] == "float16" for i in cand_art.inputs) else v) for k, v in feeds.items()}
    ref = session(ref_art.model_path).run(None, feeds)[0].astype(np.float64)
    got = session(cand_art.model_path).run(None, cand_feeds)[0].astype(np.float64)
    if ref.ndim == 3:
        ref, got = ref[valid], got[valid]
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def qdir(tmp_path_factory):
    return tmp_path_factory.mktemp("quantized")


@pytest.mark.parametrize("preset,recipe,bound", [
    ("llama", "int8-sq", 0.05), ("llama", "fp8", 0.06), ("llama", "int4-awq", 0.15), ("llama", "int4-rtn", 0.15),
    ("gpt2", "int8-sq", 0.05), ("bert", "int8-sq", 0.05), ("bert", "fp8", 0.06), ("qwen2", "int4-awq", 0.15),
])
def test_recipes_stay_close_to_fp32(exported, qdir, preset, recipe, bound):
    src = exported(preset)
    art = quantize(src, get_preset(recipe), qdir / f"{preset}-{recipe}", calib=CALIB)
    onnx.checker.check_model(str(art.model_path), full_check=True)
    err = rel_error(src, art)
    assert err < bound, err
    q = art.manifest["quantization"]
    assert q["quick_check"]["mean_cosine_vs_float"] > 0.98
    # the file shrinks: weights are stored quantized
    assert art.manifest["model"]["size_bytes"] < art.manifest["model"]["upstream_size_bytes"]
    # every GEMM listed, lm_head excluded by default with its reason
    nodes = {n["node"]: n for n in q["nodes"]}
    assert q["counts"]["quantized"] + q["counts"]["excluded"] == len(nodes)
    for name, n in nodes.items():
        if "lm_head" in name:
            assert n["status"] == "excluded" and "lm_head" in n["reason"]
        elif n["status"] == "quantized":
            assert n["scale_min"] > 0
    assert q["calibration"]["sha256"] and q["calibration"]["num_samples"] > 0


def test_smoothing_preserves_the_float_function(exported, tiny_model):
    """SmoothQuant's folds (norm, v->o, up->down, explicit Mul) change no output beyond 1e-4 relative."""
    for preset, task in (("llama", "causal-lm"), ("llama", None), ("gpt2", None), ("bert", None)):
        art = exported(preset, task=task, outliers=True)
        model = art.load()
        from trtforge.calibration.collect import collect_ranges
        from trtforge.calibration.quantize import attention_bmm_inputs, watched_tensors
        from trtforge.textdata import build_samples, load_tokenizer

        d = art.manifest["dims"]
        samples = build_samples(CALIB, load_tokenizer(art.path), mode="windows", num_samples=8, seq_len=32, seed=0,
                                max_positions=d["max_positions"], vocab_size=d["vocab_size"])
        r = collect_ranges(model, watched_tensors(model), samples, d, per_tensor=set(attention_bmm_inputs(model)))
        prep = prepare(model, get_preset("int8-sq-0.5"), r, d)
        folds = {sm.group.fold for sm in prep.smoothings.values()}
        assert "norm" in folds or preset == "bert"
        if task == "causal-lm":
            assert "gemm" in folds  # v->o and up->down without a KV cache
        feeds, valid = _eval_feeds(art)
        a = _run(model, [feeds])[0]
        b = _run(prep.model, [feeds])[0]
        for k in a:
            ref = a[k].astype(np.float64)
            assert np.abs(b[k] - ref).max() / np.abs(ref).max() < 1e-4, (preset, k)


def test_kv_cache_is_unchanged_by_smoothing(exported, qdir):
    """With a KV cache, values are not smoothed through v->o: present.*.value keeps its meaning."""
    src = exported("llama")
    art = quantize(src, get_preset("int8-sq"), qdir / "llama-kv", calib=CALIB)
    for g in art.manifest["quantization"]["smoothing"]:
        assert g["role"] != "attn-out" or g["fold"] == "mul"


def test_smoothquant_beats_naive_w8a8_on_outlier_model(exported, qdir):
    src = exported("llama", outliers=True)
    naive = quantize(src, get_preset("int8").replace(calib_method="max"), qdir / "out-naive", calib=CALIB)
    sq = quantize(src, get_preset("int8-sq"), qdir / "out-sq", calib=CALIB)
    e_naive, e_sq = rel_error(src, naive), rel_error(src, sq)
    assert e_sq < 0.7 * e_naive, (e_sq, e_naive)


def test_awq_beats_rtn_on_outlier_model(exported, qdir):
    src = exported("llama", outliers=True)
    rtn = quantize(src, get_preset("int4-rtn"), qdir / "out-rtn", calib=CALIB)
    awq = quantize(src, get_preset("int4-awq"), qdir / "out-awq", calib=CALIB)
    assert rel_error(src, awq) < rel_error(src, rtn)


def test_int4_block_fallback_is_recorded_for_awkward_shapes(exported, qdir):
    art = quantize(exported("llama"), get_preset("int4-rtn"), qdir / "blocks", calib=CALIB)
    nodes = {n["node"]: n for n in art.manifest["quantization"]["nodes"] if n["status"] == "quantized"}
    down = next(n for k, n in nodes.items() if "down_proj" in k)  # K = 160 -> block 32
    assert down["block_size"] == 32 and "160" in down["block_note"]
    q_proj = next(n for k, n in nodes.items() if "q_proj" in k)  # K = 96 -> block 32
    assert q_proj["block_size"] == 32


def test_fp16_rest_from_fp32_export_and_from_fp16_export(exported, qdir):
    for src, name in ((exported("llama"), "to16"), (exported("llama", dtype="fp16"), "from16")):
        recipe = get_preset("int8-sq").replace(dtype="fp16")
        art = quantize(src, recipe, qdir / f"llama-{name}", calib=CALIB)
        m = art.load()
        assert art.manifest["model"]["dtype"] == "fp16"
        scales = [t for t in m.graph.initializer if t.name.endswith("_scale")]
        assert scales and all(t.data_type == onnx.TensorProto.FLOAT16 for t in scales)
        assert next(o.version for o in m.opset_import if o.domain == "") >= 19
        assert rel_error(exported("llama"), art) < 0.08


def test_saved_ranges_requantize_identically(exported, qdir):
    src = exported("llama")
    first = quantize(src, get_preset("int8-sq"), qdir / "r1", calib=CALIB)
    again = quantize(src, get_preset("int8-sq"), qdir / "r2", ranges=first.path / "ranges.json")
    assert sha256_file(first.model_path) == sha256_file(again.model_path)
    assert again.manifest["quantization"]["calibration"]["reused_from"].endswith("ranges.json")
    other = quantize(src, get_preset("fp8"), qdir / "r3", ranges=first.path / "ranges.json")
    assert other.manifest["quantization"]["precision"] == "fp8"
    r = ActivationRanges.load(first.path / "ranges.json")
    assert r.has_samples and all(s.count > 0 for s in r.tensors.values())


def test_calibration_is_deterministic(exported, qdir):
    src = exported("gpt2")
    a = quantize(src, get_preset("int8-sq"), qdir / "d1", calib=CALIB)
    b = quantize(src, get_preset("int8-sq"), qdir / "d2", calib=CALIB)
    assert sha256_file(a.model_path) == sha256_file(b.model_path)


def test_errors(exported, qdir, tmp_path):
    src = exported("llama")
    q = quantize(src, get_preset("int8"), qdir / "e1", calib=CALIB)
    with pytest.raises(InputError, match="already quantized"):
        quantize(q, get_preset("int8"), tmp_path / "x", calib=CALIB)
    bert_ranges = quantize(exported("bert"), get_preset("int8"), qdir / "e2", calib=CALIB).path / "ranges.json"
    with pytest.raises(InputError, match="collected on another model"):
        quantize(src, get_preset("int8"), tmp_path / "x", ranges=bert_ranges)
    no_rows = tmp_path / "r"
    no_rows.mkdir()
    (no_rows / "ranges.json").write_text((q.path / "ranges.json").read_text())
    with pytest.raises(InputError, match="needs the calibration rows"):
        quantize(src, get_preset("int4-awq"), tmp_path / "x", ranges=no_rows / "ranges.json")
    with pytest.raises(InputError, match="no calibration data"):
        quantize(src, get_preset("int8"), tmp_path / "x")
    assert not (tmp_path / "x").exists() and leftovers(tmp_path) == []


def test_non_finite_activations_are_a_clear_error(exported, tmp_path):
    src = exported("llama")
    bad = tmp_path / "bad-export"
    import shutil

    shutil.copytree(src.path, bad)
    m = onnx.load(str(bad / "model.onnx"))
    for t in m.graph.initializer:
        if t.name == "model.layers.0.input_layernorm.weight":
            arr = onnx.numpy_helper.to_array(t).copy()
            arr[0] = np.inf
            t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    onnx.save(m, str(bad / "model.onnx"))
    with pytest.raises(CalibrationError, match="non-finite"):
        quantize(bad, get_preset("int8"), tmp_path / "out", calib=CALIB)
    assert not (tmp_path / "out").exists()


def test_recipe_file_errors_name_the_line(tmp_path, exported):
    f = tmp_path / "r.toml"
    f.write_text('[quantize]\nbase = "int8-sq"\nalpha = 0.7\nalhpa_grid = [0.5]\n')
    r = CliRunner().invoke(main, ["quantize", str(exported("llama").path), "--recipe", str(f), "--calib", str(CALIB[0]),
                                  "-o", str(tmp_path / "o")])
    assert r.exit_code == 1
    assert "r.toml:4: unknown key 'alhpa_grid'" in r.output
    f.write_text('precision = "int3"\n')
    r = CliRunner().invoke(main, ["quantize", str(exported("llama").path), "--recipe", str(f), "--calib", str(CALIB[0]), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "precision = 'int3' is not valid" in r.output
    from trtforge.recipes import load_quant_recipe

    rec = load_quant_recipe("int8-sq", ["alpha=0.6", "exclude=['*down_proj*']"])
    assert rec.alpha == 0.6 and rec.exclude == ("*down_proj*",)
    with pytest.raises(RecipeError, match="alpha 2.0 is outside"):
        load_quant_recipe("int8-sq", ["alpha=2.0"])


def test_cli_quantize_json(exported, tmp_path):
    r = CliRunner().invoke(main, ["-q", "quantize", str(exported("bert").path), "--recipe", "fp8", "--calib", str(CALIB[0]),
                                  "-o", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["quantization"]["precision"] == "fp8" and m["stage"] == "quantize"
