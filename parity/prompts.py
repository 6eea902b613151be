"""Task prompts for task-level parity: a JSONL file of categorized prompts, with answers where checkable.

In:  PROMPTS.jsonl, one JSON object a line::

         {"prompt": "Twelve plus thirty is", "category": "math", "answer": "42"}

     ``prompt`` and ``category`` are required, non-empty strings; ``answer`` (a string or a
     number) is optional; ``id`` (a string or a number) is an optional label for the report.
     Blank lines are skipped; any other key is refused, so a misspelt ``answer`` cannot silently
     turn accuracy off.
Out: :class:`PromptSet` — the prompts in file order, their categories in order of first
     appearance, and a description (path, sha256, counts) for the report. Every problem is a
     one-line InputError naming ``file:line``.

Correctness of an answer (:func:`answer_correct`): the continuation contains the answer after
both are normalised — lower-cased, runs of whitespace collapsed to one space, ends stripped. It
is a containment check, not exact match: "The answer is 42." is correct for "42" (and so is
"142": answers should be distinctive enough for the prompt set at hand).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trtforge.artifacts import sha256_file
from trtforge.errors import InputError
from trtforge.textdata import _decode as decode_text

KEYS = ("prompt", "category", "answer", "id")


@dataclass(frozen=True)
class Prompt:
    index: int  # position in the file's prompts (0-based), the report's key
    line: int  # line number in the file (1-based)
    prompt: str
    category: str
    answer: str | None = None
    id: str | None = None


@dataclass(frozen=True)
class PromptSet:
    path: Path
    prompts: tuple[Prompt, ...]
    sha256: str

    @property
    def categories(self) -> list[str]:
        """Category names in order of first appearance."""
        return list(dict.fromkeys(p.category for p in self.prompts))

    def in_category(self, category: str) -> list[Prompt]:
        return [p for p in self.prompts if p.category == category]

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path.resolve()), "sha256": self.sha256, "num_prompts": len(self.prompts),
                "num_with_answer": sum(p.answer is not None for p in self.prompts),
                "categories": {c: len(self.in_category(c)) for c in self.categories}}


def _label(value: Any, where: str, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InputError(f"{where}: {key!r} is {type(value).__name__}, not text",
                         f"store the {key} as a string (or a number)")
    return value if isinstance(value, str) else str(value)


def load_prompts(path: str | os.PathLike[str]) -> PromptSet:
    """Read and check a prompts file (module docstring); every problem names ``file:line``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"prompts file {p} does not exist", "check the path given to --prompts")
    if p.is_dir():
        raise InputError(f"prompts file {p} is a folder", "pass one .jsonl file of prompts")
    text = decode_text(p)
    prompts: list[Prompt] = []
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{p}:{n}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where} is not valid JSON ({exc.msg}, column {exc.colno})",
                             'each line must be one object: {"prompt": "...", "category": "...", "answer": "..."}') from None
        if not isinstance(obj, dict):
            raise InputError(f"{where} is a JSON {type(obj).__name__}, not an object",
                             'each line must be one object: {"prompt": "...", "category": "..."}')
        unknown = sorted(set(obj) - set(KEYS))
        if unknown:
            raise InputError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}",
                             f"allowed keys: {', '.join(KEYS)}")
        for key in ("prompt", "category"):
            if key not in obj:
                raise InputError(f"{where} has no {key!r}", f"every line needs \"prompt\" and \"category\" (has: "
                                 f"{', '.join(sorted(obj)) or 'nothing'})")
            if not isinstance(obj[key], str):
                raise InputError(f"{where}: {key!r} is {type(obj[key]).__name__}, not text", f"store the {key} as a string")
            if not obj[key].strip():
                raise InputError(f"{where}: {key!r} is empty", f"give every prompt a non-empty {key}")
        answer = obj.get("answer")
        if answer is not None:
            answer = _label(answer, where, "answer")
            if not normalize(answer):
                raise InputError(f"{where}: 'answer' is empty", "leave the answer out (or null) where none is checkable")
        ident = obj.get("id")
        prompts.append(Prompt(len(prompts), n, obj["prompt"], obj["category"].strip(), answer,
                              None if ident is None else _label(ident, where, "id")))
    if not prompts:
        raise InputError(f"prompts file {p} holds no prompts", 'add lines like {"prompt": "...", "category": "math"}')
    return PromptSet(p, tuple(prompts), sha256_file(p))


def normalize(text: str) -> str:
    """Lower case, whitespace runs collapsed to one space, ends stripped."""
    return " ".join(text.lower().split())


def answer_correct(continuation: str, answer: str) -> bool:
    """Whether the continuation contains the answer, both normalised (module docstring)."""
    return normalize(answer) in normalize(continuation)
