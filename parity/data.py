"""Evaluation inputs: held-out text tokenized by the artifact's own tokenizer, in several shapes.

In:  text files (or JSONL), the reference's tokenizer, I/O and dims, ParityOptions; or a
     Polygraphy ``inputs.json`` saved by an earlier run (to repeat it on the same data).
Out: :class:`EvalData` — a list of feed dicts (one per batch: an unpadded single row first,
     then padded batches; right padding for encoders, left for decoders, as the manifest says;
     decoders with a KV cache get an empty past, i.e. prefill), what each batch is, and a
     description with the hashes of the source files and of the feeds.

Also :func:`calibration_overlap`: whether the evaluation text overlaps the calibration data the
candidate's manifest records (same samples, same file, or shared sentences).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trtforge.artifacts import sha256_file
from trtforge.errors import CalibrationError, InputError, ParityError
from trtforge.inputs import IOSpec, decoder_prefill_feeds, encoder_feeds, pad_sequences
from trtforge.parity.models import ModelSide
from trtforge.parity.options import ParityOptions
from trtforge.parity.run import quiet_polygraphy
from trtforge.sample_text import SENTENCES
from trtforge.textdata import (
    JSONL_SUFFIXES,
    TEXT_SUFFIXES,
    build_samples,
    load_tokenizer,
    read_documents,
    split_sentences,
)

log = logging.getLogger(__name__)

BUILTIN = "builtin:trtforge.sample_text"


@dataclass
class EvalData:
    feeds: list[dict[str, np.ndarray]]
    cases: list[dict[str, Any]]
    description: dict[str, Any]
    sentences: list[str] = field(default_factory=list)  # the documents' sentences (overlap check)


def feeds_sha256(feeds: Sequence[dict[str, np.ndarray]]) -> str:
    """One hash over every batch: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for feed in feeds:
        for name in sorted(feed):
            a = np.ascontiguousarray(feed[name])
            h.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def describe_cases(feeds: Sequence[dict[str, np.ndarray]], padding_side: str) -> list[dict[str, Any]]:
    cases = []
    for i, f in enumerate(feeds):
        ids = f["input_ids"]
        mask = f.get("attention_mask")
        seq = int(ids.shape[1])
        valid = int(mask[:, -seq:].sum()) if mask is not None else int(ids.size)
        padded = valid < ids.size
        name = f"{i}: {ids.shape[0]}x{seq}" + (f" {padding_side}-padded" if padded else " unpadded")
        cases.append({"name": name, "batch": int(ids.shape[0]), "seq_len": seq,
                      "padding": padding_side if padded else "none", "valid_tokens": valid})
    return cases


