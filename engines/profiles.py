"""Optimization profiles: min/opt/max shapes for every dynamic input of an engine.

In:  the artifact manifest (``io.inputs`` with symbolic dims ``batch``, ``sequence``,
     ``past_sequence``, ``total_sequence``; ``dims.max_positions``) and optional overrides,
     one per symbol, as typed ranges (``--profile batch=1:8:32 --profile sequence=1:128:512``).
Out: a :class:`ShapeProfile` (per-symbol ranges and per-input shapes), or an InputError when a
     range contradicts the model (sequence beyond max positions, min > opt, a dim that is not
     dynamic in this model, ...).

Symbols tie inputs together: every input with a ``batch`` axis gets the same batch range, so
the profile stays consistent with what the model accepts. ``total_sequence`` (the attention
mask of a decoder with a KV cache) is always ``past_sequence + sequence``, so it is derived.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from trtforge.errors import InputError
from trtforge.manifest import Manifest

BATCH, SEQ, PAST, TOTAL = "batch", "sequence", "past_sequence", "total_sequence"
KNOWN_SYMBOLS = (BATCH, SEQ, PAST, TOTAL)

# Defaults when no --profile names a symbol: small batches (a serving team widens them), the
# full context of the model, prompts of 128 tokens as the shape TensorRT tunes for.
DEFAULT_BATCH = (1, 1, 8)
DEFAULT_OPT_SEQUENCE = 128

_RANGE = re.compile(r"^\s*(\d+)\s*(?::\s*(\d+)\s*:\s*(\d+)\s*)?$")


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str) -> DimRange:
        """``"1:8:32"`` -> DimRange(1, 8, 32); ``"128"`` -> DimRange(128, 128, 128)."""
        m = _RANGE.match(text)
        if not m:
            raise ValueError(f"{text!r} is not MIN:OPT:MAX or a single size (e.g. 1:8:32 or 128)")
        lo = int(m.group(1))
        if m.group(2) is None:
            return cls(lo, lo, lo)
        return cls(lo, int(m.group(2)), int(m.group(3)))

    @property
    def fixed(self) -> bool:
        return self.min == self.opt == self.max

    def to_json(self) -> list[int]:
        return [self.min, self.opt, self.max]

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


@dataclass(frozen=True)
class DimOverride:
    """One ``--profile SYMBOL=MIN:OPT:MAX``."""

    symbol: str
    range: DimRange

    @classmethod
    def parse(cls, text: str) -> DimOverride:
        if "=" not in text:
            raise ValueError(f"{text!r} is not SYMBOL=MIN:OPT:MAX (e.g. batch=1:8:32)")
        sym, _, rng = text.partition("=")
        sym = sym.strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", sym):
            raise ValueError(f"{sym!r} is not a dimension name (e.g. batch, sequence, past_sequence)")
        try:
            return cls(sym, DimRange.parse(rng))
        except ValueError as exc:
            raise ValueError(f"profile {sym}: {exc}") from None

    def __str__(self) -> str:
        return f"{self.symbol}={self.range}"


@dataclass(frozen=True)
class InputShape:
    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True)
class ShapeProfile:
    symbols: tuple[tuple[str, DimRange], ...]
    inputs: tuple[InputShape, ...]
    source: str  # "defaults" | "defaults+--profile"

    def symbol(self, name: str) -> DimRange | None:
        return dict(self.symbols).get(name)

    def opt_shapes(self) -> dict[str, tuple[int, ...]]:
        return {i.name: i.opt for i in self.inputs}

    def to_json(self) -> dict:
        return {"symbols": {k: v.to_json() for k, v in self.symbols}, "inputs": [i.to_json() for i in self.inputs],
                "source": self.source}


def _symbols_of(io_inputs: list[dict]) -> dict[str, list[str]]:
    """symbol -> input names that use it; raises on unnamed dynamic dims."""
    found: dict[str, list[str]] = {}
    for inp in io_inputs:
        for d in inp["shape"]:
            if d is None:
                raise InputError(f"input {inp['name']} has a dynamic dimension without a name",
                                 "re-export the model with trtforge so every dynamic axis is named")
            if isinstance(d, str):
                found.setdefault(d, []).append(inp["name"])
    return found


def _static_desc(io_inputs: list[dict]) -> str:
    return ", ".join(f"{i['name']} {list(i['shape'])}" for i in io_inputs[:3])


def inputs_and_positions(manifest: Manifest | dict) -> tuple[list, int | None]:
    """(``io.inputs``, ``dims.max_positions``) of a typed manifest or of its JSON form."""
    if isinstance(manifest, Manifest):
        return (list(manifest.io.inputs) if manifest.io else []), (manifest.dims.max_positions if manifest.dims else None)
    doc = manifest  # the JSON form (tests, scripts)
    return list((doc.get("io") or {}).get("inputs") or []), (doc.get("dims") or {}).get("max_positions")


def _suggest(symbol: str, r: DimRange, low: int, max_pos: int | None) -> DimRange:
    """A range this symbol accepts, close to the one given: the three values in order, at least
    ``low``, within the model's positions (the example an error gives must itself be valid)."""
    cap = None if max_pos is None else {SEQ: max_pos, PAST: max_pos - 1}.get(symbol)
    values = sorted(max(low, v) for v in (r.min, r.opt, r.max))
    if cap is not None:
        values = [min(v, cap) for v in values]
    return DimRange(*values)


