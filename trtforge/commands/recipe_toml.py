"""A quantization recipe as TOML of the keys that apply to it (``trtforge recipes show NAME``).

In:  a :class:`~trtforge.calibration.recipe.QuantRecipe` (a preset).
Out: TOML text that ``trtforge quantize --recipe FILE`` loads back as the same recipe: ``base``
     names the preset (so a key TOML cannot write, such as ``alpha`` = null for automatic, comes
     from it), then every key the recipe's method reads, with its value. Keys of other methods
     (an FP8 recipe's alpha grid, an INT8 recipe's AWQ grids) are left out.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any

from trtforge.calibration.recipe import CalibMethod, Int4Method, QuantRecipe
from trtforge.vocab import Precision

# the calibration data keys every recipe reads (its own [calibration] table in a run recipe)
DATA_KEYS = ("num_samples", "seq_len", "calib_mode", "text_field", "seed", "batch_size")
HISTOGRAM_METHODS = (CalibMethod.PERCENTILE, CalibMethod.ENTROPY, CalibMethod.MSE)


def applicable_keys(r: QuantRecipe) -> list[str]:
    """The recipe fields its method reads, in the dataclass's order."""
    keys = {"name", "precision", "exclude", "dtype", "calib_device", *DATA_KEYS}
    if r.precision == Precision.INT4:
        keys |= {"int4_method", "block_size"}
        if r.int4_method == Int4Method.AWQ:
            keys |= {"awq_grid", "awq_clip", "keep_tokens"}
            if r.awq_clip:
                keys.add("awq_clip_grid")
    else:  # INT8 / FP8: activations are calibrated too
        keys |= {"smoothquant", "calib_method", "quantize_attention_bmm", "weight_granularity"}
        methods = {r.calib_method}
        if r.smoothquant:
            keys |= {"alpha", "smooth_attention_output", "smooth_mlp_down", "smooth_with_mul", "unsmoothed_calib_method"}
            if r.alpha is None:
                keys |= {"alpha_grid", "keep_tokens"}
            if r.unsmoothed_calib_method is not None:
                methods.add(r.unsmoothed_calib_method)
        if CalibMethod.PERCENTILE in methods:
            keys.add("percentile")
        if methods & set(HISTOGRAM_METHODS):
            keys.add("histogram_bins")
    return [f for f in QuantRecipe.__dataclass_fields__ if f in keys]


def _value(v: Any) -> str:
    if isinstance(v, Enum):
        v = v.value
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string is a JSON string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {v!r}")


def recipe_toml(r: QuantRecipe, base: str | None = None) -> str:
    """The recipe as TOML (module docstring); ``base``: the preset it loads on top of."""
    lines = [f"# quantization recipe {r.name}: {r.precision.value}"
             + (", SmoothQuant" if r.smoothquant else "")
             + (f", {r.int4_method.value.upper()}" if r.precision == Precision.INT4 else "")
             + " (only the keys this method reads)",
             "# use: trtforge quantize EXPORT --recipe this.toml --calib DATA -o OUT; or [quantize] in a run recipe"]
    if base is not None:
        lines.append(f"base = {_value(base)}")
    for key in applicable_keys(r):
        v = getattr(r, key)
        if v is None:
            what = "automatic, per layer from alpha_grid" if key == "alpha" else "as calib_method"
            lines.append(f"# {key}: {what} (TOML has no null: it comes from base)")
            continue
        lines.append(f"{key} = {_value(v)}")
    return "\n".join(lines) + "\n"