def build_eval_data(side: ModelSide, paths: Sequence[str | Path] | None, options: ParityOptions) -> EvalData:
    """Tokenize held-out text with the side's tokenizer and cut it into batches (module docstring)."""
    folder = side.tokenizer_dir()
    if folder is None:
        raise ParityError(
            f"the {side.role} artifact {side.artifact.path} has no tokenizer files, so text cannot be tokenized",
            "re-export it from a model folder with a tokenizer, or pass --inputs with saved Polygraphy inputs",
        )
    tokenizer = load_tokenizer(folder)
    dims = side.dims
    decoder = side.task.is_decoder
    max_len = min(options.max_len, dims.max_positions)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="trtforge-parity-data-") as tmp:
        if paths:
            files = [Path(p).expanduser() for p in paths]
        else:
            files = [Path(tmp) / "builtin-sentences.txt"]
            files[0].write_text("\n\n".join(SENTENCES) + "\n", encoding="utf-8")
            notes.append(f"no --data given: used the {len(SENTENCES)} built-in sample sentences; pass held-out "
                         "text from your domain for a meaningful check")
            log.warning(notes[-1])
        docs = read_documents(files, options.text_field)
        try:
            samples = build_samples(
                files, tokenizer, mode="windows" if decoder else "sentences", num_samples=options.num_samples,
                seq_len=max_len, seed=options.seed, max_positions=dims.max_positions, vocab_size=dims.vocab_size,
                text_field=options.text_field,
            )
        except CalibrationError as exc:
            raise ParityError(f"evaluation data: {exc.problem}", "pass more held-out text with --data, or lower --max-len") from None
        sources = [{"path": str(p.resolve()) if paths else BUILTIN, "sha256": sha256_file(p)} for p in _expand(files)]
    notes += [n for n in samples.notes if n not in notes]
    if not samples.ids:
        raise ParityError("the evaluation data yields no samples", "pass more held-out text with --data")
    seqs = [list(map(int, a)) for a in samples.ids]
    types = [list(map(int, a)) for a in samples.token_type_ids] if samples.token_type_ids else None
    if decoder:
        # Windows all have max_len tokens; cut them to different lengths so padded batches pad.
        rng = np.random.default_rng(options.seed + 1)
        for i in range(1, len(seqs)):
            seqs[i] = seqs[i][: int(rng.integers(min(options.min_len, max_len), max_len + 1))]
    names = side.input_names
    io = IOSpec(names, side.output_names, past_names=[n for n in names if n.startswith("past_key_values.")])
    past_dtype = next((np.dtype(t.dtype) for t in side.io.inputs if t.name in io.past_names), np.float32)
    feeds: list[dict[str, np.ndarray]] = []
    start = 0
    for size in itertools.cycle(options.batch_sizes):
        if start >= len(seqs):
            break
        chunk = seqs[start : start + size]
        tchunk = types[start : start + size] if types else None
        start += size
        ids, mask, tt = pad_sequences(chunk, side.padding_side, side.pad_token_id, tchunk)
        if decoder:
            f = decoder_prefill_feeds(ids, mask, io, dims, past_dtype)
        else:
            f = encoder_feeds(ids, mask, tt, io)
        feeds.append({k: f[k] for k in names})
    description = {
        "mode": samples.mode,
        "seed": options.seed,
        "sources": sources,
        "num_samples": len(seqs),
        "num_tokens": int(sum(len(s) for s in seqs)),
        "samples_sha256": samples.sha256,
        "feeds_sha256": feeds_sha256(feeds),
        "tokenizer": str(folder),
        "notes": notes,
    }
    sentences = [s for d in docs for s in split_sentences(d.text)]
    return EvalData(feeds, describe_cases(feeds, side.padding_side), description, sentences)


def _expand(files: list[Path]) -> list[Path]:
    """Folders given as --data stand for the text files in them (as read_documents reads them)."""
    out: list[Path] = []
    for p in files:
        if p.is_dir():
            out += sorted(x for x in p.rglob("*") if x.is_file() and x.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES)
        else:
            out.append(p)
    return out


def load_saved_inputs(path: str | Path, side: ModelSide) -> EvalData:
    """Feeds saved by Polygraphy (``inputs.json`` of an earlier report) to repeat a run exactly."""
    from polygraphy.json import load_json

    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"inputs file {p} does not exist", "pass the inputs.json of an earlier parity report")
    try:
        with quiet_polygraphy():
            loaded = load_json(str(p), description="input data")
    except Exception as exc:  # Polygraphy raises its own exception type on malformed files
        raise InputError(f"{p} is not a Polygraphy inputs file ({str(exc).strip().splitlines()[0][:200]})",
                         "pass the inputs.json a parity report saved") from None
    if not isinstance(loaded, list) or not loaded or not all(isinstance(f, dict) for f in loaded):
        raise InputError(f"{p} holds no input batches", "pass the inputs.json a parity report saved")
    feeds = [{k: np.asarray(v) for k, v in f.items()} for f in loaded]
    missing = sorted(set(side.input_names) - set(feeds[0]))
    if missing:
        raise InputError(f"{p} lacks input(s) {', '.join(missing)} of the {side.role}",
                         "use inputs saved for the same model and task")
    description = {
        "mode": "polygraphy-inputs",
        "seed": None,
        "sources": [{"path": str(p.resolve()), "sha256": sha256_file(p)}],
        "num_samples": int(sum(f["input_ids"].shape[0] for f in feeds)),
        "num_tokens": int(sum(int(f["attention_mask"].sum()) if "attention_mask" in f else f["input_ids"].size
                              for f in feeds)),
        "samples_sha256": None,
        "feeds_sha256": feeds_sha256(feeds),
        "tokenizer": None,
        "notes": [f"replayed the inputs saved in {p}"],
    }
    return EvalData(feeds, describe_cases(feeds, side.padding_side), description)


