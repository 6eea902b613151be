"""`trtforge run`: caching, resume after interruption, the lock, exit codes, recipe errors, examples."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import trtforge
from trtforge.cli import main
from trtforge.errors import LockedError, RecipeError, TargetError
from trtforge.pipeline import lock

from ..conftest import DATA, REPO, leftovers  # noqa: TID252


@pytest.fixture(scope="module")
def recipe(tiny_model, tmp_path_factory) -> Path:
    model = tiny_model("llama", outliers=True)
    d = tmp_path_factory.mktemp("recipe")
    p = d / "r.toml"
    p.write_text(f"""
[model]
path = "{model}"

[calibration]
data = ["{DATA / 'calib-mpl-lgpl.txt'}"]
num_samples = 32
seq_len = 64

[quantize]
recipe = "int8-sq"

[build]
targets = ["cpu"]

[parity]
data = ["{DATA / 'eval-gpl-3.0.txt'}"]
""")
    return p


def statuses(m: dict) -> dict[str, str]:
    return {s["name"]: s["status"] for s in m["stages"]}


def test_second_run_is_cached_and_a_changed_option_reruns_only_dependants(recipe, tmp_path):
    out = tmp_path / "out"
    m1 = trtforge.run(recipe, out)
    assert m1["verdict"] == "passed" and m1["exit_code"] == 0
    assert set(statuses(m1).values()) == {"done"}
    assert set(statuses(m1)) == {"export/fp32", "export/fp16", "quantized/int8-sq", "engines/cpu", "reports/int8-sq",
                                 "reports/int8-sq-cpu"}
    for sub in ("export/fp32", "export/fp16", "quantized/int8-sq", "engines/cpu", "reports/int8-sq/report.html"):
        assert (out / sub).exists()
    m2 = trtforge.run(recipe, out)
    assert set(statuses(m2).values()) == {"cached"}
    m3 = trtforge.run(recipe, out, sets=["quantize.alpha=0.6"])
    st = statuses(m3)
    assert st["export/fp32"] == st["export/fp16"] == "cached"
    assert st["quantized/int8-sq"] == st["engines/cpu"] == st["reports/int8-sq"] == "done"
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["stages"] == m3["stages"] and on_disk["recipe"]["quantize"]["alpha"] == 0.6
    # the manifest links every artifact by hash
    assert on_disk["artifacts"]["quantized/int8-sq"]["files"]["model.onnx"]


def test_interrupt_then_resume(recipe, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", "from trtforge.cli import main; main()", "run", str(recipe), "-o", str(out),
           "--set", "calibration.batch_size=1"]
    # SIGINT restored for the child: a test run started in the background by a non-interactive
    # shell (``cmd &``) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if re.search(r"calibration \d+/\d+", line):  # first progress line: mid-calibration
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(seen) + rest[1]
    assert "run the same command again to resume" in rest[1]
    assert not (out / "quantized" / "int8-sq").exists()
    assert not (out / "quantized").exists() or leftovers(out / "quantized") == []
    m = json.loads((out / "manifest.json").read_text())
    assert m["verdict"] == "interrupted"
    resumed = trtforge.run(recipe, out, sets=["calibration.batch_size=1"])
    st = statuses(resumed)
    assert st["export/fp32"] == "cached" and st["quantized/int8-sq"] == "done"
    clean = trtforge.run(recipe, tmp_path / "clean", sets=["calibration.batch_size=1"])
    # same stages, same keys, same artifacts as an uninterrupted run
    assert [(s["name"], s["key"]) for s in resumed["stages"]] == [(s["name"], s["key"]) for s in clean["stages"]]
    for name in ("quantized/int8-sq", "engines/cpu"):
        assert resumed["artifacts"][name]["files"]["model.onnx"] == clean["artifacts"][name]["files"]["model.onnx"]


def test_lock_refuses_a_second_run(recipe, tmp_path):
    out = tmp_path / "out"
    with lock(out), pytest.raises(LockedError, match="another trtforge run"):
        trtforge.run(recipe, out)


def test_refusal_happens_before_any_work(recipe, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TargetError, match="cannot run fp8"):
        trtforge.run(recipe, out, sets=["quantize.recipe=fp8", 'build.targets=["sm_80"]'])
    assert not out.exists()
    with pytest.raises(TargetError, match="cannot be built on this machine"):
        trtforge.run(recipe, out, sets=['build.targets=["sm_90"]'])
    assert not out.exists()


def test_skipped_gpu_target_and_several_targets_share_one_quantization(recipe, tmp_path):
    m = trtforge.run(recipe, tmp_path / "o", sets=['build.targets=["cpu", "sm_90"]'], skip_unavailable_targets=True)
    st = statuses(m)
    assert st["engines/sm_90"] == "skipped" and st["engines/cpu"] == "done"
    assert list(st).count("quantized/int8-sq") == 1
    assert m["verdict"] == "passed" and m["skipped"][0]["stage"] == "engines/sm_90"


def test_gate_failure_exits_1_and_keeps_artifacts(recipe, tmp_path):
    r = CliRunner().invoke(main, ["-q", "run", str(recipe), "-o", str(tmp_path / "o"), "--json",
                                  "--set", "parity.thresholds={preset = 'int8', cosine_mean = 0.9999999}"])
    assert r.exit_code == 1, r.output
    summary = json.loads(r.stdout)
    assert summary["verdict"] == "failed"
    assert any(not rep["passed"] for rep in summary["reports"].values())
    assert (tmp_path / "o" / "engines" / "cpu" / "model.onnx").exists()


@pytest.mark.parametrize("content,match", [
    ('[model]\npath = "x"\n[quantize]\nrecipe = "int8-sq"\nalhpa = 0.5\n', r"r\.toml:5: unknown key quantize\.alhpa"),
    ('[model]\npath = "x"\n[build]\ntargets = "cpu"\nlayouts = "triton"\n', r"r\.toml:5: unknown key build\.layouts"),
    ('[modle]\npath = "x"\n', r"r\.toml:1: unknown table \[modle\]"),
    ('[model]\npath = "x"\n[calibration]\nnum_samples = "many"\n', r"r\.toml:4: calibration\.num_samples must be int"),
    ('[calibration]\ndata = ["a.txt"]\n', "model.path is not set"),
    ('[model\npath = 1', "invalid TOML"),
    ('[model]\npath = "x"\n[calibration]\ndata = ["a"]\n[build]\nlayout = "flat"\n', r"\[build\] 'flat' is not a valid Layout"),
    ('[model]\npath = "x"\n[calibration]\ndata = ["a"]\n[build]\nprofile = ["batch=8:1:4"]\n', r"\[build\] .*batch"),
])
def test_recipe_errors_name_key_and_line(tmp_path, content, match):
    p = tmp_path / "r.toml"
    p.write_text(content)
    r = CliRunner().invoke(main, ["run", str(p), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1
    lines = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and re.search(match, lines[0]), r.output
    assert not (tmp_path / "o").exists()


def test_set_values_are_checked(recipe, tmp_path):
    with pytest.raises(RecipeError, match=r"--set: unknown key build\.target"):
        trtforge.run(recipe, tmp_path / "o", sets=["build.target=cpu"])
    r = CliRunner().invoke(main, ["run"])
    assert r.exit_code == 2


def test_json_log_format_is_one_object_per_line(recipe, tmp_path):
    out = tmp_path / "o"
    trtforge.run(recipe, out)
    p = subprocess.run([sys.executable, "-c", "from trtforge.cli import main; main()", "--log-format", "json", "run",
                        str(recipe), "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    events = [json.loads(line) for line in p.stderr.splitlines() if line.strip()]
    assert events and all({"ts", "level", "msg"} <= set(e) for e in events)
    assert any(e.get("event") == "cached" and e.get("stage") == "export/fp32" for e in events)


def test_recipes_list_and_show():
    r = CliRunner().invoke(main, ["recipes", "list"])
    assert r.exit_code == 0
    for name in ("hopper-fp8", "ampere-int8-sq", "ampere-int4-awq", "cpu-int8", "int8-sq", "int4-awq"):
        assert name in r.output
    r = CliRunner().invoke(main, ["recipes", "show", "hopper-fp8"])
    assert 'targets = ["sm_90"]' in r.output
    r = CliRunner().invoke(main, ["recipes", "show", "nope"])
    assert r.exit_code == 1 and "unknown recipe" in r.output


@pytest.fixture(scope="module")
def tiny_llama_example(tmp_path_factory):
    d = REPO / "examples" / "models" / "llama-tiny"
    if not (d / "config.json").exists():
        subprocess.run([sys.executable, str(REPO / "examples" / "make_tiny_llama.py"), str(d)], check=True)
    return d


@pytest.mark.parametrize("name", ["llama-hopper-fp8.toml", "ampere-int4-awq.toml"])
def test_decoder_examples_run_on_cpu(tiny_llama_example, tmp_path, name):
    m = trtforge.run(REPO / "examples" / name, tmp_path / "o", skip_unavailable_targets=True)
    assert m["verdict"] == "passed", m["reports"]
    assert m["skipped"] and all(r["passed"] for r in m["reports"].values())


@pytest.mark.slow
def test_minilm_cpu_example(tmp_path, minilm_dir):
    m = trtforge.run(REPO / "examples" / "minilm-cpu.toml", tmp_path / "o")
    assert m["verdict"] == "passed", m["reports"]
    assert statuses(m)["engines/cpu"] == "done"
    assert os.path.exists(tmp_path / "o" / "reports" / "int8-sq-cpu" / "report.html")
    assert time.time() > 0


def test_gemma3_example_on_a_tiny_gemma3(tiny_model, tmp_path):
    """examples/gemma3-cpu-trtllm.toml (the real Gemma 3 270M run of docs/pipeline.md) on a tiny
    Gemma 3: the CPU artifact and the TensorRT-LLM checkpoint from one FP8 artifact, the GPU target
    skipped with its reason, both reports written and small, their data sized by [parity]."""
    pytest.importorskip("torch")
    model = tiny_model("gemma3_text")
    m = trtforge.run(REPO / "examples" / "gemma3-cpu-trtllm.toml", tmp_path / "o", sets=[f"model.path={model}"],
                     skip_unavailable_targets=True)
    st = statuses(m)
    assert st["engines/cpu"] == "done" and st["engines/trtllm"] == "done" and st["engines/sm_90"] == "skipped"
    assert [s["target"] for s in m["skipped"]] == ["sm_90"] and m["skipped"][0]["why"]
    assert set(m["reports"]) == {"fp8", "fp8-cpu"}
    for name in m["reports"]:
        rep = json.loads((tmp_path / "o" / "reports" / name / "report.json").read_text())
        assert sum(c["batch"] for c in rep["data"]["cases"]) <= 8 and max(c["batch"] for c in rep["data"]["cases"]) <= 4
        assert max(c["seq_len"] for c in rep["data"]["cases"]) <= 48
        size = sum(p.stat().st_size for p in (tmp_path / "o" / "reports" / name).iterdir() if p.is_file())
        assert size < 5 * 2**20


@pytest.mark.parametrize("value,match", [("0", "num_samples must be at least 1"), ('"many"', "must be int")])
def test_parity_sizes_are_checked_before_any_work(recipe, tmp_path, value, match):
    with pytest.raises(RecipeError, match=match):
        trtforge.run(recipe, tmp_path / "o", sets=[f"parity.num_samples={value}"])
    with pytest.raises(RecipeError, match="list of integers"):
        trtforge.run(recipe, tmp_path / "o", sets=['parity.batch_sizes=["1"]'])
    assert not (tmp_path / "o").exists()
