"""Command line: a thin Click layer over the library.

Results go to stdout (JSON with --json), logs and progress to stderr. Exit codes: 0 success,
1 a trtforge error or a failed parity gate, 2 a usage error. A TrtforgeError prints one line
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from trtforge._version import __version__
from trtforge.commands import COMMANDS
from trtforge.commands.base import emit, field_flags, for_command
from trtforge.env import doctor as run_doctor
from trtforge.errors import TrtforgeError
from trtforge.exporter import DType, ExportOptions, Task, export_onnx
from trtforge.logs import setup_logging

__all__ = ["main"]

log = logging.getLogger("trtforge")


class TrtforgeGroup(click.Group):
    """Turns TrtforgeError into one line on stderr and exit code 1, option fields named by the
    flags of the command that was run."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TrtforgeError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            cmd = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
            err = for_command(exc, cmd)
            click.echo(f"error: {err.one_line()}", err=True)
            ctx.exit(err.exit_code)


@click.group(cls=TrtforgeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="trtforge")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Log lines on stderr as text or one JSON object per line.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.pass_context
def main(ctx: click.Context, debug: bool, log_format: str, quiet: bool) -> None:
    """Export Hugging Face transformers to ONNX, quantize them (INT8 SmoothQuant, FP8, INT4 AWQ),
    build TensorRT engines and check parity against the FP16 reference."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    setup_logging(log_format, logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def doctor(as_json: bool) -> None:
    """What this machine can do: versions, ONNX Runtime providers, TensorRT, GPUs, build targets."""
    info = run_doctor()
    if as_json:
        emit(info, True)
        return
    lines = [f"trtforge {__version__}"]
    for k, v in info["versions"].items():
        lines.append(f"  {k:16} {v or 'not installed'}")
    lines.append(f"onnxruntime providers: {', '.join(info['onnxruntime_providers']) or 'none'}")
    trt = info["tensorrt"]
    lines.append(f"tensorrt: {trt['version'] if trt['available'] else 'not usable (' + trt['reason'] + ')'}")
    if info["gpus"]:
        for g in info["gpus"]:
            lines.append(f"gpu {g['index']}: {g['name']} (compute capability {g['compute_capability']})")
    else:
        lines.append("gpus: none found (nvidia-smi)")
    lines.append("build targets possible here:")
    for t in info["build_targets"]:
        state = "ready" if t["ready"] else f"needs {t['missing']}"
        lines.append(f"  {t['target']:8} {', '.join(t['precisions'])} [{state}]")
        for p, why in (t.get("not_ready") or {}).items():
            lines.append(f"  {'':8}   not {p}: {why}")
        for p, how in (t.get("notes") or {}).items():
            if p not in (t.get("not_ready") or {}):
                lines.append(f"  {'':8}   {p}: {how}")
        if t.get("check"):
            lines.append(f"  {'':8}   {t['check']}")
    click.echo("\n".join(lines))


@field_flags(validate="--no-validate")
@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--task", type=click.Choice([t.value for t in Task]),
              help="Default: from config.json (decoders: causal-lm-with-past).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--external-data", is_flag=True, help="Store weights in model.onnx.data even when under 2 GB.")
@click.option("--no-validate", is_flag=True, help="Skip the ONNX Runtime vs PyTorch check.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export(model_dir: Path, out: Path, task: str | None, dtype: str, opset: int, external_data: bool,
           no_validate: bool, force: bool, as_json: bool) -> None:
    """Export a Hugging Face model folder to a validated ONNX artifact."""
    opts = ExportOptions(task=Task(task) if task else None, dtype=DType(dtype), opset=opset,
                         external_data=external_data, validate=not no_validate)
    art = export_onnx(model_dir, out, opts, force=force)
    v = art.manifest.section("validation") or {}
    summary = "validation skipped" if v.get("skipped") else f"max normalized error {v['max_normalized_err']:.2e} (tolerance {v['tolerance']:g})"
    emit(art.manifest, as_json, f"{art.path}  {art.architecture} {art.task} {art.dtype}; {summary}")


# The later stages' commands, one module each (trtforge/commands/), listed there by object.
for _cmd in COMMANDS:
    main.add_command(_cmd)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
