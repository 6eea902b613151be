"""Parity stage: FP16 reference vs candidate on real held-out inputs -> report and gate.

In:  two artifacts (export, quantize, CPU build or TensorRT engine folders), held-out text (or
     a Polygraphy inputs.json of an earlier run) and/or a prompts file (task-level parity:
     both models continue categorized prompts greedily, compared per category; without text
     only the task metrics are computed), thresholds (a preset name, a file, or the preset of
     the candidate's precision), ParityOptions.
Out: REPORT_DIR with ``report.json`` (schema ``report.schema.json`` in this package),
     ``report.html``, ``report.md``, and Polygraphy's ``inputs.json`` / ``outputs.json``;
     a :class:`ParityReport` whose ``passed`` / ``exit_code`` a pipeline gates on. The folder
     is written to a temporary sibling and renamed when complete: a run that errors leaves
     nothing behind. A failed gate is a result (the report is written), not an error.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from trtforge import metrics as M
from trtforge.artifacts import Artifact, os_error
from trtforge.errors import OptionError, ParityError
from trtforge.parity.data import build_eval_data, calibration_overlap, load_saved_inputs
from trtforge.parity.decode import DecodeLimits
from trtforge.parity.gate import Check, evaluate, evaluate_tasks, failed, flag_cases
from trtforge.parity.models import ModelSide, check_compatible, make_runner, open_side, profile_limits
from trtforge.parity.options import ParityOptions, Thresholds, load_thresholds
from trtforge.parity.perlayer import METHOD as PER_LAYER_METHOD
from trtforge.parity.perlayer import preflight, rank_layers, rank_layers_by_task
from trtforge.parity.prompts import PromptSet, load_prompts
from trtforge.parity.report import build_report, write_report
from trtforge.parity.run import run_one_by_one, run_pair, save_output_sample
from trtforge.parity.tasks import run_tasks
from trtforge.stage import StageOutput
from trtforge.textdata import load_tokenizer
from trtforge.vocab import Task

log = logging.getLogger(__name__)

ArtifactLike = str | os.PathLike[str] | Artifact
# The report folder is not an artifact: it holds report.json/html/md and Polygraphy's files, no manifest.
REPORT_KIND = "parity-report"


@dataclass(frozen=True)
class ParityReport:
    """The result: where the report is, whether the gate passed, and the report's content."""

    path: Path
    passed: bool
    checks: tuple[Check, ...]
    content: dict[str, Any]

    @property
    def failures(self) -> list[Check]:
        """Failed checks, task-level ones first."""
        return failed(self.checks)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def summary(self) -> dict[str, Any]:
        """What ``--json`` prints: verdict, failures, headline figures, where the files are."""
        c = self.content
        return {
            "passed": self.passed,
            "exit_code": self.exit_code,
            "report_dir": str(self.path),
            "thresholds": c["thresholds"]["name"],
            "checks": len(self.checks),
            "failures": [f.to_json() for f in self.failures],
            "headline": c["headline"],
            "warnings": c["warnings"],
            "files": c["files"],
        }