def derive_profile(manifest: Manifest | dict, overrides: tuple[DimOverride, ...] = ()) -> ShapeProfile:
    """Profile for the artifact's inputs: defaults from the manifest, then the overrides."""
    inputs, max_pos = inputs_and_positions(manifest)
    if not inputs:
        raise InputError("the artifact manifest lists no inputs (io.inputs)", "re-run the stage that wrote it")
    used = _symbols_of(inputs)
    given: dict[str, DimRange] = {}
    for ov in overrides:
        s = ov.symbol
        if s in given:
            raise InputError(f"--profile {s} is given twice", "give each dimension once")
        if s == TOTAL:
            raise InputError("total_sequence is always past_sequence + sequence, so it cannot be set",
                             "set --profile sequence=... and --profile past_sequence=... instead")
        if s not in used:
            if s in KNOWN_SYMBOLS:
                raise InputError(f"--profile {ov}: {s} is not a dynamic dimension of this model "
                                 f"(inputs: {_static_desc(inputs)})",
                                 "static dimensions take no range; drop this --profile")
            raise InputError(f"--profile {ov}: unknown dimension {s!r}",
                             f"this model's dynamic dimensions: {', '.join(sorted(used)) or 'none'}")
        r = ov.range
        low = 0 if s == PAST else 1
        if r.min < low:
            raise InputError(f"--profile {ov}: min must be at least {low}", f"use e.g. {s}={_suggest(s, r, low, max_pos)}")
        if not r.min <= r.opt <= r.max:
            raise InputError(f"--profile {ov}: needs min <= opt <= max", f"e.g. {s}={_suggest(s, r, low, max_pos)}")
        given[s] = r

    has_past = PAST in used
    ranges: dict[str, DimRange] = {}
    for s in sorted(used):
        if s == TOTAL:
            continue
        if s in given:
            ranges[s] = given[s]
        elif s == BATCH:
            ranges[s] = DimRange(*DEFAULT_BATCH)
        elif s in (SEQ, PAST):
            if max_pos is None:
                raise InputError(f"the manifest has no dims.max_positions to bound {s}",
                                 f"give --profile {s}=MIN:OPT:MAX")
            if s == SEQ:
                opt = 1 if has_past else min(DEFAULT_OPT_SEQUENCE, max_pos)
                ranges[s] = DimRange(1, opt, max_pos)
            else:
                ranges[s] = DimRange(0, min(DEFAULT_OPT_SEQUENCE, max_pos - 1), max_pos - 1)
        else:
            raise InputError(f"dynamic dimension {s!r} has no default range", f"give --profile {s}=MIN:OPT:MAX")

    if max_pos is not None:
        if SEQ in ranges and ranges[SEQ].max > max_pos:
            raise InputError(f"--profile sequence={ranges[SEQ]}: max {ranges[SEQ].max} is beyond the model's "
                             f"{max_pos} positions", f"use at most sequence=...:{max_pos}")
        if PAST in ranges and ranges[PAST].max >= max_pos:
            raise InputError(f"--profile past_sequence={ranges[PAST]}: max {ranges[PAST].max} leaves no position "
                             f"for a new token (model has {max_pos})", f"use at most past_sequence=...:{max_pos - 1}")
        if SEQ in ranges and PAST in ranges and ranges[PAST].opt + ranges[SEQ].opt > max_pos:
            raise InputError(f"--profile opt shapes past_sequence {ranges[PAST].opt} + sequence {ranges[SEQ].opt} "
                             f"exceed the model's {max_pos} positions", "lower one of the opt values")
    if TOTAL in used:
        seq = ranges.get(SEQ, DimRange(1, 1, 1))
        past = ranges.get(PAST, DimRange(0, 0, 0))
        hi = seq.max + past.max
        if max_pos is not None:
            hi = min(hi, max_pos)
        ranges[TOTAL] = DimRange(seq.min + past.min, seq.opt + past.opt, hi)

    shapes = []
    for inp in inputs:
        lo, opt, hi = [], [], []
        for d in inp["shape"]:
            if isinstance(d, int):
                lo.append(d), opt.append(d), hi.append(d)
            else:
                r = ranges[d]
                lo.append(r.min), opt.append(r.opt), hi.append(r.max)
        if any(isinstance(d, str) for d in inp["shape"]):
            shapes.append(InputShape(inp["name"], tuple(lo), tuple(opt), tuple(hi)))
    return ShapeProfile(tuple(sorted(ranges.items())), tuple(shapes), "defaults+--profile" if overrides else "defaults")
