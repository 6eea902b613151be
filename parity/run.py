"""Running both models on the same inputs with Polygraphy's Comparator.

In:  two Polygraphy runners (reference, candidate) and a list of feed dicts.
Out: per runner, the outputs of every batch, in order; Polygraphy saves the inputs (and the
     outputs) as JSON beside the report, so ``trtforge parity --inputs inputs.json`` repeats
     the run on the same data (or ``polygraphy run --load-inputs``).

Polygraphy logs to stdout by default; while it runs here its log level is raised and stdout is
sent to stderr, so ``--json`` output stays clean.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trtforge.errors import ParityError

INPUTS_FILE = "inputs.json"
OUTPUTS_FILE = "outputs.json"
SAMPLE_FILE = "outputs-sample.npz"
SAMPLE_ROWS = 8  # rows per output and batch kept in the sample
SAMPLE_TOPK = 16  # rows longer than FULL_ROW (logits over a vocabulary) keep their top-k only
FULL_ROW = 4096


@contextlib.contextmanager
def quiet_polygraphy() -> Iterator[None]:
    """Polygraphy's messages on stderr, and only its errors unless trtforge logs at DEBUG (--debug)."""
    from polygraphy.logger import G_LOGGER

    debug = logging.getLogger("trtforge").isEnabledFor(logging.DEBUG)
    with G_LOGGER.verbosity(G_LOGGER.VERBOSE if debug else G_LOGGER.ERROR), contextlib.redirect_stdout(sys.stderr):
        yield


def run_pair(
    runners: Sequence[Any], feeds: Sequence[dict[str, np.ndarray]], out_dir: Path | None, *, save_outputs: bool
) -> tuple[dict[str, list[dict[str, np.ndarray]]], dict[str, Any]]:
    """Comparator.run over the runners; returns outputs per runner name and run info."""
    from polygraphy.comparator import Comparator
    from polygraphy.exception import PolygraphyException

    save_in = str(out_dir / INPUTS_FILE) if out_dir is not None else None
    save_out = str(out_dir / OUTPUTS_FILE) if out_dir is not None and save_outputs else None
    try:
        with quiet_polygraphy():
            results = Comparator.run(list(runners), data_loader=list(feeds), save_inputs_path=save_in)
            if save_out:  # RunResults.save: Comparator.run's save_outputs_path is newer than Polygraphy 0.49
                results.save(save_out)
            valid = bool(Comparator.validate(results, check_inf=True, check_nan=True))
    except PolygraphyException as exc:
        raise ParityError(f"Polygraphy could not run the models: {_first_line(exc)}",
                          "check that both artifacts accept these inputs (--max-len, batch sizes)") from None
    except Exception as exc:  # ONNX Runtime / TensorRT errors surface as their own types
        name = type(exc).__name__
        if name in ("Fail", "InvalidArgument", "RuntimeException", "InvalidGraph", "EPFail"):
            raise ParityError(f"inference failed: {_first_line(exc)}", "check that both artifacts accept these inputs") from None
        raise
    outputs: dict[str, list[dict[str, np.ndarray]]] = {}
    runtimes: dict[str, float] = {}
    for runner_name, iterations in results.items():
        if len(iterations) != len(feeds):
            raise ParityError(f"{runner_name} produced {len(iterations)} results for {len(feeds)} batches",
                              "re-run with --debug to see Polygraphy's log")
        outputs[runner_name] = [{k: np.asarray(v) for k, v in it.items()} for it in iterations]
        runtimes[runner_name] = float(sum(it.runtime for it in iterations if it.runtime is not None))
    info = {"polygraphy_validate_passed": valid, "inference_s": runtimes,
            "inputs_file": INPUTS_FILE if save_in else None, "outputs_file": OUTPUTS_FILE if save_out else None}
    return outputs, info


def save_output_sample(out_dir: Path, outputs: dict[str, list[dict[str, np.ndarray]]],
                       valids: Sequence[Sequence[np.ndarray | None]], names: Sequence[str]) -> str:
    """A small, compressed sample of both models' outputs (what is kept when the full
    outputs.json is not asked for; that file is gigabytes for an LLM's logits): per output and
    batch, SAMPLE_ROWS valid rows evenly spread, both sides, as float16 — or, for rows longer
    than FULL_ROW (logits), their top SAMPLE_TOPK token ids and values. Keys are
    ``<side>/<output>/<batch>/<field>`` plus ``<output>/<batch>/row_index`` (the rows' index among
    the batch's valid rows); load with ``numpy.load(path)`` (no pickle)."""
    arrays: dict[str, np.ndarray] = {}
    for i, valid in enumerate(valids):
        for name, v in zip(names, valid, strict=True):
            rows = {side: _valid_rows(outputs[side][i][name], v) for side in ("reference", "candidate")}
            n = rows["reference"].shape[0]
            pick = np.unique(np.linspace(0, n - 1, min(SAMPLE_ROWS, n)).round().astype(np.int64)) if n else np.zeros(0, np.int64)
            arrays[f"{name}/{i}/row_index"] = pick
            for side, a in rows.items():
                a = a[pick].astype(np.float32)
                key = f"{side}/{name}/{i}"
                if a.shape[-1] > FULL_ROW:
                    top = np.argsort(-a, axis=1, kind="stable")[:, :SAMPLE_TOPK]
                    arrays[f"{key}/top_ids"] = top.astype(np.int32)
                    arrays[f"{key}/top_values"] = np.take_along_axis(a, top, axis=1)
                else:
                    arrays[f"{key}/rows"] = a.astype(np.float16)
    np.savez_compressed(out_dir / SAMPLE_FILE, **arrays)
    return SAMPLE_FILE


def _valid_rows(a: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """Rows along the last axis at valid positions, [n, d] in the array's own dtype."""
    a = np.asarray(a)
    flat = a.reshape(-1, a.shape[-1])
    if valid is None:
        return flat
    return flat[np.broadcast_to(valid, a.shape)[..., 0].reshape(-1)]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