def check_parity(
    reference: ArtifactLike,
    candidate: ArtifactLike,
    data: Sequence[str | os.PathLike[str]] | None,
    thresholds: Thresholds | str | os.PathLike[str] | None,
    out: str | os.PathLike[str],
    *,
    per_layer: bool = False,
    force: bool = False,
    options: ParityOptions = ParityOptions(),
    inputs: str | os.PathLike[str] | None = None,
    prompts: str | os.PathLike[str] | PromptSet | None = None,
) -> ParityReport:
    """Run both models, measure, gate, and write the report folder (see module docstring)."""
    out_dir = StageOutput(out, stage="parity", kind=REPORT_KIND, force=force, what="report folder",
                          inputs=[_path_of(reference), _path_of(candidate),
                                  # a report inside a data folder would be read as text next time
                                  *(("held-out data", Path(p)) for p in (data or ()) if Path(p).exists()),
                                  *([("saved inputs", Path(inputs))] if inputs else [])])
    timings = out_dir.manifest.timings  # filled by out_dir.timed(); written into report.json, not a manifest
    if data and inputs:
        raise OptionError("both data and inputs given", "pass held-out text with data, or the input file an earlier report saved with inputs",
                          fields=("data", "inputs"))
    prompt_set = prompts if isinstance(prompts, PromptSet) else load_prompts(prompts) if prompts is not None else None
    text = bool(data or inputs) or prompt_set is None  # prompts alone: task metrics only
    ref = open_side(reference, "reference")
    cand = open_side(candidate, "candidate")
    thr = load_thresholds(thresholds, cand.precision)
    warnings = check_compatible(ref, cand)
    tokenizer = None
    if options.per_layer_category is not None and prompt_set is None:
        raise OptionError("per_layer_category needs prompts (its categories)", "add prompts: a JSONL file of categorized prompts",
                          fields=("per_layer_category", "prompts"))
    if prompt_set is not None:
        tokenizer = _prompt_tokenizer(ref, prompt_set, options, per_layer)
        warnings += _unused_overrides(thr, prompt_set)
    if per_layer:
        preflight(cand)

    if not inputs:
        options, notes = fit_to_engines(options, (ref, cand))
        warnings += notes
    ev, overlap = None, None
    if text:
        with out_dir.timed("data_s"):
            ev = load_saved_inputs(inputs, ref) if inputs else build_eval_data(ref, data, options)
            overlap = calibration_overlap(ev, cand)
        warnings += ev.description["notes"] + [f"evaluation data overlaps calibration data: {r}" for r in overlap["reasons"]]

    with out_dir.timed("load_s"):
        ref_runner, ref_runtime = make_runner(ref)
        cand_runner, cand_runtime = make_runner(cand)

    with out_dir.open(write_manifest=False) as tmp:
        sections: dict[str, Any] = {"outputs": {}, "logits": None, "perplexity": None, "embeddings": None}
        dists: dict[str, Any] = {"outputs": {}}
        run_info: dict[str, Any] = {"inference_s": {}, "inputs_file": None, "outputs_file": None,
                                    "outputs_sample_file": None}
        spill = tmp / "_outputs"  # both sides' outputs, batch by batch, until they are measured
        if ev is not None:
            with out_dir.timed("inference_s"):
                if options.save_outputs:  # outputs.json holds them all anyway
                    outputs, run_info = run_pair([ref_runner, cand_runner], ev.feeds, tmp, save_outputs=True)
                else:  # one model in memory at a time, outputs on disk
                    outputs, run_info = run_one_by_one([ref_runner, cand_runner], ev.feeds, tmp, spill)
            if not run_info["polygraphy_validate_passed"]:
                warnings.append("Polygraphy's output validation found NaN or Inf (possibly on padded positions)")

            with out_dir.timed("metrics_s"):
                sections, dists, case_stats = measure(ref.task, ref.output_names, outputs["reference"],
                                                      outputs["candidate"], ev.feeds, options.seed)
            for name, m in sections["outputs"].items():
                if m["nonfinite_reference"]:
                    warnings.append(f"the reference has {m['nonfinite_reference']} NaN/Inf values in {name} on valid "
                                    "positions; they are left out of every metric")
            for c in ev.cases:
                c["outputs"] = case_stats.pop(0)
            n_flagged = flag_cases(ev.cases, thr)
            if n_flagged:
                warnings.append(f"{n_flagged} of {len(ev.cases)} batches miss a limit on their own (data.cases: "
                                "missed_limits); the report's Data section flags them")
            if not options.save_outputs:
                run_info["outputs_sample_file"] = save_output_sample(
                    tmp, outputs, [[M.valid_for(n, o[n].shape, f, ref.task) for n in ref.output_names]
                                   for o, f in zip(outputs["reference"], ev.feeds, strict=True)], ref.output_names)

        if prompt_set is not None:
            with out_dir.timed("tasks_s"):
                sections["tasks"] = run_tasks(prompt_set, [ref_runner, cand_runner], [ref, cand], tokenizer,
                                              max_new_tokens=options.max_new_tokens,
                                              batch_size=options.prompt_batch_size, limits=decode_limits((ref, cand)),
                                              max_positions=ref.dims.max_positions)
            warnings += sections["tasks"]["notes"]

        if per_layer:
            with out_dir.timed("per_layer_s"):
                sections["per_layer"] = _per_layer(ref, cand, ev, outputs["reference"] if ev is not None else None,
                                                   prompt_set, sections.get("tasks"), thr, tokenizer, options)

        shutil.rmtree(spill, ignore_errors=True)
        checks = evaluate(sections, thr)
        passed = all(c.passed for c in checks)
        timings["total_s"] = out_dir.elapsed()
        content = build_report(
            passed=passed, checks=checks, thresholds=thr, ref=ref, cand=cand, ref_runtime=ref_runtime,
            cand_runtime=cand_runtime, data=ev, overlap=overlap, sections=sections, distributions=dists,
            run_info=run_info, options=options, warnings=warnings, timings=timings,
        )
        try:
            write_report(tmp, content)
        except OSError as exc:  # a full disk: one line, and the temporary folder goes
            raise os_error(exc, f"writing the parity report into {out_dir.path}") from None
    log.info("parity %s: %d/%d checks passed; report in %s", "PASSED" if passed else "FAILED",
             sum(c.passed for c in checks), len(checks), out_dir.path)
    return ParityReport(out_dir.path, passed, tuple(checks), content)