def _norm(sentence: str) -> str:
    return " ".join(sentence.lower().split())


def calibration_overlap(data: EvalData, candidate: ModelSide) -> dict[str, Any]:
    """Compare the evaluation data with the calibration data the candidate records (its own
    manifest or, for a build, the quantize manifest it came from).

    By content first: the calibration record's ``files`` (absolute path and sha256 of every file
    read, written since the quantize stage records them) are compared by hash with the
    evaluation files, so neither a different working folder (relative paths) nor a copy under
    another name hides an overlap. Then by text: calibration files that can be read here are
    split into sentences, and 5 % or more of the evaluation sentences in one file is an
    overlap. Older records list only ``sources`` (paths as given, maybe relative): those are
    read relative to this folder when they exist, else reported as not compared."""
    q = candidate.quantization
    if not q:
        return {"checked": False, "overlaps": False, "reasons": [], "note": "the candidate is not quantized"}
    calib = q.calibration or {}
    reasons: list[str] = []
    if calib.get("sha256") and calib.get("sha256") == data.description.get("samples_sha256"):
        reasons.append("the evaluation samples are the calibration samples (same sha256)")
    ours = {s["sha256"]: s["path"] for s in data.description["sources"]}
    our_paths = {s["path"] for s in data.description["sources"]}
    ours_norm = {_norm(s) for s in data.sentences if len(s.split()) >= 5}
    readable: list[Path] = []
    unreadable: list[str] = []
    files = [f for f in calib.get("files") or [] if isinstance(f, dict) and f.get("sha256")]
    for f in files:
        path = Path(str(f.get("path")))
        if str(path) in our_paths:
            reasons.append(f"{path} is both calibration and evaluation data")
        elif f["sha256"] in ours:
            reasons.append(f"evaluation file {ours[f['sha256']]} has the same content as calibration file {path}")
        elif path.is_file():
            readable.append(path)
        else:
            unreadable.append(str(path))
    if not files:  # an older record: paths as given to the quantize stage
        for entry in calib.get("sources") or []:
            raw = entry.get("path") if isinstance(entry, dict) else entry
            if not isinstance(raw, str):
                continue
            recorded = entry.get("sha256") if isinstance(entry, dict) else None
            given = Path(raw.split(":")[0]).expanduser()  # JSONL sources are recorded as path:line
            if recorded and recorded in ours:
                reasons.append(f"evaluation file {ours[recorded]} has the same content as calibration file {given}")
            elif given.exists():
                readable += _expand([given])
            else:
                unreadable.append(str(given))
    for path in readable:
        if str(path.resolve()) in our_paths:
            reasons.append(f"{path} is both calibration and evaluation data")
            continue
        digest = sha256_file(path)
        if digest in ours:
            reasons.append(f"evaluation file {ours[digest]} has the same content as calibration file {path}")
            continue
        if not ours_norm:
            continue
        try:
            theirs = {_norm(s) for d in read_documents([path]) for s in split_sentences(d.text)}
        except InputError:
            continue
        shared = len(ours_norm & theirs)
        if shared and shared / len(ours_norm) >= 0.05:
            reasons.append(f"{shared} of {len(ours_norm)} evaluation sentences also appear in calibration file {path}")
    out: dict[str, Any] = {"checked": True, "overlaps": bool(reasons), "reasons": list(dict.fromkeys(reasons)),
                           "calibration_sha256": calib.get("sha256"),
                           "calibration_sources": [e.get("path") if isinstance(e, dict) else e
                                                   for e in calib.get("sources") or []]}
    if unreadable:
        how = "compared by content hash only" if files else "not compared (no content hash recorded)"
        out["note"] = f"calibration file(s) not found here, {how}: {', '.join(unreadable)}"
    for r in out["reasons"]:
        log.warning("evaluation data overlaps calibration data: %s", r)
    return out
