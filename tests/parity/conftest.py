"""Shared fixtures of the parity tests: tiny exports, edited copies, schema validation."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from ..conftest import DATA  # noqa: TID252

EVAL_TEXT = DATA / "eval-gpl-3.0.txt"
CALIB_TEXT = DATA / "calib-mpl-lgpl.txt"


def fast_options(**kw):
    """Few, short texts: enough for padded and unpadded batches, fast enough for CI."""
    from trtforge.parity import ParityOptions

    base = dict(num_samples=12, max_len=40, min_len=6, batch_sizes=(1, 3, 8), per_layer_samples=4)
    return ParityOptions(**{**base, **kw})


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_model(folder: Path, fn: Callable) -> None:
    import onnx

    model = onnx.load(str(folder / "model.onnx"))
    fn(model)
    onnx.save_model(model, str(folder / "model.onnx"))


def edit_manifest(folder: Path, fn: Callable[[dict], None]) -> None:
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m, indent=2))


@pytest.fixture(scope="session")
def llama_fp32(exported):
    return exported("llama", task="causal-lm-with-past")


@pytest.fixture(scope="session")
def llama_fp16(exported):
    return exported("llama", task="causal-lm-with-past", dtype="fp16")


@pytest.fixture(scope="session")
def bert(exported):
    return exported("bert")


@pytest.fixture(scope="session")
def validate_report() -> Callable[[Path], dict]:
    """Validate a report folder's report.json against the shipped schema; returns the report."""
    import jsonschema

    from trtforge.parity.report import schema

    validator = jsonschema.Draft202012Validator(schema())

    def check(folder: Path) -> dict:
        report = json.loads((Path(folder) / "report.json").read_text())
        errors = sorted(validator.iter_errors(report), key=lambda e: list(e.path))
        assert not errors, [f"{e.json_path}: {e.message}" for e in errors[:5]]
        return report

    return check


@pytest.fixture(scope="session")
def fp16_vs_fp32(llama_fp16, llama_fp32, tmp_path_factory):
    """FP16 reference vs the FP32 export of the same tiny LLaMA (with KV cache), on held-out text."""
    from trtforge.parity import check_parity

    out = tmp_path_factory.mktemp("parity") / "fp16-vs-fp32"
    # the full outputs, asked for (saved inputs and outputs are replayed by test_saved_inputs_repeat_the_run)
    return check_parity(llama_fp16.path, llama_fp32.path, [EVAL_TEXT], None, out, options=fast_options(save_outputs=True))


@pytest.fixture(scope="session")
def corrupted_llama(llama_fp32, tmp_path_factory) -> Path:
    """The FP32 export with ONE element of the LM head's weight set to 50: one vocabulary entry's
    logit moves by 50 x a hidden channel, so the arg-max flips on about half of the positions while
    the KV cache outputs (computed before the head) stay exact."""
    from onnx import numpy_helper

    folder = copy_artifact(llama_fp32.path, tmp_path_factory.mktemp("corrupt") / "llama-corrupt")

    def plant(model):
        init = next(t for t in model.graph.initializer if t.name.endswith("lm_head.weight"))
        w = numpy_helper.to_array(init).copy()
        w[7, 123] = 50.0  # [hidden, vocab]
        init.CopyFrom(numpy_helper.from_array(w, init.name))

    edit_model(folder, plant)
    return folder


@pytest.fixture(scope="session")
def corrupted_report(llama_fp16, corrupted_llama, tmp_path_factory):
    from trtforge.parity import check_parity

    out = tmp_path_factory.mktemp("parity") / "corrupted"
    return check_parity(llama_fp16.path, corrupted_llama, [EVAL_TEXT], None, out, options=fast_options())


PROMPTS = DATA.parent / "prompts" / "tasks.jsonl"


def write_prompts(path: Path, rows: list[dict]) -> Path:
    """A prompts JSONL file of these objects, one a line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def small_prompts(path: Path, per_category: int = 3) -> Path:
    """The first prompts of each category of examples/prompts/tasks.jsonl (fast to decode)."""
    rows, seen = [], {}
    for line in PROMPTS.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if seen.get(r["category"], 0) < per_category:
            seen[r["category"]] = seen.get(r["category"], 0) + 1
            rows.append(r)
    return write_prompts(path, rows)


@pytest.fixture(scope="session")
def llama_plain_fp32(exported):
    """The tiny LLaMA without a KV cache (decoding recomputes the whole sequence)."""
    return exported("llama", task="causal-lm")


@pytest.fixture(scope="session")
def llama_plain_fp16(exported):
    return exported("llama", task="causal-lm", dtype="fp16")
