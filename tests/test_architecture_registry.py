"""The Architecture registry: every entry exports, names real GEMMs, and unknown names fail in one line.

The exports come from the session-cached ``exported`` fixture, so next to tests/exporter this
adds one tiny export per family that has no other test (RoBERTa) and nothing else.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re

import pytest

import trtforge.architectures
from trtforge.architectures import Architecture
from trtforge.errors import InputError
from trtforge.exporter import inspect_source
from trtforge.registry import ARCHITECTURES
from trtforge.testing.tinymodels import PRESETS

NAMES = ARCHITECTURES.names()
PASSTHROUGH = {"Reshape", "Cast", "Identity"}


def test_every_entry_module_registers_one_entry_under_its_module_name():
    # gemma3.py registers gemma3_text (config.json's model_type); every other module is its name
    owned = {}
    for m in pkgutil.iter_modules(trtforge.architectures.__path__):
        if m.name == "base":
            continue
        mod = importlib.import_module(f"trtforge.architectures.{m.name}")
        entries = [v for v in vars(mod).values() if isinstance(v, Architecture) and ARCHITECTURES.find(v.name) is v]
        assert len(entries) == 1, (m.name, entries)
        assert entries[0].name == m.name or entries[0].name.startswith(m.name + "_"), (m.name, entries[0].name)
        owned[entries[0].name] = m.name
    assert sorted(owned) == NAMES
    for arch in ARCHITECTURES:
        assert isinstance(arch, Architecture)
        assert ARCHITECTURES.get(arch.name) is arch
        assert arch.default_task == arch.tasks[0]
        assert set(arch.auto_class) == set(arch.tasks)
        assert arch.padding_side == ("left" if arch.is_decoder else "right")
        assert arch.wrapper == ("causal-lm" if arch.is_decoder else "encoder")
        assert (arch.cache is not None) == arch.is_decoder


def test_unknown_name_is_one_line_listing_the_known_ones():
    with pytest.raises(InputError) as info:
        ARCHITECTURES.get("t5")
    line = info.value.one_line()
    assert "\n" not in line and "unknown architecture 't5'" in line
    for name in NAMES:
        assert name in line
    assert ARCHITECTURES.find("t5") is None and "t5" not in ARCHITECTURES


def test_exporter_refusal_lists_every_registered_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5Model"]}))
    with pytest.raises(InputError) as info:
        inspect_source(tmp_path)
    line = info.value.one_line()
    assert "unsupported architecture 't5'" in line
    assert line.endswith(f"supported model types: {', '.join(NAMES)})")


@pytest.mark.parametrize("name", NAMES)
def test_every_architecture_has_a_tiny_preset_that_exports_and_validates(exported, name):
    arch = ARCHITECTURES.get(name)
    assert name in PRESETS and PRESETS[name][0] == name, f"add a {name!r} preset to trtforge/testing/tinymodels.py"
    art = exported(name)
    m = art.manifest
    assert m["validation"]["passed"] is True
    assert m["source"]["model_type"] == name and m["source"]["family"] == arch.family.value
    assert m["source"]["task"] == arch.default_task.value
    assert m["io"]["padding_side"] == arch.padding_side
    if arch.cache is not None:
        layers = m["dims"]["num_layers"]
        inputs = [t["name"] for t in m["io"]["inputs"]]
        outputs = [t["name"] for t in m["io"]["outputs"]]
        assert inputs[-2 * layers:] == arch.cache.inputs(layers)
        assert outputs[-2 * layers:] == arch.cache.outputs(layers)


def _gemm_weights(model) -> dict[str, str]:
    """GEMM weight initializer -> the tensor its activation comes from (through Reshape/Cast)."""
    inits = {t.name for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in inits:
            act = node.input[0]
            while act in producer and producer[act].op_type in PASSTHROUGH:
                act = producer[act].input[0]
            out[node.input[1]] = act
    return out


@pytest.mark.parametrize("name", NAMES)
def test_smoothing_groups_name_gemms_of_the_exported_model(exported, name):
    arch = ARCHITECTURES.get(name)
    assert arch.smoothing_groups, f"{name} declares no smoothing groups"
    art = exported(name)
    layers = art.manifest["dims"]["num_layers"]
    gemms = _gemm_weights(art.load())
    for role, suffixes in arch.smoothing_groups.items():
        for layer in range(layers):
            acts = set()
            for suffix in suffixes:
                hits = [w for w in gemms if re.search(rf"\.{layer}\.(.+\.)?{re.escape(suffix)}\.weight$", w)]
                assert len(hits) == 1, (role, suffix, layer, sorted(gemms))
                assert arch.smoothing_group_of(hits[0]) == role
                acts.add(gemms[hits[0]])
            assert len(acts) == 1, f"{name} {role} layer {layer}: {suffixes} do not read one activation"
    grouped = [w for w in gemms if arch.smoothing_group_of(w)]
    assert len(grouped) == layers * sum(len(s) for s in arch.smoothing_groups.values())


@pytest.mark.parametrize("name", [a.name for a in ARCHITECTURES if a.checkpoint is not None])
def test_checkpoint_entries_match_the_exported_model(exported, tiny_model, name):
    arch = ARCHITECTURES.get(name)
    cfg = json.loads((tiny_model(name) / "config.json").read_text())
    assert cfg["architectures"][0] == arch.checkpoint.architecture
    gemms = _gemm_weights(exported(name).load())
    for members in arch.checkpoint.fused.values():
        for leaf in members:
            assert any(w.endswith(f".{leaf}.weight") for w in gemms), (leaf, sorted(gemms))
