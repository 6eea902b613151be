from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from trtforge.artifacts import file_table, load_artifact, sha256_file, write_json
from trtforge.cli import main
from trtforge.engines.check import Machine, check_cpu, check_engine
from trtforge.env import Gpu

H100 = Gpu(0, "NVIDIA H100 80GB HBM3", "9.0")
H200 = Gpu(0, "NVIDIA H200", "9.0")
A100 = Gpu(0, "NVIDIA A100-SXM4-80GB", "8.0")
L4 = Gpu(0, "NVIDIA L4", "8.9")


@pytest.fixture
def engine_dir(tmp_path):
    made = []

    def make(trt="10.13.0.35", cc="9.0", name=H100.name, hw="none", vc=False):
        made.append(1)
        d = tmp_path / f"engine-{len(made)}"
        d.mkdir()
        (d / "model.plan").write_bytes(b"not really a plan")
        m = {"schema_version": 1, "kind": "engine", "stage": "build",
             "engine": {"file": "model.plan", "sha256": sha256_file(d / "model.plan")},
             "tensorrt": {"version": trt}, "gpu": {"name": name, "compute_capability": cc},
             "plan": {"config": {"hardware_compatibility_level": hw, "version_compatible": vc}}}
        m["files"] = file_table(d)
        write_json(d / "manifest.json", m)
        return load_artifact(d)

    return make


def here(trt="10.13.0.35", gpu=H100):
    return Machine(trt, (gpu,) if gpu else (), "1.32.0")


def test_same_version_and_gpu_loads(engine_dir):
    r = check_engine(engine_dir(), here())
    assert r.loads and all(c.ok for c in r.checks) and "will load here" in r.text()


def test_version_mismatch_does_not_load(engine_dir):
    r = check_engine(engine_dir(trt="10.12.0.36"), here())
    assert not r.loads and "exact version" in r.to_json()["checks"][1]["detail"]
    assert not check_engine(engine_dir(), here(trt=None)).loads  # no TensorRT here


def test_version_compatible_plans_load_in_later_runtimes_only(engine_dir):
    assert check_engine(engine_dir(trt="10.12.0.36", vc=True), here("11.1.0.1")).loads
    assert not check_engine(engine_dir(trt="11.1.0.1", vc=True), here("10.13.0.35")).loads


def test_gpu_rules(engine_dir):
    assert not check_engine(engine_dir(), here(gpu=A100)).loads
    assert not check_engine(engine_dir(), here(gpu=None)).loads
    same_cc = check_engine(engine_dir(), here(gpu=H200))
    assert same_cc.loads and same_cc.checks[2].warning
    assert check_engine(engine_dir(cc="8.0", name=A100.name, hw="ampere-plus"), here(gpu=L4)).loads
    assert not check_engine(engine_dir(cc="8.9", name=L4.name, hw="ampere-plus"), here(gpu=Gpu(0, "T4", "7.5"))).loads


def test_changed_engine_file_fails(engine_dir):
    art = engine_dir()
    art.engine_path.write_bytes(b"tampered")
    r = check_engine(art, here())
    assert not r.loads and "changed since the build" in r.checks[0].detail


def test_inspect_cli_exit_code(engine_dir):
    # No TensorRT and no GPU on this machine: the engine cannot load here.
    art = engine_dir()
    r = CliRunner().invoke(main, ["inspect", str(art.path), "--json"])
    assert r.exit_code == 1
    rep = json.loads(r.stdout)
    assert rep["loads_here"] is False and {c["what"] for c in rep["checks"]} == {"engine hash", "TensorRT", "GPU"}


def test_inspect_cpu_artifact(cpu_built):
    art = cpu_built("int8")
    assert check_cpu(art, here()).loads
    assert not check_cpu(art, Machine(None, (), "1.20.0")).loads
    assert not check_cpu(art, Machine(None, (), None)).loads
    r = CliRunner().invoke(main, ["inspect", str(art.path), "--load"])
    assert r.exit_code == 0 and "ONNX Runtime created a session" in r.output and "will load here" in r.output


def test_inspect_refuses_non_build_folders(exported):
    r = CliRunner().invoke(main, ["inspect", str(exported("llama", task="causal-lm").path)])
    assert r.exit_code == 1 and "not a build" in r.output
