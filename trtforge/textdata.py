"""Calibration and evaluation text: read files, tokenize, cut deterministic samples.

In:  text files (one or many), JSONL with a named text field, or pre-tokenized ``.npz``.
Out: :class:`Samples`, token-id arrays (no padding) with a hash recorded in manifests.

Decoders get ``windows``: N windows of L tokens cut from the concatenated token stream, the way
LLM calibration is usually done. Encoders get ``sentences``: each sentence tokenized with its
special tokens, as the model sees real requests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trtforge.errors import CalibrationError, InputError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ""}
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}


@dataclass(frozen=True)
class Document:
    source: str
    text: str


@dataclass
class Samples:
    """Token-id samples, each a 1-D int64 array of real tokens (no padding)."""

    ids: list[np.ndarray]
    mode: str
    sources: list[str]
    notes: list[str] = field(default_factory=list)
    token_type_ids: list[np.ndarray] | None = None
    # every text file read, absolute path and sha256: lets parity recognise its evaluation data
    # as calibration data by content, whatever folder either ran from
    files: list[dict[str, str]] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for a in self.ids:
            h.update(np.int64(len(a)).tobytes())
            h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        return h.hexdigest()

    @property
    def num_tokens(self) -> int:
        return int(sum(len(a) for a in self.ids))

    def describe(self) -> dict:
        lengths = [len(a) for a in self.ids]
        return {
            "mode": self.mode,
            "num_samples": len(self.ids),
            "num_tokens": self.num_tokens,
            "min_len": min(lengths) if lengths else 0,
            "max_len": max(lengths) if lengths else 0,
            "sha256": self.sha256,
            "sources": self.sources,
            "files": self.files,
            "notes": self.notes,
        }

    def split(self, holdout: int) -> tuple[Samples, Samples]:
        """The last ``holdout`` samples apart (e.g. to check a quantized model on unseen rows)."""
        k = max(0, len(self.ids) - holdout)
        tt = self.token_type_ids
        return (
            Samples(self.ids[:k], self.mode, self.sources, self.notes, tt[:k] if tt else None, self.files),
            Samples(self.ids[k:], self.mode, self.sources, self.notes, tt[k:] if tt else None, self.files),
        )


_BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
         (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def _decode(path: Path) -> str:
    """UTF-8 text; a file that starts with a byte-order mark is decoded by it (UTF-16/32 editors' output)."""
    data = path.read_bytes()
    for bom, codec in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(codec)
            except UnicodeDecodeError as exc:
                raise InputError(f"{path} starts with a {codec.upper()} byte-order mark but is not valid {codec.upper()} "
                                 f"(offset {exc.start})", f"re-save it as UTF-8, e.g. iconv -f {codec} -t utf-8") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path} is not UTF-8 text (undecodable byte 0x{data[exc.start]:02x} at offset {exc.start})",
            "convert it to UTF-8, e.g. iconv -f latin1 -t utf-8",
        ) from None


def read_documents(paths: Sequence[str | Path], text_field: str = "text") -> list[Document]:
    """Read text documents; every problem is a one-line InputError naming file and fix."""
    if not paths:
        raise InputError("no calibration data given", "pass one or more text, JSONL or .npz files")
    docs: list[Document] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise InputError(f"data file {path} does not exist", "check the path")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES)
            if not files:
                raise InputError(f"data folder {path} holds no .txt or .jsonl files", "add text files or pass files")
            docs += read_documents(files, text_field)
            continue
        suffix = path.suffix.lower()
        if suffix == ".npz":
            raise InputError(f"{path} is pre-tokenized (.npz) and cannot be mixed with text files", "pass it alone")
        text = _decode(path)
        if suffix in JSONL_SUFFIXES:
            docs += _read_jsonl(path, text, text_field)
        else:
            if not text.strip():
                raise InputError(f"data file {path} is empty", "pass a file with text in it")
            docs.append(Document(str(path), text))
    return docs