def _path_of(side: ArtifactLike) -> Path:
    return side.path if hasattr(side, "path") else Path(side)


def _prompt_tokenizer(ref: ModelSide, prompts: PromptSet, options: ParityOptions, per_layer: bool) -> Any:
    """Every refusal --prompts can meet before any work; the reference's tokenizer."""
    if not ref.task.is_decoder:
        raise OptionError(f"prompts need a causal LM, and the reference is a {ref.task.value} model",
                          "drop the prompts, or compare causal-lm / causal-lm-with-past exports", fields=("prompts",))
    cat = options.per_layer_category
    if cat is not None:
        if not per_layer:
            raise OptionError("per_layer_category is set without per_layer", "add per_layer, or drop per_layer_category",
                              fields=("per_layer_category",))
        if cat not in prompts.categories:
            raise OptionError(f"per_layer_category {cat!r} is not a category of {prompts.path.name}",
                              f"use one of: {', '.join(prompts.categories)}", fields=("per_layer_category",))
    folder = ref.tokenizer_dir()
    tok = load_tokenizer(folder) if folder is not None else None
    if tok is None:
        raise ParityError(f"the reference artifact {ref.artifact.path} has no tokenizer files, so prompts cannot be "
                          "tokenized", "re-export it from a model folder with a tokenizer")
    return tok


def _unused_overrides(thr: Thresholds, prompts: PromptSet) -> list[str]:
    extra = [c for c in thr.tasks if c not in prompts.categories]
    if not extra:
        return []
    return [f"thresholds override task categories with no prompts in {prompts.path.name}: {', '.join(extra)} "
            f"(categories: {', '.join(prompts.categories)})"]


def _per_layer(ref: ModelSide, cand: ModelSide, ev: Any, ref_outputs: Any, prompts: PromptSet | None,
               tasks: dict[str, Any] | None, thr: Thresholds, tokenizer: Any, options: ParityOptions) -> dict[str, Any]:
    """The per_layer section: the error ranking on text (with text data) and, with prompts, the
    ranking by agreement on one category (the chosen one, else the worst)."""
    if ev is not None:
        section = rank_layers(ref, cand, ev, ref_outputs, options)
    else:
        section = {"method": PER_LAYER_METHOD, "output": "logits", "num_samples": 0,
                   "baseline_snr_db": None, "layers": [], "suggested_exclusions": [],
                   "note": "no text data: layers are ranked by the prompts' task agreement only (task_ranking)"}
    if prompts is not None and tasks is not None:
        evaluate_tasks(tasks, thr)  # orders the categories: the worst one is the default
        category = options.per_layer_category or tasks["worst_category"]
        section["task_ranking"] = rank_layers_by_task(ref, cand, prompts, tasks, category, tokenizer, options,
                                                      decode_limits((ref, cand)))
    return section


def decode_limits(sides: Sequence[ModelSide]) -> DecodeLimits:
    """The largest batch and total sequence every side's runtime accepts (engines' shape profiles)."""
    found: dict[str, int] = {}
    for side in sides:
        lim = profile_limits(side)
        total = lim.get("total_sequence") or lim.get("sequence")  # with a past: the mask's axis
        past = lim.get("past_sequence")  # the last step feeds a past of total - 1 tokens
        for key, rng in (("batch", lim.get("batch")), ("total", total), ("prompt", lim.get("sequence")),
                         ("total", (past[0], past[1] + 1) if past else None)):
            if rng:
                found[key] = min(found.get(key, rng[1]), rng[1])
    return DecodeLimits(found.get("batch"), found.get("total"), found.get("prompt"))


