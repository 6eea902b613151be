"""Recipe files: TOML (YAML with the `yaml` extra), strict keys with file:line errors, --set overrides."""

from __future__ import annotations

import re
import sys
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
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist", "check the path, or name a preset")
    text = path.read_text(encoding="utf-8")
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


def load_quant_recipe(spec: str, sets: list[str] | tuple[str, ...] = ()):
    """A preset name or a recipe file (keys at the top level or under [quantize]), then --set."""
    overrides = parse_sets(sets)
    overrides = overrides.get("quantize", overrides)
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
    merged = {**base.to_dict(), **data, **overrides}
    return QuantRecipe.from_dict(merged, source=source if not overrides else f"{source} with --set")
