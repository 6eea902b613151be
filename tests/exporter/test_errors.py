"""Every bad input: one line naming the problem and the fix, exit 1, nothing half-written."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from trtforge.cli import main

from ..conftest import leftovers  # noqa: TID252
from ..conftest import one_line_error as _one_line_error


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_missing_folder(tmp_path):
    _one_line_error(run("export", str(tmp_path / "nope"), "-o", str(tmp_path / "out")), "does not exist")
    assert not (tmp_path / "out").exists()


def test_folder_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    _one_line_error(run("export", str(tmp_path / "m"), "-o", str(tmp_path / "out")), "no config.json", "save_pretrained")


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5Model"]}))
    line = _one_line_error(run("export", str(tmp_path / "m"), "-o", str(tmp_path / "out")), "unsupported architecture 't5'")
    for name in ("bert", "gpt2", "llama", "qwen2"):
        assert name in line


def test_remote_code_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(
        json.dumps({"model_type": "fancy", "auto_map": {"AutoModel": "modeling_fancy.FancyModel"}})
    )
    (tmp_path / "m" / "modeling_fancy.py").write_text("raise SystemExit('remote code was executed')\n")
    _one_line_error(run("export", str(tmp_path / "m"), "-o", str(tmp_path / "out")), "remote code", "never runs")


def test_unsupported_task(tiny_model, tmp_path):
    _one_line_error(run("export", str(tiny_model("llama")), "-o", str(tmp_path / "o"), "--task", "sequence-classification"),
                    "not supported for llama", "causal-lm")


def test_missing_weights(tiny_model, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(tiny_model("bert"), m)
    (m / "model.safetensors").unlink()
    _one_line_error(run("export", str(m), "-o", str(tmp_path / "out")), "no weight files")


def test_corrupt_weights(tiny_model, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(tiny_model("bert"), m)
    data = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(data[: len(data) // 2])
    _one_line_error(run("export", str(m), "-o", str(tmp_path / "out")), "failed to load")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_weights_that_do_not_match_config(tiny_model, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(tiny_model("bert"), m)
    cfg = json.loads((m / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # one layer more than the weights hold
    (m / "config.json").write_text(json.dumps(cfg))
    _one_line_error(run("export", str(m), "-o", str(tmp_path / "out")), "miss")


def test_existing_output_is_refused_without_force(tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _one_line_error(run("export", str(tiny_model("bert")), "-o", str(out)), "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces what trtforge wrote, never a folder of the user's own files (issue 12)
    _one_line_error(run("export", str(tiny_model("bert")), "-o", str(out), "--force"), "did not write", "move those files")
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    for _ in range(2):  # an empty folder, then trtforge's own artifact: both replaced with --force
        r = run("export", str(tiny_model("bert")), "-o", str(out), "--force")
        assert r.exit_code == 0, r.output
        assert (out / "model.onnx").exists()
    assert leftovers(tmp_path) == []


def test_write_failure_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    import onnx

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    import trtforge.onnx_io

    monkeypatch.setattr(onnx, "save_model", boom)
    monkeypatch.setattr(trtforge.onnx_io, "save_streaming", boom)
    monkeypatch.setattr(trtforge.onnx_io, "_write_streaming", boom)
    _one_line_error(run("export", str(tiny_model("bert")), "-o", str(tmp_path / "out")), "No space left", "disk space")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_bad_opset(tiny_model, tmp_path):
    _one_line_error(run("export", str(tiny_model("bert")), "-o", str(tmp_path / "o"), "--opset", "9"), "opset 9")


def test_usage_error_exits_2(tmp_path):
    r = run("export", str(tmp_path))
    assert r.exit_code == 2


def test_json_output(tiny_model, tmp_path):
    r = CliRunner().invoke(main, ["-q", "export", str(tiny_model("bert")), "-o", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["source"]["model_type"] == "bert"


def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_non_finite_weights_name_the_tensor_even_without_validation(tiny_model, tmp_path):
    """Issue 12: a NaN weight is the checkpoint's fault, not 'an export bug', and --no-validate must not hide it."""
    import torch
    from safetensors.torch import load_file, save_file

    m = _copy_model(tiny_model("llama"), tmp_path / "m")
    sd = load_file(str(m / "model.safetensors"))
    name = next(k for k in sd if k.endswith("mlp.up_proj.weight"))
    sd[name] = sd[name].clone()
    sd[name][0, :3] = torch.tensor([float("nan"), float("inf"), float("nan")])
    save_file(sd, str(m / "model.safetensors"), metadata={"format": "pt"})
    for extra in ((), ("--no-validate",)):
        line = _one_line_error(run("export", str(m), "-o", str(tmp_path / "out"), *extra), "not finite", name)
        assert "2 NaN and 1 Inf" in line and "export bug" not in line and "--no-validate" not in line
        assert not (tmp_path / "out").exists()


def test_a_pickle_that_safe_loading_refuses_is_named_so_and_never_advises_weights_only_false(tiny_model, tmp_path):
    import pickle

    m = _copy_model(tiny_model("llama"), tmp_path / "m")
    (m / "model.safetensors").unlink()

    class Payload:  # an object a weights_only unpickler refuses (never executed: the load is refused)
        def __reduce__(self):
            return (print, ("pickled code ran",))

    (m / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Payload()}))
    r = run("export", str(m), "-o", str(tmp_path / "out"))
    line = _one_line_error(r, "safe loading", "safetensors")
    assert "weights_only=False" not in line and "truncated" not in line
    assert "pickled code ran" not in r.output
    assert not (tmp_path / "out").exists()


def test_a_model_without_tokenizer_files_exports_with_a_warning(tiny_model, tmp_path):
    m = _copy_model(tiny_model("llama"), tmp_path / "m")
    for p in m.iterdir():
        if p.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            p.unlink()
    r = run("export", str(m), "-o", str(tmp_path / "out"))
    assert r.exit_code == 0, r.output
    assert "no usable tokenizer" in r.stderr and "pre-tokenized .npz" in r.stderr
