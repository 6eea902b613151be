from __future__ import annotations

import copy
import re

import pytest

from trtforge.engines.profiles import DimOverride, DimRange, derive_profile
from trtforge.errors import InputError


def _decoder(past: bool = False, max_positions: int = 256) -> dict:
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
              {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total_sequence" if past else "sequence"]},
              {"name": "position_ids", "dtype": "int64", "shape": ["batch", "sequence"]}]
    outputs = [{"name": "logits", "dtype": "float32", "shape": ["batch", "sequence", 1000]}]
    if past:
        inputs.append({"name": "past_key_values.0.key", "dtype": "float32", "shape": ["batch", 2, "past_sequence", 16]})
        outputs.append({"name": "present.0.key", "dtype": "float32", "shape": ["batch", 2, "total_sequence", 16]})
    return {"io": {"inputs": inputs, "outputs": outputs}, "dims": {"max_positions": max_positions, "vocab_size": 1000}}


def ov(*texts: str) -> tuple[DimOverride, ...]:
    return tuple(DimOverride.parse(t) for t in texts)


def test_parse():
    assert DimRange.parse("1:8:32") == DimRange(1, 8, 32)
    assert DimRange.parse(" 128 ") == DimRange(128, 128, 128)
    assert DimOverride.parse("batch=1:8:32") == DimOverride("batch", DimRange(1, 8, 32))
    for bad in ("1:8", "a:b:c", "1x3x224", "-1:2:3"):
        with pytest.raises(ValueError):
            DimRange.parse(bad)
    with pytest.raises(ValueError):
        DimOverride.parse("input:1x3x224")


def test_defaults_from_the_manifest():
    p = derive_profile(_decoder())
    assert p.symbol("batch") == DimRange(1, 1, 8)
    assert p.symbol("sequence") == DimRange(1, 128, 256)
    ids = {i.name: i for i in p.inputs}["input_ids"]
    assert (ids.min, ids.opt, ids.max) == ((1, 1), (1, 128), (8, 256))
    assert p.source == "defaults"


def test_kv_cache_profile_derives_total_sequence():
    p = derive_profile(_decoder(past=True), ov("past_sequence=0:100:200", "sequence=1:1:64"))
    assert p.symbol("total_sequence") == DimRange(1, 101, 256)  # capped at max positions
    past = {i.name: i for i in p.inputs}["past_key_values.0.key"]
    assert past.min == (1, 2, 0, 16) and past.opt == (1, 2, 100, 16) and past.max == (8, 2, 200, 16)
    default = derive_profile(_decoder(past=True))
    assert default.symbol("sequence").opt == 1 and default.symbol("past_sequence") == DimRange(0, 128, 255)


def test_overrides_apply_to_every_input_with_the_symbol():
    p = derive_profile(_decoder(), ov("batch=1:8:32", "sequence=1:64:128"))
    assert all(i.max[0] == 32 and i.opt[0] == 8 for i in p.inputs)
    assert p.symbol("sequence") == DimRange(1, 64, 128)


@pytest.mark.parametrize("given,match", [
    (("sequence=1:128:512",), "beyond the model's 256 positions"),
    (("batch=1:16:8",), "min <= opt <= max"),
    (("batch=0:1:8",), "min must be at least 1"),
    (("heads=1:2:4",), "unknown dimension 'heads'.*batch, sequence"),
    (("total_sequence=1:2:3",), "cannot be set"),
    (("batch=1:1:8", "batch=1:2:8"), "given twice"),
    (("past_sequence=0:1:10",), "not a dynamic dimension"),
])
def test_profiles_that_contradict_the_model(given, match):
    with pytest.raises(InputError, match=match):
        derive_profile(_decoder(), ov(*given))


def test_past_must_leave_room_and_static_dims_take_no_range():
    with pytest.raises(InputError, match="leaves no position"):
        derive_profile(_decoder(past=True), ov("past_sequence=0:10:256"))
    static = copy.deepcopy(_decoder())
    for t in static["io"]["inputs"] + static["io"]["outputs"]:
        t["shape"] = [1, 128] + t["shape"][2:]
    with pytest.raises(InputError, match="sequence is not a dynamic dimension.*input_ids \\[1, 128\\]"):
        derive_profile(static, ov("sequence=1:64:128"))
    assert derive_profile(static).inputs == ()


def test_unbounded_sequence_needs_an_explicit_range():
    m = _decoder()
    del m["dims"]["max_positions"]
    with pytest.raises(InputError, match="give --profile sequence"):
        derive_profile(m)
    assert derive_profile(m, ov("sequence=1:32:4096")).symbol("sequence").max == 4096


def test_cli_rejects_untyped_profiles(tiny_art):
    from click.testing import CliRunner

    from trtforge.cli import main

    art = tiny_art("int8")
    r = CliRunner().invoke(main, ["build", str(art.path), "--target", "sm_90", "--dry-run", "--profile", "x:1x64"])
    assert r.exit_code == 2 and "SYMBOL=MIN:OPT:MAX" in r.output
    r = CliRunner().invoke(main, ["build", str(art.path), "--target", "sm_90", "--dry-run", "--profile", "batch=1:64:32"])
    assert r.exit_code == 1 and "min <= opt <= max" in r.output


@pytest.mark.parametrize("past,given", [
    (False, "batch=32:8:8"),       # the new user's --profile; its example used to read batch=32:32:8
    (False, "batch=0:0:0"),
    (False, "batch=0:4:2"),
    (False, "batch=8:1:4"),
    (False, "sequence=1:512:300"),
    (False, "sequence=300:1:2"),
    (True, "past_sequence=300:0:5"),
    (True, "past_sequence=9:3:3"),
    (True, "sequence=0:0:512"),
])
def test_the_example_an_error_gives_is_itself_accepted(past, given):
    m = _decoder(past=past)
    with pytest.raises(InputError) as info:
        derive_profile(m, ov(given))
    example = re.search(r"e\.g\. (\w+=[\d:]+)", info.value.one_line())
    assert example, info.value.one_line()
    derive_profile(m, ov(example.group(1)))


def test_the_examples_of_the_syntax_errors_parse():
    for bad in ("batch", "batch=1:8", "1x3=4"):
        with pytest.raises(ValueError) as info:
            DimOverride.parse(bad)
        for ex in re.findall(r"e\.g\. ([^)]+)\)", str(info.value)):
            for part in ex.replace(" or ", ",").split(","):
                part = part.strip()
                DimOverride.parse(part) if "=" in part else DimRange.parse(part) if part[0].isdigit() else None
