"""A bad quantization value is blamed where it was set: the recipe file's line, or the --set item."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from trtforge.cli import main
from trtforge.errors import RecipeError
from trtforge.pipeline_recipe import load_pipeline_recipe
from trtforge.recipes import load_quant_recipe

from ..conftest import one_line_error  # noqa: TID252

RECIPE = """[model]
path = "model"

[calibration]
data = ["calib.txt"]
{calib}
[quantize]
recipe = "int8-sq"
{quant}
"""


def write(tmp_path, calib: str = "", quant: str = ""):
    p = tmp_path / "r.toml"
    p.write_text(RECIPE.format(calib=calib, quant=quant))
    return p


@pytest.mark.parametrize("calib,quant,sets,want", [
    ("", 'alpha = "high"', (), r"(^|/)r\.toml:9: \[quantize\] alpha must be a number, got 'high'"),
    ("", "alpha = 1.5", (), r"(^|/)r\.toml:9: \[quantize\] alpha 1\.5 is outside \[0, 1\]"),
    ("", "alpha_grid = []", (), r"(^|/)r\.toml:9: \[quantize\] alpha_grid \[\] must hold at least one alpha"),
    ("", "alpha_grid = [0.5, 1.2]", (), r"(^|/)r\.toml:9: \[quantize\] alpha_grid \[0\.5, 1\.2\] must hold .* each in \[0, 1\]"),
    ('mode = "bogus"', "", (), r"(^|/)r\.toml:6: \[calibration\] calib_mode 'bogus' is invalid"),
    ("", "alpha = 0.5", ("quantize.alpha=high",), r"^--set quantize\.alpha=high: alpha must be a number"),
    ("", "", ("calibration.mode=zz",), r"^--set calibration\.mode=zz: calib_mode 'zz' is invalid"),
    ("", "", ("quantize.recipe=nope",), r"^--set quantize\.recipe=nope: unknown quantization recipe 'nope'"),
    # the file is wrong by itself: the file is blamed, whatever --set adds
    ("", 'alpha = "high"', ("quantize.seed=3",), r"(^|/)r\.toml:9: \[quantize\] alpha must be a number"),
])
def test_run_recipe_errors_say_where_the_value_came_from(tmp_path, calib, quant, sets, want):
    p = write(tmp_path, calib, quant)
    with pytest.raises(RecipeError, match=want) as info:
        load_pipeline_recipe(p, sets)
    if want.startswith("^--set"):
        assert "r.toml" not in info.value.one_line()


def test_an_unknown_preset_in_the_file(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[model]\npath = "m"\n[calibration]\ndata = ["c"]\n[quantize]\nrecipe = "nope"\n')
    with pytest.raises(RecipeError, match=r"(^|/)r\.toml:6: \[quantize\] unknown quantization recipe 'nope'"):
        load_pipeline_recipe(p)


def test_set_may_fix_what_the_file_gets_wrong(tmp_path):
    p = write(tmp_path, quant='precision = "int4-weight-only"\nsmoothquant = true')
    with pytest.raises(RecipeError, match=r"(^|/)r\.toml:\d+: \[quantize\] smoothquant applies"):
        load_pipeline_recipe(p)
    assert load_pipeline_recipe(p, ["quantize.smoothquant=false"]).quant.smoothquant is False


def test_the_cli_prints_it_on_one_line(tmp_path):
    p = write(tmp_path, quant="alpha = 0.5")
    r = CliRunner().invoke(main, ["run", str(p), "-o", str(tmp_path / "o"), "--set", "quantize.alpha=high"])
    line = one_line_error(r, "--set quantize.alpha=high: alpha must be a number")
    assert "r.toml" not in line and not (tmp_path / "o").exists()


def test_quantize_recipe_files_and_set(tmp_path):
    f = tmp_path / "q.toml"
    f.write_text('[quantize]\nbase = "int8-sq"\nalpha = "x"\n')
    with pytest.raises(RecipeError, match=r"(^|/)q\.toml:3: \[quantize\] alpha must be a number"):
        load_quant_recipe(str(f))
    f.write_text('base = "int8-sq"\nalpha = 0.5\n')
    with pytest.raises(RecipeError, match=r"^--set alpha=3: alpha 3\.0 is outside"):
        load_quant_recipe(str(f), ["alpha=3"])
    with pytest.raises(RecipeError, match=r"^--set alpha=high: alpha must be a number"):
        load_quant_recipe("int8-sq", ["alpha=high"])
    assert load_quant_recipe(str(f), ["alpha=0.7"]).alpha == 0.7


def test_a_utf16_recipe_is_read_by_its_byte_order_mark(tmp_path):
    p = tmp_path / "r.toml"
    p.write_bytes(RECIPE.format(calib="", quant="alpha = 0.7").encode("utf-16"))
    assert load_pipeline_recipe(p).quant.alpha == 0.7
