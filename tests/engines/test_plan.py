from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from trtforge.cli import main
from trtforge.engines.build import build, prepare
from trtforge.engines.plan import BuildOptions, HardwareCompatibility, Layout
from trtforge.engines.profiles import DimOverride
from trtforge.engines.targets import resolve_target
from trtforge.errors import InputError, TargetError


@pytest.mark.parametrize("opts,target,match", [
    (BuildOptions(optimization_level=7), "sm_90", "optimization_level 7"),
    (BuildOptions(workspace_mib=0), "sm_90", "not positive"),
    (BuildOptions(exclude_lean_runtime=True), "sm_90", "needs version_compatible"),
    (BuildOptions(hardware_compatibility=HardwareCompatibility.AMPERE_PLUS), "sm_75", "ampere-plus cannot target sm_75"),
    (BuildOptions(version_compatible=True), "cpu", "applies to TensorRT targets"),
    (BuildOptions(model_name="my model"), "sm_90", "Triton does not accept"),
])
def test_bad_options(opts, target, match):
    with pytest.raises(InputError, match=match):
        opts.check(resolve_target(target))


def test_plan_is_data_with_strong_typing_and_documented_costs(tiny_art):
    _, plan = prepare(tiny_art("int8"), "hopper")
    p = json.loads(json.dumps(plan.to_json()))
    assert p["network"]["flags"] == ["STRONGLY_TYPED"] and p["config"]["precision_flags"] == []
    assert p["config"]["profiling_verbosity"] == "DETAILED" and p["config"]["builder_optimization_level"] == 3
    assert p["profiles"][0]["symbols"] == {"batch": [1, 1, 8]} and p["costs"] == []
    assert p["target"]["name"] == "sm_90" and p["precision"]["precision"] == "int8"

    opts = BuildOptions(hardware_compatibility=HardwareCompatibility.AMPERE_PLUS, version_compatible=True,
                        exclude_lean_runtime=True, workspace_mib=2048, optimization_level=5,
                        profile=(DimOverride.parse("batch=1:4:16"),))
    _, plan = prepare(tiny_art("int8"), "sm_86", opts)
    p = plan.to_json()
    assert p["config"]["hardware_compatibility_level"] == "ampere-plus"
    assert p["config"]["builder_flags"] == ["VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"]
    assert p["config"]["workspace_bytes"] == 2048 << 20 and p["profiles"][0]["symbols"]["batch"] == [1, 4, 16]
    costs = " ".join(p["costs"])
    assert "48 KiB" in costs and "can be slower" in costs and "lean runtime" in costs and "scratch memory" in costs


