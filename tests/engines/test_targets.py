from __future__ import annotations

import pytest

from trtforge.engines.targets import FP4, FP8, FP16, INT4, INT8, TARGETS, check_supported, resolve_target
from trtforge.env import Gpu
from trtforge.errors import InputError, TargetError


@pytest.mark.parametrize("name,sm", [("hopper", 90), ("ada", 89), ("ampere", 80), ("sm_86", 86), ("SM_90", 90)])
def test_aliases_resolve_to_compute_capability(name, sm):
    assert resolve_target(name).sm == sm


def test_auto_reads_the_gpu_of_this_machine():
    assert resolve_target("auto", [Gpu(0, "NVIDIA L4", "8.9")]).name == "sm_89"
    odd = resolve_target("auto", [Gpu(0, "Future GPU", "13.0")])
    assert odd.sm == 130 and odd.supports(FP8)
    with pytest.raises(TargetError, match="found no NVIDIA GPU"):
        resolve_target("auto", [])


def test_unknown_target_names_the_choices():
    with pytest.raises(InputError, match="unknown target 'volta'") as info:
        resolve_target("volta")
    assert "hopper" in info.value.one_line()


def test_precision_table():
    assert not TARGETS["sm_80"].supports(FP8) and not TARGETS["sm_86"].supports(FP8)
    assert TARGETS["sm_89"].supports(FP8) and TARGETS["sm_90"].supports(FP8)
    assert TARGETS["sm_75"].supports(INT8) and not TARGETS["sm_75"].supports(INT4)
    assert TARGETS["sm_80"].supports(INT4) and TARGETS["sm_80"].supports(FP16)
    assert not TARGETS["sm_90"].supports(FP4) and TARGETS["sm_100"].supports(FP4)
    assert {FP8, INT8, INT4, FP16}.issubset(TARGETS["cpu"].precisions())


def test_fp8_on_ampere_is_refused_with_the_alternative():
    with pytest.raises(TargetError) as info:
        check_supported(resolve_target("ampere"), FP8)
    line = info.value.one_line()
    assert "cannot run fp8" in line and "8.9" in line
    assert "int8-sq or int4-awq recipe" in line