def _read_jsonl(path: Path, text: str, field_name: str) -> list[Document]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{n} is not valid JSON ({exc.msg})", "fix the line; each line must be one JSON object") from None
        if not isinstance(obj, dict) or field_name not in obj:
            keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
            raise InputError(f"{path}:{n} has no field {field_name!r} (has: {keys})", "set text_field to the field that holds the text: 'trtforge quantize ... "
                             "--set text_field=KEY', or 'text_field = \"KEY\"' under [calibration] in a run recipe "
                             "(--set calibration.text_field=KEY)")
        val = obj[field_name]
        if not isinstance(val, str):
            raise InputError(f"{path}:{n} field {field_name!r} is {type(val).__name__}, not text", "store the text as a string")
        if val.strip():
            out.append(Document(f"{path}:{n}", val))
    if not out:
        raise InputError(f"data file {path} has no non-empty {field_name!r} texts", "pass a file with text in it")
    return out


_SENT_END = re.compile(r"(?<=[.!?;:])\s+(?=[A-Z0-9\"'(])")


def split_sentences(text: str, min_words: int = 3) -> list[str]:
    """Paragraphs, then sentences; whitespace collapsed; fragments under min_words dropped."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        for s in _SENT_END.split(para):
            s = s.strip()
            if len(s.split()) >= min_words:
                out.append(s)
    return out


def load_npz(path: Path, vocab_size: int) -> Samples:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "input_ids" not in z:
                raise InputError(f"{path} has no 'input_ids' array (has: {', '.join(z.files)})", "save the token ids as input_ids")
            ids = z["input_ids"]
            mask = z["attention_mask"] if "attention_mask" in z.files else None
    except (ValueError, OSError) as exc:
        raise InputError(f"{path} is not a readable .npz file ({exc})", "write it with numpy.savez") from None
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"{path}: input_ids must be a 2-D integer array, got {ids.ndim}-D {ids.dtype}", "save shape [samples, tokens]")
    if ids.size == 0:
        raise InputError(f"{path}: input_ids is empty", "save at least one sample")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise InputError(f"{path}: token ids outside the vocabulary [0, {vocab_size})", "tokenize with this model's tokenizer")
    rows = []
    for i, row in enumerate(ids.astype(np.int64)):
        if mask is not None:
            row = row[mask[i].astype(bool)]
        if len(row):
            rows.append(row)
    return Samples(rows, "npz", [str(path)])


def prompt_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a prompt's text (e.g. ``[<bos>]`` for Llama
    and Gemma, nothing for GPT-2 or Qwen2); tokens it appends are not part of it."""
    try:
        plain = list(tokenizer("hello", add_special_tokens=False)["input_ids"])
        full = list(tokenizer("hello", add_special_tokens=True)["input_ids"])
    except Exception:  # noqa: BLE001 - a tokenizer that cannot say gets no prefix
        return []
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return [int(t) for t in full[:k]]
    return []


