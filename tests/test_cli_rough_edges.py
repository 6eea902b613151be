"""Rough edges of the CLI a new user meets (issue 16): ``recipes show`` of a quantization recipe,
``--set`` spellings of ``quantize`` and ``run``, and what ``doctor`` says about the CPU target."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from trtforge.calibration.recipe import PRESETS
from trtforge.cli import main
from trtforge.recipes import load_quant_recipe

from .conftest import one_line_error

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@pytest.mark.parametrize("name", list(PRESETS))
def test_recipes_show_prints_toml_that_loads_back(name, tmp_path):
    r = CliRunner().invoke(main, ["recipes", "show", name])
    assert r.exit_code == 0, r.output
    data = tomllib.loads(r.output)
    assert data["base"] == name and data["precision"] == PRESETS[name].precision.value
    path = tmp_path / f"{name}.toml"
    path.write_text(r.output)
    assert load_quant_recipe(str(path)) == PRESETS[name]
    # a key that differs from the preset is read, not shadowed by base
    path.write_text(r.output.replace("seed = 0", "seed = 7"))
    assert load_quant_recipe(str(path)).seed == 7


def test_recipes_show_leaves_out_keys_of_other_methods():
    def keys(name):
        return set(tomllib.loads(CliRunner().invoke(main, ["recipes", "show", name]).output))

    awq = {"awq_grid", "awq_clip", "awq_clip_grid", "block_size", "int4_method"}
    smooth = {"alpha", "alpha_grid", "smooth_attention_output", "smooth_mlp_down", "smooth_with_mul"}
    fp8 = keys("fp8")
    assert not fp8 & (awq | smooth), fp8 & (awq | smooth)
    assert {"calib_method", "weight_granularity", "num_samples", "exclude"} <= fp8
    int4 = keys("int4-awq")
    assert awq <= int4 and not int4 & (smooth | {"calib_method", "percentile", "smoothquant"})
    assert not keys("int4-rtn") & {"awq_grid", "awq_clip_grid", "keep_tokens"}
    sq = keys("int8-sq")
    assert {"alpha_grid", "smooth_mlp_down", "unsmoothed_calib_method"} <= sq and not sq & awq
    assert "alpha" not in sq  # automatic (null): from base, said in a comment
    assert "alpha = 0.5" in CliRunner().invoke(main, ["recipes", "show", "int8-sq-0.5"]).output
    assert len(CliRunner().invoke(main, ["recipes", "show", "fp8"]).output.splitlines()) < 25


def test_quantize_set_takes_both_spellings():
    r = load_quant_recipe("int8-sq", ["quantize.alpha=0.8", "block_size=64", "calibration.num_samples=16",
                                      "calibration.mode=windows"])
    assert (r.alpha, r.block_size, r.num_samples, r.calib_mode) == (0.8, 64, 16, "windows")
    assert load_quant_recipe("int8-sq", ["alpha=0.7"]).alpha == 0.7


def test_set_errors_name_the_right_spelling(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    base = ["quantize", str(export), "--recipe", "fp8", "--calib", str(tmp_path), "-o", str(tmp_path / "q")]
    line = one_line_error(CliRunner().invoke(main, [*base, "--set", "model.path=x"]), "--set model.path")
    assert "quantize.alpha=0.8" in line
    one_line_error(CliRunner().invoke(main, [*base, "--set", "quantize.alfa=0.8"]), "alfa")
    one_line_error(CliRunner().invoke(main, [*base, "--set", "calibration.count=8"]), "num_samples")
    # trtforge run: keys name their table; a bare key is an error that gives the spelling
    run = ["run", "cpu-int8", "-o", str(tmp_path / "run"), "--set", f"model.path={tmp_path}",
           "--set", f"calibration.data={tmp_path}"]
    one_line_error(CliRunner().invoke(main, [*run, "--set", "alpha=0.8"]), "--set quantize.alpha=0.8")
    one_line_error(CliRunner().invoke(main, [*run, "--set", "num_samples=8"]), "--set calibration.num_samples=8")
    assert not (tmp_path / "run").exists() and not (tmp_path / "q").exists()


def _cpu_row(output: str) -> dict:
    return next(t for t in json.loads(output)["build_targets"] if t["target"] == "cpu")


def test_doctor_says_how_the_cpu_target_runs_each_precision():
    r = CliRunner().invoke(main, ["doctor"])
    assert r.exit_code == 0, r.output
    assert "fp8: no ONNX Runtime CPU kernel" in r.output and "not a speed-up" in r.output
    row = _cpu_row(CliRunner().invoke(main, ["doctor", "--json"]).output)
    assert "U8U8" in row["notes"]["int8"] and "refuses a mismatch" in row["check"]


def test_doctor_does_not_offer_int8_where_the_integer_gemm_is_wrong(monkeypatch):
    """A CPU whose exact (U8U8) integer GEMM kernel is not exact cannot build int8 here: doctor
    must not list it as ready."""
    from trtforge.engines import cpu

    monkeypatch.setattr(cpu, "probe_int8_gemm", lambda: {"u8s8_max_rel_err": 0.99, "u8u8_max_rel_err": 0.25})
    row = _cpu_row(CliRunner().invoke(main, ["doctor", "--json"]).output)
    assert "int8" not in row["precisions"] and "not exact" in row["not_ready"]["int8"]
    text = CliRunner().invoke(main, ["doctor"]).output
    assert "not int8: ONNX Runtime's U8U8 integer GEMM is not exact" in text
    cpu_line = next(ln for ln in text.splitlines() if ln.strip().startswith("cpu "))
    assert "int8" not in cpu_line


def test_run_recipe_asks_for_full_parity_outputs_with_a_typed_key(tmp_path):
    from trtforge.errors import RecipeError
    from trtforge.pipeline_recipe import load_pipeline_recipe

    base = ["model.path=" + str(tmp_path), "calibration.data=" + str(tmp_path)]
    r = load_pipeline_recipe("cpu-int8", [*base, "parity.save_outputs=true"])
    assert r.raw["parity"]["save_outputs"] is True
    with pytest.raises(RecipeError, match="save_outputs"):
        load_pipeline_recipe("cpu-int8", [*base, "parity.save_outputs=3"])
