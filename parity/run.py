"""Running both models on the same inputs with Polygraphy's runners.

In:  two Polygraphy runners (reference, candidate) and a list of feed dicts.
Out: per runner, the outputs of every batch, in order; the inputs saved as Polygraphy JSON
     beside the report, so ``trtforge parity --inputs inputs.json`` repeats the run on the same
     data (or ``polygraphy run --load-inputs``).

:func:`run_one_by_one` (what parity uses) activates one runner at a time, as Polygraphy's
Comparator does, and writes every batch's outputs to a scratch folder as they come
(:class:`SpilledRun`): one model's session and one batch of outputs are in memory at a time,
not both models' outputs for every batch (a 262k-token vocabulary's logits are 1 MiB a token
per side). The metrics then read them back a block at a time (trtforge.metrics).
:func:`run_pair` (``save_outputs``: the full outputs.json is asked for anyway) keeps
Polygraphy's Comparator.run, every output in memory.

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
from trtforge.progress import progress

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


class SpilledArray:
    """An ``.npy`` file read a slab at a time: ``a[b]``, ``a[b, t0:t1]`` and ``a[b0:b1]`` read just
    those bytes (no memory map whose pages would stay resident); anything else reads the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            self.offset = f.tell()
        if fortran:
            raise ValueError("C-order arrays only")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.ndim = len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def _read(self, start: int, count: int, shape: tuple[int, ...]) -> np.ndarray:
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self.dtype.itemsize)
            return np.fromfile(f, self.dtype, count).reshape(shape)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        sh = self.shape
        if self.ndim >= 1 and 1 <= len(key) <= 2 and all(isinstance(k, (int, np.integer, slice)) for k in key):
            row = int(np.prod(sh[1:], dtype=np.int64))
            k0 = key[0]
            if isinstance(k0, slice) and len(key) == 1 and k0.step in (None, 1):
                b0, b1, _ = k0.indices(sh[0])
                b1 = max(b0, b1)
                return self._read(b0 * row, (b1 - b0) * row, (b1 - b0, *sh[1:]))
            if not isinstance(k0, slice):
                b = int(k0) + (sh[0] if int(k0) < 0 else 0)
                if not 0 <= b < sh[0]:
                    raise IndexError(f"index {k0} is out of bounds for axis 0 with size {sh[0]}")
                if len(key) == 1:
                    return self._read(b * row, row, sh[1:])
                k1 = key[1]
                if self.ndim >= 2 and isinstance(k1, slice) and k1.step in (None, 1):
                    inner = int(np.prod(sh[2:], dtype=np.int64))
                    t0, t1, _ = k1.indices(sh[1])
                    t1 = max(t0, t1)
                    return self._read(b * row + t0 * inner, (t1 - t0) * inner, (t1 - t0, *sh[2:]))
        return np.load(self.path, allow_pickle=False)[key]

    def __array__(self, dtype=None, copy=None):
        a = self._read(0, self.size, self.shape)
        return a if dtype is None else a.astype(dtype)

    def __len__(self) -> int:
        return self.shape[0]