def build_samples(
    paths: Sequence[str | Path],
    tokenizer,
    *,
    mode: str,
    num_samples: int,
    seq_len: int,
    seed: int,
    max_positions: int,
    vocab_size: int,
    text_field: str = "text",
) -> Samples:
    """Deterministic samples from ``paths`` (see module docstring)."""
    paths = [Path(p).expanduser() for p in paths]
    if len(paths) == 1 and paths[0].suffix.lower() == ".npz":
        if not paths[0].exists():
            raise InputError(f"data file {paths[0]} does not exist", "check the path")
        s = load_npz(paths[0], vocab_size)
        return _take(s.ids, num_samples, seed, s, "npz")
    if tokenizer is None:
        raise InputError("this artifact has no tokenizer, so text cannot be tokenized", "pass pre-tokenized .npz data")
    if num_samples < 1 or seq_len < 2:
        raise InputError(f"need at least 1 sample of 2 tokens (got {num_samples} x {seq_len})", "raise num_samples / seq_len")
    docs = read_documents(paths, text_field)
    notes: list[str] = []
    if seq_len > max_positions:
        notes.append(f"seq_len {seq_len} exceeds the model's {max_positions} positions; using {max_positions}")
        log.warning(notes[-1])
        seq_len = max_positions
    sources = sorted({d.source.split(":")[0] for d in docs})
    files = [{"path": str(Path(x).resolve()), "sha256": _sha256(Path(x))} for x in sources]
    if mode == "windows":
        stream: list[int] = []
        sep = tokenizer.eos_token_id
        for d in docs:
            stream += tokenizer(d.text, add_special_tokens=False)["input_ids"]
            if sep is not None:
                stream.append(int(sep))
        total = len(stream)
        if total < seq_len:
            raise CalibrationError(
                f"the data holds {total} tokens, fewer than one sample of {seq_len}",
                "pass more text or lower calib.seq_len",
            )
        # Each window starts the way the tokenizer starts a prompt (its BOS, where it adds one),
        # as at inference: real decoders put their largest activations on that first token
        # (Gemma 3's FP32 perplexity on held-out text is 18.5 with <bos>, 44-113 without), so
        # windows without it calibrate ranges that miss those activations and score a model on
        # text it never sees.
        prefix = prompt_prefix(tokenizer)
        body = seq_len - len(prefix)
        chunks = total // body
        rng = np.random.default_rng(seed)
        if chunks < num_samples:
            notes.append(f"only {total} tokens: {chunks} samples of {seq_len} instead of {num_samples}")
            log.warning(notes[-1] + "; pass more text for a better calibration")
            picks = np.arange(chunks)
        else:
            picks = np.sort(rng.choice(chunks, size=num_samples, replace=False))
        arr = np.asarray(stream, dtype=np.int64)
        head = np.asarray(prefix, dtype=np.int64)
        if prefix:
            notes.append(f"each window starts with the tokenizer's prompt prefix {prefix}")
        return Samples([np.concatenate([head, arr[i * body : (i + 1) * body]]) for i in picks], mode, sources,
                       notes, files=files)
    if mode != "sentences":
        raise InputError(f"unknown calibration mode {mode!r}", "use windows or sentences")
    sentences = [s for d in docs for s in split_sentences(d.text)]
    if not sentences:
        raise CalibrationError("the data holds no sentences of three words or more", "pass real text")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sentences))
    if len(sentences) < num_samples:
        notes.append(f"only {len(sentences)} sentences: using all of them instead of {num_samples}")
        log.warning(notes[-1])
    chosen = [sentences[i] for i in order[:num_samples]]
    ids, types, truncated = [], [], 0
    for s in chosen:
        enc = tokenizer(s, truncation=True, max_length=seq_len)
        truncated += len(tokenizer(s)["input_ids"]) > seq_len
        ids.append(np.asarray(enc["input_ids"], np.int64))
        types.append(np.asarray(enc.get("token_type_ids", [0] * len(enc["input_ids"])), np.int64))
    if truncated:
        notes.append(f"{truncated} sentences longer than {seq_len} tokens were truncated")
        log.warning(notes[-1])
    return Samples(ids, mode, sources, notes, types, files)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _take(rows: list[np.ndarray], n: int, seed: int, s: Samples, mode: str) -> Samples:
    if len(rows) > n:
        rng = np.random.default_rng(seed)
        rows = [rows[i] for i in np.sort(rng.choice(len(rows), n, replace=False))]
    elif len(rows) < n:
        s.notes.append(f"the .npz holds {len(rows)} samples, fewer than the {n} asked for; using all")
    return Samples(rows, mode, s.sources, s.notes, files=s.files)


def load_tokenizer(folder: Path):
    """The tokenizer an export copied into its artifact (None if there is none)."""
    if not any((folder / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
