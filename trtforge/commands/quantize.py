"""`trtforge quantize`: export artifact + calibration data -> Q/DQ ONNX artifact."""

from __future__ import annotations

from pathlib import Path

import click

from trtforge.calibration import quantize as run
from trtforge.calibration.budget_spec import parse_budget
from trtforge.commands.base import emit
from trtforge.recipes import PRESETS, load_quant_recipe
from trtforge.vocab import CalibDevice


@click.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--recipe", "recipe_spec", required=True,
              help=f"Preset ({', '.join(PRESETS)}) or a TOML/YAML recipe file.")
@click.option("--calib", multiple=True, type=click.Path(path_type=Path),
              help="Calibration data: text files, a folder, JSONL (field set by text_field) or one .npz. Repeatable.")
@click.option("--ranges", type=click.Path(path_type=Path), help="Reuse ranges.json from an earlier quantize run.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--budget", metavar="METRIC=VALUE",
              help="Accuracy budget, e.g. perplexity=1% (decoders) or embedding_cosine=0.999 (encoders): the fewest "
                   "GEMM weights stay unquantized until it holds on held-out calibration samples (GPTQ rounding of the "
                   "same weights is tried first; --set budget_rounding=false skips it; the search switches each GEMM "
                   "alone; --set budget_granularity=group switches q/k/v and gate/up together, as TensorRT-LLM needs).")
@click.option("--calib-device", type=click.Choice([d.value for d in CalibDevice]), default=None,
              help="Where calibration runs ONNX Runtime: auto (CUDA where onnxruntime-gpu sees a GPU, else CPU), cpu, "
                   "or cuda (an error where it is missing). Overrides the recipe's calib_device (default auto).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, e.g. --set alpha=0.8.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def quantize(export_dir: Path, recipe_spec: str, calib: tuple[Path, ...], ranges: Path | None, out: Path,
             budget: str | None, calib_device: str | None, sets: tuple[str, ...], force: bool, as_json: bool) -> None:
    """Quantize an exported model: SmoothQuant + INT8, FP8, or INT4 weight-only (AWQ/RTN)."""
    recipe = load_quant_recipe(recipe_spec, sets)
    if budget is not None:
        parse_budget(budget)  # refused here, naming --budget, before the recipe check words it for files
        recipe = recipe.replace(budget=budget)
    if calib_device is not None:
        recipe = recipe.replace(calib_device=calib_device)
    art = run(export_dir, recipe, out, calib=list(calib) or None, ranges=ranges, force=force)
    q = art.manifest.quantization
    qc, counts = q.extra["quick_check"], q.extra["counts"]
    text = (f"{art.path}  {q.precision} ({recipe.name}): {counts['quantized']} GEMMs quantized, "
            f"{counts['excluded']} excluded" + (f", {counts['fallback']} INT8 weight-only" if counts.get("fallback") else "")
            + f"; {qc['output']} cosine vs float {qc['mean_cosine_vs_float']:.4f} "
            f"on {qc['rows']} held-out rows; {art.manifest.model.size_bytes / 2**20:.1f} MiB")
    b = q.budget
    if b:
        share = b.get("weight_share", {}).get(q.precision.value, 0.0)

        def fmt(v: float) -> str:
            return f"{v:+.3f}%" if b.get("unit") == "%" else f"{v:.8f}"

        bound = b.get("measured_bound")
        shown = fmt(b["measured"]) + (f" (bound {fmt(bound)}, {100 * b['confidence']:g}% one-sided)"
                                      if bound is not None and bound != b["measured"] else "")
        if b.get("observed") is not None:  # judged by the expected change (KL); the text's own beside it
            shown = (f"expected {shown}; the held-out text's own {fmt(b['observed'])}"
                     + (f" (bound {fmt(b['observed_bound'])})" if b.get("observed_bound") is not None else ""))
        text += (f"\nbudget {b['text']}: {b['metric']} {shown} on {b['held_out_samples']} held-out samples "
                 f"(every GEMM quantized: {fmt(b['measured_all_quantized'])}); {b['groups_kept']} of {b['groups']} groups "
                 f"kept out of {q.precision}" + (f" ({b['groups_int8']} in INT8 weight-only)" if b.get("groups_int8") else "")
                 + f", {100 * share:.1f}% of GEMM weights in {q.precision}")
        rnd = b.get("rounding") or {}
        if rnd.get("tried"):
            text += (f"; GPTQ rounding ({rnd['lever']}) {'used' if rnd['used'] else 'tried, not used'}: every GEMM "
                     f"quantized {fmt(rnd['measured_plain'])} -> {fmt(rnd['measured'])}")
    emit(art.manifest, as_json, text)


COMMANDS = [quantize]