def fit_to_engines(options: ParityOptions, sides: Sequence[ModelSide]) -> tuple[ParityOptions, list[str]]:
    """Keep batch sizes and text lengths inside the shape profiles TensorRT engines were built for."""
    notes: list[str] = []
    for side in sides:
        limits = profile_limits(side)
        batch, seq = limits.get("batch"), limits.get("sequence") or limits.get("total_sequence")
        changes: dict[str, Any] = {}
        if batch and (max(options.batch_sizes) > batch[1] or min(options.batch_sizes) < batch[0]):
            changes["batch_sizes"] = tuple(dict.fromkeys(min(max(b, batch[0]), batch[1]) for b in options.batch_sizes))
        if seq and options.max_len > seq[1]:
            changes["max_len"] = seq[1]
            changes["min_len"] = max(2, min(options.min_len, seq[1]))
        if seq and options.min_len < seq[0]:
            changes["min_len"] = seq[0]
        if changes:
            options = replace(options, **changes)
            notes.append(f"the {side.role} engine's shape profile limits the inputs: "
                         + ", ".join(f"{k} {v}" for k, v in changes.items()))
    return options, notes


def case_figures(r: np.ndarray, c: np.ndarray, v: np.ndarray | None, *, logits: bool) -> dict[str, Any]:
    """One batch's figures for one output on valid positions: max abs error, SNR, mean row cosine
    and, for logits, top-1 agreement. Computed a block of rows at a time (metrics.row_blocks:
    float64 copies of a few rows, not of the batch's logits)."""
    sig = noise = 0.0
    peak = 0.0
    cos_sum, rows, same = 0.0, 0, 0
    for rr, cc in zip(M.row_blocks(r, v), M.row_blocks(c, v), strict=True):
        ok = np.isfinite(rr).all(axis=1) & np.isfinite(cc).all(axis=1)
        rr, cc = rr[ok], cc[ok]
        if not rr.size:
            continue
        d = cc - rr
        sig += float(np.square(rr).sum())
        noise += float(np.square(d).sum())
        peak = max(peak, float(np.abs(d).max()))
        cos_sum += float(M.row_cosine(rr, cc).sum())
        rows += rr.shape[0]
        if logits:
            same += int((rr.argmax(axis=1) == cc.argmax(axis=1)).sum())
    out: dict[str, Any] = {"max_abs_err": peak, "snr_db": M.snr_db(sig, noise),
                           "cosine_mean": cos_sum / rows if rows else 1.0}
    if logits:
        out["top1_agreement"] = same / rows if rows else 1.0
    return out


def measure(
    task: Task,
    output_names: Sequence[str],
    ref_out: Sequence[dict[str, np.ndarray]],
    cand_out: Sequence[dict[str, np.ndarray]],
    feeds: Sequence[dict[str, np.ndarray]],
    seed: int,
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """All metric sections, their distributions, and small per-batch figures."""
    rng = np.random.default_rng(seed)
    sections: dict[str, Any] = {"outputs": {}, "logits": None, "perplexity": None, "embeddings": None}
    dists: dict[str, Any] = {"outputs": {}}
    case_stats: list[dict[str, Any]] = [{} for _ in feeds]
    for name in output_names:
        refs, cands = M.column(ref_out, name), M.column(cand_out, name)  # read batch by batch where spilled
        valids = [M.valid_for(name, r.shape, f, task) for r, f in zip(refs, feeds, strict=True)]
        sections["outputs"][name], dists["outputs"][name] = M.output_metrics(name, refs, cands, valids, rng)
        for i, (r, c, v) in enumerate(zip(refs, cands, valids, strict=True)):
            case_stats[i][name] = case_figures(r, c, v, logits=name == "logits" and task != Task.FEATURE_EXTRACTION)
        if name == "logits" and task != Task.FEATURE_EXTRACTION:
            sections["logits"], d = M.logits_metrics(refs, cands, valids)
            dists.update(d)
            if Task(task).is_decoder:
                sections["perplexity"] = M.perplexity(refs, cands, feeds)
        if name == "last_hidden_state" and task == Task.FEATURE_EXTRACTION:
            sections["embeddings"], d = M.embedding_metrics(refs, cands, feeds)
            dists.update(d)
    return sections, dists, case_stats
