"""``trtforge build`` and ``trtforge inspect``: the build stage's commands."""

from __future__ import annotations

import json
from pathlib import Path

import click

from trtforge.engines.plan import BuildOptions, HardwareCompatibility, Layout
from trtforge.engines.profiles import DimOverride
from trtforge.engines.targets import TARGET_CHOICES


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


def _emit(obj: dict, as_json: bool, text: str) -> None:
    click.echo(json.dumps(obj, indent=2, default=lambda o: o.to_json() if hasattr(o, "to_json") else str(o)) if as_json else text)


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
@click.option("--dry-run", is_flag=True, help="Check everything and print the build plan without building.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest (or plan) as JSON.")
def build(artifact: Path, target: str, out: Path | None, profile: tuple[DimOverride, ...], layout: str,
          model_name: str | None, opt_level: int, workspace_mib: int | None, timing_cache: Path | None,
          no_timing_cache: bool, hardware_compatibility: str, version_compatible: bool, exclude_lean_runtime: bool,
          reference_engine: Path | None, bench_iterations: int, dry_run: bool, force: bool, as_json: bool) -> None:
    """Build a TensorRT engine (or a CPU ONNX Runtime artifact) from an export or quantize folder."""
    from trtforge.engines.build import build as run_build
    from trtforge.engines.build import prepare
    from trtforge.errors import InputError

    opts = BuildOptions(
        profile=tuple(profile), optimization_level=opt_level, workspace_mib=workspace_mib, timing_cache=timing_cache,
        use_timing_cache=not no_timing_cache, hardware_compatibility=HardwareCompatibility(hardware_compatibility),
        version_compatible=version_compatible, exclude_lean_runtime=exclude_lean_runtime, layout=Layout(layout),
        model_name=model_name, reference_engine=reference_engine, benchmark_iterations=bench_iterations,
    )
    if dry_run:
        _art, plan = prepare(artifact, target, opts)
        p = plan.to_json()
        _emit(p, as_json, _plan_text(p))
        return
    if out is None:
        raise InputError("-o/--output is required", "name the output folder, or pass --dry-run")
    res = run_build(artifact, target, out, opts, force=force)
    m = res.manifest
    if m["kind"] == "engine":
        s = m["layers"]["summary"]["by_precision"]
        lat = m["performance"]["latency"]
        text = (f"{res.path}  {m['precision']['precision']} engine for {m['gpu']['name']} (sm {m['gpu']['compute_capability']}), "
                f"TensorRT {m['tensorrt']['version']}; layers "
                + ", ".join(f"{k} {v}" for k, v in s.items() if v)
                + f"; {lat['median_ms']:.3f} ms median at opt shapes")
    else:
        b = m["build"]
        text = (f"{res.path}  {m['precision']['precision']} CPU artifact (ONNX Runtime {m['versions'].get('onnxruntime')}); "
                f"{b['uint8_activation_groups']} INT8 activation Q/DQ -> UINT8; ops "
                + ", ".join(f"{k} {v}" for k, v in b["ops_after"].items()))
    _emit(m, as_json, text)


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
    from trtforge.artifacts import EngineArtifact, load_artifact
    from trtforge.engines.check import Machine, check_cpu, check_engine, try_load
    from trtforge.errors import InputError

    art = load_artifact(artifact)
    machine = Machine.here()
    if isinstance(art, EngineArtifact):
        report = check_engine(art, machine)
    elif art.manifest.get("stage") == "build":
        report = check_cpu(art, machine)
    else:
        raise InputError(f"{artifact} is an {art.manifest.get('stage')} artifact, not a build",
                         "pass a folder written by 'trtforge build'")
    if do_load and report.loads:
        report = try_load(art, report)
    _emit(report.to_json(), as_json, report.text())
    if not report.loads:
        ctx.exit(1)


COMMANDS = [build, inspect]
