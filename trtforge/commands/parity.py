"""``trtforge parity``: the candidate against the FP16 reference, a report, and a CI gate.

Exit codes: 0 the gate passed, 1 it failed (the report is written) or a trtforge error (nothing
is written), 2 a usage error. ``--json`` prints the summary (verdict, failures, headline
figures, file names) on stdout.
"""

from __future__ import annotations

from pathlib import Path

import click

from trtforge.commands.base import emit, field_flags
from trtforge.parity import ParityOptions, ParityReport, check_parity


def _batch_sizes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter("give comma-separated positive integers, e.g. 1,4,8") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter("give comma-separated positive integers, e.g. 1,4,8")
    return sizes


@field_flags(save_outputs="--save-outputs")
@click.command("parity")
@click.option("--reference", required=True, type=click.Path(path_type=Path),
              help="The FP16 reference artifact (export folder, or a build of it).")
@click.option("--candidate", required=True, type=click.Path(path_type=Path),
              help="The artifact to check: a quantize, export or build folder (TensorRT engines need a GPU).")
@click.option("--data", multiple=True, type=click.Path(path_type=Path),
              help="Held-out text (.txt, .jsonl or a folder), not the calibration text; repeatable. "
                   "Default: a few built-in sentences.")
@click.option("--inputs", "inputs", type=click.Path(path_type=Path),
              help="Repeat a run on the same data: the inputs.json an earlier report saved.")
@click.option("--prompts", type=click.Path(path_type=Path),
              help='Task-level parity: a JSONL file of {"prompt", "category", "answer"?} lines; both models '
                   "continue each prompt greedily, compared per category. Without --data only task metrics are computed.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="With --prompts: greedy tokens generated per prompt.")
@click.option("--thresholds", help="A preset (fp16, int8, fp8, int4) or a .toml/.json file. "
                                   "Default: the preset of the candidate's precision.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Report folder.")
@click.option("--per-layer", is_flag=True, help="Rank quantized layers by their share of the error "
                                                "(quantizes one layer at a time) and suggest exclusions; with "
                                                "--prompts also by the agreement they cost on one category.")
@click.option("--per-layer-category", help="With --per-layer and --prompts: the category to rank layers by "
                                           "(default: the worst one).")
@click.option("--num-samples", type=click.IntRange(min=1), default=24, show_default=True, help="Texts to evaluate.")
@click.option("--max-len", type=click.IntRange(min=2), default=96, show_default=True, help="Tokens per text at most.")
@click.option("--batch-sizes", default="1,4,8", show_default=True, callback=_batch_sizes,
              help="Batch sizes used in turn (1 = unpadded; larger = padded batches).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for picking and cutting texts.")
@click.option("--save-outputs/--no-save-outputs", default=False, show_default=True,
              help="Also save both models' full outputs (Polygraphy's outputs.json: gigabytes for an LLM's logits). "
                   "Default: a small sample of them (outputs-sample.npz).")
@click.option("--force", is_flag=True, help="Replace the report folder if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def parity(ctx: click.Context, reference: Path, candidate: Path, data: tuple[Path, ...], inputs: Path | None,
           prompts: Path | None, max_new_tokens: int, thresholds: str | None, out: Path, per_layer: bool,
           per_layer_category: str | None, num_samples: int, max_len: int, batch_sizes: tuple[int, ...], seed: int,
           save_outputs: bool, force: bool, as_json: bool) -> None:
    """Compare a candidate with the FP16 reference on held-out text and/or task prompts; exit 1 if the
    thresholds are missed."""
    options = ParityOptions(num_samples=num_samples, max_len=max_len, min_len=min(8, max_len),
                            batch_sizes=batch_sizes, seed=seed, save_outputs=save_outputs,
                            max_new_tokens=max_new_tokens, per_layer_category=per_layer_category)
    report = check_parity(reference, candidate, list(data) or None, thresholds, out, per_layer=per_layer,
                          force=force, options=options, inputs=inputs, prompts=prompts)
    emit(report.summary(), as_json, None if as_json else summary_text(report))
    ctx.exit(report.exit_code)


def summary_text(report: ParityReport) -> str:
    """The verdict, up to ten failed checks, the headline figures and where the report is."""
    c = report.content
    lines = [("PASS  " if report.passed else "FAIL  ") + c["summary"].split(": ", 1)[1]]
    lines += [f"  - {f.message}" for f in report.failures[:10]]
    if len(report.failures) > 10:
        lines.append(f"  ... and {len(report.failures) - 10} more (see report.md)")
    h = c["headline"]
    figures = [f"{h['output']} cosine {h['cosine_mean']:.6f}", f"SNR {h['snr_db']:.1f} dB"] if "output" in h else []
    tasks = c.get("tasks")
    if tasks:
        for cat in tasks["order"][:6]:
            t = tasks["categories"][cat]
            acc = (f", accuracy {100 * t['accuracy_reference']:.0f} -> {100 * t['accuracy_candidate']:.0f} %"
                   if t["accuracy_reference"] is not None else "")
            lines.append(f"  {'ok ' if t['passed'] else 'BAD'} {cat}: agreement {t['agreement']:.2f} "
                         f"(n={t['n']}){acc}")
        if len(tasks["order"]) > 6:
            lines.append(f"  ... and {len(tasks['order']) - 6} more categories (see report.md)")
    if "top1_agreement" in h:
        figures.append(f"top-1 {h['top1_agreement']:.3f}")
    if h.get("ppl_change_pct") is not None:
        figures.append(f"perplexity {h['ppl_reference']:.4g} -> {h['ppl_candidate']:.4g} ({h['ppl_change_pct']:+.2f} %)")
    if "embedding_cosine_mean" in h:
        figures.append(f"embedding cosine {h['embedding_cosine_mean']:.6f}")
    if figures:
        lines.append("  " + ", ".join(figures))
    lines.append(f"report: {report.path / 'report.html'}")
    return "\n".join(lines)


COMMANDS = [parity]
