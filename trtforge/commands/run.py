"""`trtforge run` and `trtforge recipes`: the whole build step from one recipe file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from trtforge.calibration.recipe import PRESETS
from trtforge.commands.recipe_toml import recipe_toml
from trtforge.errors import RecipeError
from trtforge.pipeline import run
from trtforge.pipeline_recipe import PRESET_DIR, preset_names, preset_path


@click.command("run")
@click.argument("recipe")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), help="Output folder (default: recipe's output.dir, else ./trtforge-out).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, e.g. --set quantize.alpha=0.8.")
@click.option("--skip-unavailable-targets", is_flag=True,
              help="Skip GPU targets this machine cannot build (no TensorRT/GPU) instead of refusing; the manifest lists them.")
@click.option("--verify", is_flag=True,
              help="Hash every file of every cached stage before reusing it (default: files whose size or "
                   "modification time changed); a stage whose files differ from its record is rebuilt.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.pass_context
def run_cmd(ctx: click.Context, recipe: str, out: Path | None, sets: tuple[str, ...], skip_unavailable_targets: bool,
            verify: bool, as_json: bool) -> None:
    """Export, quantize, build and check parity from RECIPE (a TOML file or a preset name).

    OUT must be new, empty or an earlier run's output (its stages are reused when unchanged);
    a folder of other files, or one inside or holding the run's inputs, is refused."""
    try:
        m = run(recipe, out, sets=sets, skip_unavailable_targets=skip_unavailable_targets, verify=verify)
    except KeyboardInterrupt:
        click.echo("interrupted: completed stages are kept; run the same command again to resume", err=True)
        ctx.exit(130)
    summary = {
        "verdict": m["verdict"], "exit_code": m["exit_code"], "out": m["out"],
        "stages": [{k: s[k] for k in ("name", "status", "seconds") if k in s} | ({"detail": s["detail"]} if "detail" in s else {})
                   for s in m["stages"]],
        "reports": m["reports"],
        "skipped": m["skipped"],
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        for s in m["stages"]:
            click.echo(f"{s['status']:8} {s['name']:32} {s['seconds']:7.1f}s {s.get('detail', '')}")
        for name, rep in m["reports"].items():
            click.echo(f"parity {name}: {'PASSED' if rep['passed'] else 'FAILED'}  {Path(m['out']) / rep['path'] / 'report.html'}")
        click.echo(f"verdict: {m['verdict']}  ({Path(m['out']) / 'manifest.json'})")
    sys.stdout.flush()
    ctx.exit(m["exit_code"])


@click.group("recipes")
def recipes() -> None:
    """Pipeline presets shipped with trtforge."""


@recipes.command("list")
def recipes_list() -> None:
    """List the pipeline presets and the quantization recipes."""
    click.echo("pipeline presets (trtforge run NAME --set model.path=... --set calibration.data=...):")
    for n in preset_names():
        first = (PRESET_DIR / f"{n}.toml").read_text().splitlines()[0].lstrip("# ")
        click.echo(f"  {n:18} {first}")
    click.echo("quantization recipes (trtforge quantize --recipe NAME, or [quantize] recipe = NAME):")
    for n, r in PRESETS.items():
        click.echo(f"  {n:18} {r.precision.value}{', SmoothQuant' if r.smoothquant else ''}")


@recipes.command("show")
@click.argument("name")
def recipes_show(name: str) -> None:
    """Print a pipeline preset or a quantization recipe (TOML of the keys its method reads; loads back
    with --recipe FILE)."""
    if name in preset_names():
        click.echo(preset_path(name).read_text(), nl=False)
    elif name in PRESETS:
        click.echo(recipe_toml(PRESETS[name], base=name), nl=False)
    else:
        raise RecipeError(f"unknown recipe {name!r}", f"use one of: {', '.join(preset_names() + list(PRESETS))}")


COMMANDS = [run_cmd, recipes]
