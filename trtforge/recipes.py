"""Recipe files: TOML (YAML with the `yaml` extra), strict keys with file:line errors, --set overrides.

A quantization recipe is the preset, then the file's keys, then ``--set``. When the result is
invalid the error is told where the bad value came from: ``r.toml:7: [quantize] alpha must be a
number`` when the file is wrong by itself, ``--set quantize.alpha=high: alpha must be a number``
when the file was fine and an override broke it (:func:`quant_recipe_from_layers`).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trtforge._deps import require
from trtforge.calibration.recipe import PRESETS, QuantRecipe, get_preset
from trtforge.errors import RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_recipe_file(path: str | Path) -> tuple[dict, str]:
    """Parse a TOML or YAML file; returns (data, text). Syntax errors name file and line."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise RecipeError(f"recipe file {path} is a folder", "pass the recipe file (TOML or YAML), or name a preset")
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist", "check the path, or name a preset")
    text = _recipe_text(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        yaml = require("yaml")
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise RecipeError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})", "fix the syntax") from None
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise RecipeError(f"{path}: invalid TOML ({exc})", "fix the syntax") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the top level must be a table of keys", "write key = value lines")
    return data, text


_BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def _recipe_text(path: Path) -> str:
    """The recipe as text: UTF-8, or what its byte-order mark says; one-line errors otherwise."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"recipe file {path} cannot be read: {exc.strerror or exc}", "check its permissions") from None
    codec = next((c for bom, c in _BOMS if data.startswith(bom)), "utf-8")
    try:
        return data.decode(codec)
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe file {path} is not {codec.upper()} text (byte 0x{data[exc.start]:02x} at offset "
                          f"{exc.start})", f"re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name}") from None


def key_line(text: str, key: str, table: str | None = None) -> int | None:
    """Line number (1-based) of ``key`` in a TOML/YAML text, inside ``[table]`` if given."""
    in_table = table is None
    pat = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*[=:]")
    for n, line in enumerate(text.splitlines(), 1):
        head = re.match(r"^\s*\[+([^\]]+)\]+", line)
        if head:
            in_table = table is not None and head.group(1).strip() == table
            continue
        if re.match(rf"^{re.escape(table)}:\s*$", line.strip()) if table else False:
            in_table = True
            continue
        if in_table and pat.match(line):
            return n
    return None


def table_line(text: str, table: str) -> int | None:
    """Line number (1-based) of a ``[table]`` header (TOML) or ``table:`` (YAML)."""
    for n, line in enumerate(text.splitlines(), 1):
        if re.match(rf"^\s*\[+\s*{re.escape(table)}\s*\]+", line) or re.match(rf"^{re.escape(table)}:\s*$", line):
            return n
    return None


def where(path: str | Path, text: str, key: str, table: str | None = None) -> str:
    line = key_line(text, key, table)
    return f"{path}:{line}" if line else str(path)


def parse_value(raw: str) -> Any:
    """A --set value as TOML would read it (numbers, booleans, lists, quoted strings); bare words are strings."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_sets(items: list[str] | tuple[str, ...]) -> dict:
    """``["quantize.alpha=0.8", "calib.num_samples=64"]`` -> nested dict."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise RecipeError(f"--set {item!r} is not key=value", "write e.g. --set alpha=0.8")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise RecipeError(f"--set {item!r} has an empty key", "write e.g. --set alpha=0.8")
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {key}: {p} is not a table", "check the key")
        node[parts[-1]] = parse_value(raw.strip())
    return out


# The source QuantRecipe's errors start with, replaced by where the value came from.
_SOURCE = "\x00recipe"
_FIELDS = tuple(QuantRecipe.__dataclass_fields__)


def _named_key(rest: str) -> str | None:
    """The recipe key an error names: an unknown key it quotes, else the first field it mentions."""
    m = re.match(r"unknown key '([^']+)'", rest)
    if m:
        return m.group(1)
    hits = [(m.start(), f) for f in _FIELDS for m in [re.search(rf"(?<![\w.]){re.escape(f)}(?!\w)", rest)] if m]
    return min(hits)[1] if hits else None


def _retold(exc: RecipeError, where: Callable[[str | None], str]) -> RecipeError:
    head = f"{_SOURCE}: "
    rest = exc.problem[len(head):] if exc.problem.startswith(head) else exc.problem.replace(_SOURCE, "recipe")
    return RecipeError(located(where(_named_key(rest)), rest), exc.hint)


def located(at: str, problem: str) -> str:
    """``r.toml:7: [quantize] problem`` or ``--set alpha=x: problem``."""
    return f"{at} {problem}" if at.endswith("]") else f"{at}: {problem}"


def quant_recipe_from_layers(final: dict, file_layer: dict, *, file_where: Callable[[str | None], str],
                             set_where: Callable[[str | None], str]) -> QuantRecipe:
    """``QuantRecipe.from_dict(final)``; an error is blamed on the file when ``file_layer`` (the
    preset and the file's keys, without --set) is invalid by itself, else on the --set override.
    ``file_where(key)`` / ``set_where(key)`` say where a key was set (``r.toml:7: [quantize]``,
    ``--set quantize.alpha=high``; a ``]`` at the end is followed by the problem, anything else
    by ``:``); key is None when the error names none."""
    try:
        return QuantRecipe.from_dict(final, source=_SOURCE)
    except RecipeError as exc:
        err = exc
    if file_layer != final:
        try:
            QuantRecipe.from_dict(file_layer, source=_SOURCE)
        except RecipeError as exc:
            raise _retold(exc, file_where) from None
        raise _retold(err, set_where) from None
    raise _retold(err, file_where) from None


def set_item(sets: list[str] | tuple[str, ...], *keys: str) -> str | None:
    """The last ``--set`` item whose key is one of ``keys`` (``quantize.alpha``, ``alpha``)."""
    found = None
    for item in sets:
        if item.split("=", 1)[0].strip() in keys:
            found = item
    return found


# a run recipe's [calibration] keys -> the QuantRecipe fields they set
CALIB_TO_RECIPE = {"num_samples": "num_samples", "seq_len": "seq_len", "mode": "calib_mode", "text_field": "text_field",
                   "seed": "seed", "batch_size": "batch_size"}


def quantize_overrides(over: dict) -> dict:
    """``trtforge quantize --set``: recipe keys as they are (``alpha=0.8``) or spelt as in a run
    recipe (``quantize.alpha=0.8``, ``calibration.num_samples=64``), merged; any other table is an
    error naming the spellings."""
    out = {k: v for k, v in over.items() if not isinstance(v, dict)}
    for table, keys in over.items():
        if not isinstance(keys, dict):
            continue
        if table == "calibration":
            for k, v in keys.items():
                if k not in CALIB_TO_RECIPE:
                    raise RecipeError(f"--set calibration.{k}: not a calibration key of a quantization recipe",
                                      f"calibration keys: {', '.join(CALIB_TO_RECIPE)}")
                out[CALIB_TO_RECIPE[k]] = v
        elif table == "quantize":
            out.update(keys)
        else:
            raise RecipeError(f"--set {table}.{next(iter(keys), '')}: trtforge quantize takes recipe keys, not [{table}]",
                              "write --set alpha=0.8, quantize.alpha=0.8 or calibration.num_samples=64")
    return out


def load_quant_recipe(spec: str, sets: list[str] | tuple[str, ...] = ()):
    """A preset name or a recipe file (keys at the top level or under [quantize]), then --set."""
    overrides = quantize_overrides(parse_sets(sets))
    text, table, path = "", None, None
    if spec in PRESETS:
        base = get_preset(spec)
        data: dict = {}
        source = f"preset {spec}"
    else:
        path = Path(spec)
        if not path.suffix and not path.exists():
            raise RecipeError(f"unknown quantization recipe {spec!r}", f"use one of: {', '.join(PRESETS)} or a recipe file")
        raw, text = read_recipe_file(path)
        data = raw.get("quantize", raw)
        table = "quantize" if "quantize" in raw else None
        base_name = data.pop("base", None)
        base = get_preset(base_name) if base_name else QuantRecipe(name=path.stem)
        known = set(QuantRecipe.__dataclass_fields__)
        for key in data:
            if key not in known:
                raise RecipeError(f"{where(path, text, key, table)}: unknown key {key!r}", f"valid keys: {', '.join(sorted(known))}")
        source = str(path)

    def file_where(key: str | None) -> str:
        if path is None or key is None or key not in data:
            return source
        return where(path, text, key, table) + (f": [{table}]" if table else "")

    def set_where(key: str | None) -> str:
        calib = {v: k for k, v in CALIB_TO_RECIPE.items()}.get(key or "")
        item = set_item(sets, key, f"quantize.{key}", *([f"calibration.{calib}"] if calib else [])) if key else None
        return f"--set {item}" if item else "--set"

    file_layer = {**base.to_dict(), **data}
    return quant_recipe_from_layers({**file_layer, **overrides}, file_layer, file_where=file_where, set_where=set_where)
