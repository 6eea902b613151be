"""`trtforge quantize`: export artifact + calibration data -> Q/DQ ONNX artifact."""

from __future__ import annotations

from pathlib import Path

import click

from trtforge.calibration import quantize as run
from trtforge.commands.base import emit
from trtforge.recipes import load_quant_recipe


@click.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--recipe", "recipe_spec", required=True,
              help="Preset (int8-sq, int8-sq-0.5, int8, fp8, int4-awq, int4-rtn) or a TOML/YAML recipe file.")
@click.option("--calib", multiple=True, type=click.Path(path_type=Path),
              help="Calibration data: text files, a folder, JSONL (field set by text_field) or one .npz. Repeatable.")
@click.option("--ranges", type=click.Path(path_type=Path), help="Reuse ranges.json from an earlier quantize run.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, e.g. --set alpha=0.8.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def quantize(export_dir: Path, recipe_spec: str, calib: tuple[Path, ...], ranges: Path | None, out: Path,
             sets: tuple[str, ...], force: bool, as_json: bool) -> None:
    """Quantize an exported model: SmoothQuant + INT8, FP8, or INT4 weight-only (AWQ/RTN)."""
    recipe = load_quant_recipe(recipe_spec, sets)
    art = run(export_dir, recipe, out, calib=list(calib) or None, ranges=ranges, force=force)
    q = art.manifest.quantization
    qc, counts = q.extra["quick_check"], q.extra["counts"]
    text = (f"{art.path}  {q.precision} ({recipe.name}): {counts['quantized']} GEMMs quantized, "
            f"{counts['excluded']} excluded; {qc['output']} cosine vs float {qc['mean_cosine_vs_float']:.4f} "
            f"on {qc['rows']} held-out rows; {art.manifest.model.size_bytes / 2**20:.1f} MiB")
    emit(art.manifest, as_json, text)


COMMANDS = [quantize]