class SpilledRun:
    """One runner's outputs, batch by batch, in files of ``folder``: ``run[i]`` is batch i's
    ``{output: SpilledArray}``, read when sliced."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._batches: list[dict[str, Path]] = []

    def append(self, outputs: dict[str, Any]) -> None:
        i = len(self._batches)
        files = {}
        for k, (name, value) in enumerate(outputs.items()):
            path = self.folder / f"{i}-{k}.npy"
            np.save(path, np.ascontiguousarray(np.asarray(value)), allow_pickle=False)
            files[name] = path
        self._batches.append(files)

    def __len__(self) -> int:
        return len(self._batches)

    def __getitem__(self, i: int) -> dict[str, SpilledArray]:
        return {name: SpilledArray(path) for name, path in self._batches[i].items()}

    def __iter__(self) -> Iterator[dict[str, SpilledArray]]:
        return (self[i] for i in range(len(self)))


def run_one_by_one(
    runners: Sequence[Any], feeds: Sequence[dict[str, np.ndarray]], out_dir: Path | None, spill: Path
) -> tuple[dict[str, SpilledRun], dict[str, Any]]:
    """Each runner in turn on every batch (see the module docstring): activated (its session
    loaded), run, deactivated (its session freed) before the next; outputs written to ``spill``.
    The same results and run info as :func:`run_pair`, the outputs read from disk."""
    from polygraphy.comparator.data_loader import DataLoaderCache
    from polygraphy.exception import PolygraphyException
    from polygraphy.json import save_json

    cache = DataLoaderCache(list(feeds))
    outputs: dict[str, SpilledRun] = {}
    runtimes: dict[str, float] = {}
    valid = True
    try:
        with quiet_polygraphy():
            for runner in runners:
                run = SpilledRun(spill / runner.name)
                total = 0.0
                with runner as active:  # as Comparator.run: inputs coerced to each runner's metadata
                    cache.set_input_metadata(active.get_input_metadata(use_numpy_dtypes=False))
                    for i in progress(range(len(cache)), len(cache), f"parity: {active.name} batches"):
                        out = active.infer(feed_dict=cache[i])
                        runtime = active.last_inference_time()
                        total += runtime or 0.0
                        # Comparator.validate's verdict (no NaN or Inf anywhere, padding included), a
                        # sequence at a time: validate itself logs float64 statistics of the whole batch
                        valid = valid and all(_finite(np.asarray(v)) for v in out.values())
                        run.append(out)
                        del out
                outputs[runner.name] = run
                runtimes[runner.name] = total
            if out_dir is not None:
                save_json(cache.cache, str(out_dir / INPUTS_FILE), description="inference input data")
    except PolygraphyException as exc:
        raise ParityError(f"Polygraphy could not run the models: {_first_line(exc)}",
                          "check that both artifacts accept these inputs (--max-len, batch sizes)") from None
    except ParityError:
        raise
    except Exception as exc:  # ONNX Runtime / TensorRT errors surface as their own types
        name = type(exc).__name__
        if name in ("Fail", "InvalidArgument", "RuntimeException", "InvalidGraph", "EPFail"):
            raise ParityError(f"inference failed: {_first_line(exc)}", "check that both artifacts accept these inputs") from None
        raise
    info = {"polygraphy_validate_passed": valid, "inference_s": runtimes,
            "inputs_file": INPUTS_FILE if out_dir is not None else None, "outputs_file": None}
    return outputs, info


def _finite(a: np.ndarray) -> bool:
    """No NaN or Inf in ``a``, checked one sequence (axis 0 entry) at a time."""
    if a.dtype.kind not in "fc":
        return True
    if a.ndim < 2:
        return bool(np.isfinite(a).all())
    return all(bool(np.isfinite(a[b]).all()) for b in range(a.shape[0]))


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
            n = _count_valid_rows(outputs["reference"][i][name], v)
            pick = np.unique(np.linspace(0, n - 1, min(SAMPLE_ROWS, n)).round().astype(np.int64)) if n else np.zeros(0, np.int64)
            arrays[f"{name}/{i}/row_index"] = pick
            for side in ("reference", "candidate"):
                a = _pick_rows(outputs[side][i][name], v, pick)
                key = f"{side}/{name}/{i}"
                if a.shape[-1] > FULL_ROW:
                    top = np.argsort(-a, axis=1, kind="stable")[:, :SAMPLE_TOPK]
                    arrays[f"{key}/top_ids"] = top.astype(np.int32)
                    arrays[f"{key}/top_values"] = np.take_along_axis(a, top, axis=1)
                else:
                    arrays[f"{key}/rows"] = a.astype(np.float16)
    np.savez_compressed(out_dir / SAMPLE_FILE, **arrays)
    return SAMPLE_FILE


def _row_validity(a: Any, valid: np.ndarray | None) -> np.ndarray:
    """Per row along the last axis (C order), whether it is at a valid position."""
    shape = tuple(a.shape) if len(a.shape) >= 2 else (1, *a.shape)
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    if valid is None:
        return np.ones(rows, bool)
    return np.broadcast_to(valid, tuple(a.shape))[..., 0].reshape(-1) if len(a.shape) >= 2 else np.ones(1, bool)


def _count_valid_rows(a: Any, valid: np.ndarray | None) -> int:
    return int(_row_validity(a, valid).sum())


def _pick_rows(a: Any, valid: np.ndarray | None, pick: np.ndarray) -> np.ndarray:
    """Valid rows number ``pick`` (among the valid rows, in order) as float32 [len(pick), d],
    read one sequence at a time (never the batch's rows at once)."""
    where = np.nonzero(_row_validity(a, valid))[0][pick]  # flat row indices
    d = a.shape[-1]
    if len(a.shape) < 2:
        return np.asarray(a, np.float32).reshape(1, d)[where]
    per_seq = int(np.prod(a.shape[1:-1], dtype=np.int64)) if len(a.shape) > 2 else 1
    out = np.empty((len(where), d), np.float32)
    for b in np.unique(where // per_seq):
        sel = np.nonzero(where // per_seq == b)[0]
        seq = np.asarray(a[int(b)] if len(a.shape) > 2 else a[int(b) : int(b) + 1]).reshape(-1, d)
        out[sel] = seq[where[sel] - b * per_seq]
        del seq
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