def test_gpu_target_without_tensorrt_says_what_to_install(tiny_art, tmp_path, monkeypatch):
    import trtforge.env as env

    monkeypatch.setattr(env, "tensorrt_status", lambda: {"available": False, "reason": "ModuleNotFoundError: tensorrt"})
    with pytest.raises(TargetError) as info:
        build(tiny_art("int8"), "sm_90", tmp_path / "out")
    line = info.value.one_line()
    assert "needs TensorRT" in line and "pip install 'trtforge[gpu]'" in line and "--target cpu" in line
    monkeypatch.setattr(env, "tensorrt_status", lambda: {"available": True, "version": "10.13.0.35"})
    monkeypatch.setattr(env, "gpus", lambda: [])
    with pytest.raises(TargetError, match="needs an NVIDIA GPU and none was found.*--target cpu"):
        build(tiny_art("int8"), "sm_90", tmp_path / "out")
    from trtforge.env import Gpu

    monkeypatch.setattr(env, "gpus", lambda: [Gpu(0, "NVIDIA A10", "8.6")])
    with pytest.raises(TargetError, match="builds for the GPU it runs on.*NVIDIA A10"):
        build(tiny_art("int8"), "hopper", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_dry_run_and_errors(tiny_art, tmp_path):
    art = tiny_art("int8")
    r = CliRunner().invoke(main, ["build", str(art.path), "-t", "sm_89", "--dry-run", "--json",
                                  "--hardware-compatibility", "same-compute-capability"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["target"]["sm"] == 89 and "no compatibility" in plan["costs"][0]
    r = CliRunner().invoke(main, ["build", str(art.path), "-t", "sm_90", "--dry-run"])
    assert r.exit_code == 0 and "STRONGLY_TYPED" in r.output
    r = CliRunner().invoke(main, ["build", str(art.path), "-t", "sm_90"])
    assert r.exit_code == 1 and "-o/--output is required" in r.output
    r = CliRunner().invoke(main, ["build", str(art.path), "-t", "fermi", "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "unknown target 'fermi'" in r.output
    r = CliRunner().invoke(main, ["build", str(tmp_path / "missing"), "-t", "cpu", "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "does not exist" in r.output


def test_layout_enum_round_trip():
    assert Layout("triton") is Layout.TRITON and BuildOptions(layout=Layout.TRITON).to_json()["layout"] == "triton"


def test_gpu_only_options_are_refused_for_cpu_and_reference_must_be_an_engine(tiny_art, tmp_path):
    from pathlib import Path

    with pytest.raises(InputError, match="timing_cache, optimization_level applies to TensorRT targets"):
        BuildOptions(timing_cache=Path("x.cache"), optimization_level=5).check(resolve_target("cpu"))
    art = tiny_art("int8")
    with pytest.raises(InputError, match="not a TensorRT engine folder"):
        prepare(art, "sm_90", BuildOptions(reference_engine=art.path))
    with pytest.raises(InputError, match="does not exist"):
        prepare(art, "sm_90", BuildOptions(reference_engine=tmp_path / "nope"))


def test_cli_gpu_target_without_tensorrt_is_one_line(tiny_art, tmp_path, monkeypatch):
    import trtforge.env as env

    monkeypatch.setattr(env, "tensorrt_status", lambda: {"available": False, "reason": "ModuleNotFoundError: tensorrt"})
    r = CliRunner().invoke(main, ["build", str(tiny_art("int8").path), "-t", "hopper", "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and r.output.startswith("error: --target sm_90 needs TensorRT")
    assert r.output.count("\n") == 1 and "--target cpu" in r.output and not (tmp_path / "o").exists()


def test_dry_run_warns_when_this_machine_cannot_build_the_plan(tiny_art, monkeypatch):
    from trtforge import env
    from trtforge.env import Gpu

    art = tiny_art("int8")
    monkeypatch.setattr(env, "tensorrt_status", lambda: {"available": False, "reason": "ModuleNotFoundError: tensorrt"})
    r = CliRunner().invoke(main, ["build", str(art.path), "--target", "hopper", "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["buildable_here"] is False and "TensorRT is not importable" in plan["warnings"][0]
    assert "cannot be built on this machine: TensorRT is not importable" in r.stderr
    r = CliRunner().invoke(main, ["build", str(art.path), "--target", "hopper", "--dry-run"])
    assert r.exit_code == 0 and "STRONGLY_TYPED" in r.stdout and "cannot be built on this machine" in r.stderr
    # TensorRT present but another GPU: TensorRT builds for the GPU it runs on
    monkeypatch.setattr(env, "tensorrt_status", lambda: {"available": True, "version": "10.9"})
    monkeypatch.setattr(env, "gpus", lambda: [Gpu(0, "NVIDIA A10", "8.6")])
    plan = json.loads(CliRunner().invoke(main, ["build", str(art.path), "-t", "hopper", "--dry-run", "--json"]).stdout)
    assert plan["buildable_here"] is False and "NVIDIA A10" in plan["warnings"][0]
    monkeypatch.setattr(env, "gpus", lambda: [Gpu(0, "NVIDIA H100", "9.0")])
    r = CliRunner().invoke(main, ["build", str(art.path), "-t", "hopper", "--dry-run", "--json"])
    assert json.loads(r.stdout)["buildable_here"] is True and json.loads(r.stdout)["warnings"] == [] and not r.stderr
    r = CliRunner().invoke(main, ["build", str(art.path), "-t", "cpu", "--dry-run", "--json"])
    assert json.loads(r.stdout)["buildable_here"] is True and not r.stderr
