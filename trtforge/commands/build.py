"""``trtforge build`` and ``trtforge inspect``: the build stage's commands."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from trtforge.artifacts import load_artifact
from trtforge.backend import backend_for_artifact, backend_for_target
from trtforge.commands.base import emit, field_flags
from trtforge.engines.build import build as run_build
from trtforge.engines.build import cannot_build_here, prepare
from trtforge.engines.check import Machine
from trtforge.engines.plan import BuildOptions, HardwareCompatibility, Layout
from trtforge.engines.profiles import DimOverride
from trtforge.engines.targets import TARGET_CHOICES, resolve_target
from trtforge.errors import InputError

log = logging.getLogger("trtforge.build")

class ProfileParam(click.ParamType):
    """``SYMBOL=MIN:OPT:MAX`` (or ``SYMBOL=SIZE``) -> DimOverride; bad syntax is a usage error."""

    name = "SYMBOL=MIN:OPT:MAX"

    def convert(self, value, param, ctx):
        if isinstance(value, DimOverride):
            return value
        try:
            return DimOverride.parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@field_flags(optimization_level="--opt-level", benchmark_iterations="--bench-iterations",
             use_timing_cache="--no-timing-cache")
@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--target", "-t", required=True, metavar="|".join(["hopper", "ada", "ampere", "sm_XX", "auto", "cpu"]),
              help=f"GPU architecture, compute capability, 'auto' (this machine's GPU) or 'cpu'. Known: {', '.join(TARGET_CHOICES)}.")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), help="Output folder (required unless --dry-run).")
@click.option("--profile", "profile", multiple=True, type=ProfileParam(),
              help="Range of a dynamic dimension, e.g. --profile batch=1:8:32 --profile sequence=1:128:512. Repeatable.")
@click.option("--layout", type=click.Choice([x.value for x in Layout]), default="plain", show_default=True,
              help="'triton': a Triton model repository (<name>/config.pbtxt, <name>/1/model.plan).")
@click.option("--model-name", help="Triton model name (default: model type, task and precision).")
@click.option("--opt-level", type=int, default=3, show_default=True, help="TensorRT builder optimization level (0-5).")
@click.option("--workspace", "workspace_mib", type=int, help="TensorRT workspace limit in MiB (default: all device memory).")
@click.option("--timing-cache", type=click.Path(path_type=Path),
              help="Timing cache file to reuse and update (default: one per TensorRT version and GPU in ~/.cache/trtforge).")
@click.option("--no-timing-cache", is_flag=True, help="Build without a timing cache.")
@click.option("--hardware-compatibility", type=click.Choice([x.value for x in HardwareCompatibility]), default="none",
              show_default=True, help="Engine portability across GPUs (costs performance; see docs/engines.md).")
@click.option("--version-compatible", is_flag=True, help="Plan loadable by later TensorRT versions (can be slower).")
@click.option("--exclude-lean-runtime", is_flag=True, help="With --version-compatible: leave the lean runtime out of the plan.")
@click.option("--reference-engine", type=click.Path(path_type=Path),
              help="FP16 engine folder of the same model: warn if this (quantized) engine is slower.")
@click.option("--bench-iterations", type=int, default=50, show_default=True, help="Timed runs after the build.")
@click.option("--cpu-lm-head", type=click.Choice(["float", "int8"]), default="float", show_default=True,
              help="cpu target: 'int8' runs a decoder's float lm_head as an INT8 GEMM (per-token activations, "
                   "per-channel weights): faster, not the artifact's own values (docs/engines.md).")
@click.option("--dry-run", is_flag=True, help="Check everything and print the build plan without building; warns "
              "(stderr, and 'warnings' in --json) when this machine could not build it.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest (or plan) as JSON.")
def build(artifact: Path, target: str, out: Path | None, profile: tuple[DimOverride, ...], layout: str,
          model_name: str | None, opt_level: int, workspace_mib: int | None, timing_cache: Path | None,
          no_timing_cache: bool, hardware_compatibility: str, version_compatible: bool, exclude_lean_runtime: bool,
          reference_engine: Path | None, bench_iterations: int, cpu_lm_head: str, dry_run: bool, force: bool,
          as_json: bool) -> None:
    """Build a TensorRT engine (or a CPU ONNX Runtime artifact) from an export or quantize folder."""
    opts = BuildOptions(
        profile=tuple(profile), optimization_level=opt_level, workspace_mib=workspace_mib, timing_cache=timing_cache,
        use_timing_cache=not no_timing_cache, hardware_compatibility=HardwareCompatibility(hardware_compatibility),
        version_compatible=version_compatible, exclude_lean_runtime=exclude_lean_runtime, layout=Layout(layout),
        model_name=model_name, reference_engine=reference_engine, benchmark_iterations=bench_iterations,
        cpu_lm_head=cpu_lm_head,
    )
    tgt = resolve_target(target)
    backend = backend_for_target(tgt)
    if backend.command != "build":
        raise InputError(f"--target {tgt.name} is written by 'trtforge {backend.command}', not 'trtforge build'",
                         f"run 'trtforge {backend.command}', or list the target in a 'trtforge run' recipe")
    if dry_run:
        _art, plan = prepare(artifact, tgt, opts)
        p = plan.to_json()
        why = cannot_build_here(plan.target, plan)
        p["buildable_here"] = why is None
        p["warnings"] = [] if why is None else [
            f"this plan cannot be built on this machine: {why}; run the same command without --dry-run where "
            f"the target's GPU and TensorRT are (pip install 'trtforge[gpu]')"]
        for w in p["warnings"]:
            log.warning("%s", w)
        emit(p, as_json, _plan_text(p))
        return
    if out is None:
        raise InputError("-o/--output is required", "name the output folder, or pass --dry-run")
    res = run_build(artifact, tgt, out, opts, force=force)
    emit(res.manifest, as_json, backend.summary(res))


def _plan_text(p: dict) -> str:
    lines = [f"target {p['target']['name']} ({p['target']['arch']}), precision {p['precision']['precision']} "
             f"(needs {', '.join(p['precision']['needs'])})"]
    for prof in p["profiles"]:
        lines.append("profile: " + ", ".join(f"{k}={':'.join(map(str, v))}" for k, v in prof["symbols"].items()))
    cfg = p["config"]
    lines.append(f"network flags: {', '.join(p['network']['flags'])}; optimization level {cfg['builder_optimization_level']}; "
                 f"hardware compatibility {cfg['hardware_compatibility_level']}; version compatible {cfg['version_compatible']}")
    lines.append(f"timing cache: {p['timing_cache'] or ('default per-user cache' if p['target']['sm'] else 'n/a')}")
    lines += [f"cost: {c}" for c in p["costs"]]
    return "\n".join(lines)


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--load", "do_load", is_flag=True, help="Also load it (TensorRT deserialization or an ONNX Runtime session).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def inspect(ctx: click.Context, artifact: Path, do_load: bool, as_json: bool) -> None:
    """Check a built engine (or CPU artifact) against this machine: will it load here? Exit 1 if not."""
    art = load_artifact(artifact)
    backend = backend_for_artifact(art)
    if art.manifest.stage != backend.stage:
        raise InputError(f"{artifact} is an {art.manifest.stage} artifact, not a build",
                         "pass a folder written by 'trtforge build'")
    report = backend.load_check(art, Machine.here(), load=do_load)
    emit(report.to_json(), as_json, report.text())
    if not report.loads:
        ctx.exit(1)


COMMANDS = [build, inspect]
