"""What a reviewer of a decoder's report depends on (issue 16): a small folder, the verdict, task
metrics and the worst outputs first, the KV cache folded, batches that miss a limit flagged,
numbers that read true, the precision assignment of an accuracy budget, and a gate that fails a
planted fault in a quantized model."""

from __future__ import annotations

import re

import numpy as np
import pytest

from trtforge.parity import check_parity
from trtforge.parity.gate import Check, fmt_pair
from trtforge.parity.options import Direction

from .conftest import EVAL_TEXT, copy_artifact, edit_manifest, edit_model, fast_options


def test_messages_carry_enough_digits_that_the_comparison_reads_true():
    msg = Check("cosine_mean", "logits", 0.99497, 0.995, Direction.MIN, False).message
    assert msg.startswith("logits cosine_mean = 0.99497 < 0.995 ")
    msg = Check("snr_db", "present.0.key", 19.9996, 20.0, Direction.MIN, False).message
    assert "= 19.9996 dB < 20 dB" in msg
    assert fmt_pair(0.9950004, 0.995) == ("0.9950004", "0.995")
    assert fmt_pair(3.5, 5.0) == ("3.5", "5")  # already distinct: unchanged
    assert fmt_pair(0.995, 0.995) == ("0.995", "0.995")


def _section_order(html: str) -> list[str]:
    return re.findall(r"<h2>([^<(]+)", html)


def test_html_puts_verdict_task_metrics_and_worst_outputs_first(fp16_vs_fp32):
    html = (fp16_vs_fp32.path / "report.html").read_text()
    order = [s.strip() for s in _section_order(html)]
    assert order[:4] == ["Headline", "Checks", "Task metrics", "Outputs"], order
    # the logits' KL histogram comes before anything about the KV cache
    assert html.index("logits: KL per row") < html.index("KV cache") < html.index("present.0.key: |candidate")
    # the KV cache is one summary row; its tensors and histograms are collapsed
    outputs = html[html.index("<h2>Outputs"):html.index("</section>", html.index("<h2>Outputs"))]
    assert "KV cache: 4 tensors" in outputs
    table = outputs[:outputs.index("<details>")]
    assert "<code>logits</code>" in table and "present.0.key</code> (" not in table.split("KV cache")[0]
    assert "<summary>the 4 KV-cache tensors</summary>" in outputs
    assert "<summary>error distributions of the 4 KV-cache tensors</summary>" in outputs
    first_cache_plot = html.index("present.0.key: |candidate")
    assert html.rfind("<details>", 0, first_cache_plot) > html.rfind("</details>", 0, first_cache_plot)
    # no empty header rows (a grey bar over each label/value table); numeric headers sit over their column
    assert not re.search(r"<thead><tr>(?:<th[^>]*></th>)+</tr></thead>", html)
    assert '<th class="num">value</th>' in html and '<th class="num">limit</th>' in html
    # limits carry their unit
    assert re.search(r"≥ 40(?:\.0+)? dB</td>", html), "snr_db limit without its unit"


def test_report_md_lists_failures_first(corrupted_report):
    md = (corrupted_report.path / "report.md").read_text().splitlines()
    marks = [("❌" in line) for line in md if line.startswith("| ") and line.rstrip().endswith(("✅ |", "❌ |"))]
    assert marks and any(marks) and not all(marks)
    assert marks == sorted(marks, reverse=True), marks  # every failure above every pass


def test_batches_that_miss_a_limit_are_flagged(corrupted_report, validate_report):
    report = validate_report(corrupted_report.path)
    cases = report["data"]["cases"]
    flagged = [c for c in cases if c["missed_limits"]]
    assert flagged, [c["outputs"]["logits"] for c in cases]
    assert all(any(m.startswith("logits top1_agreement") for m in c["missed_limits"]) for c in flagged)
    # the KV cache is computed before the corrupted LM head: no batch misses a limit there
    assert not any(m.startswith("present.") for c in cases for m in c["missed_limits"])
    assert all(0 <= c["outputs"]["logits"]["top1_agreement"] <= 1 for c in cases)
    html = (corrupted_report.path / "report.html").read_text()
    assert f"Batches ({len(flagged)} miss a limit on their own)" in html
    assert any("batches miss a limit" in w for w in report["warnings"])


def test_report_folder_is_small_without_asking_for_the_outputs(corrupted_report, fp16_vs_fp32):
    small = sum(p.stat().st_size for p in corrupted_report.path.iterdir())
    full = sum(p.stat().st_size for p in fp16_vs_fp32.path.iterdir())  # asked for outputs.json
    assert not (corrupted_report.path / "outputs.json").exists() and (fp16_vs_fp32.path / "outputs.json").exists()
    assert (fp16_vs_fp32.path / "outputs.json").stat().st_size > 5 * (corrupted_report.path / "outputs-sample.npz").stat().st_size
    assert small < full
    with np.load(corrupted_report.path / "outputs-sample.npz", allow_pickle=False) as z:
        keys = set(z.files)
    assert {"reference/logits/0/rows", "candidate/logits/0/rows", "reference/present.0.key/0/rows"} <= keys


@pytest.fixture(scope="module")
def quantized_tiny(tmp_path_factory):
    calibration = pytest.importorskip("trtforge.calibration")
    return calibration


def _int8(exported, tmp_path_factory):
    from trtforge.calibration import get_preset, quantize

    from .conftest import CALIB_TEXT

    fp32 = exported("llama", task="causal-lm")
    recipe = get_preset("int8-sq").replace(num_samples=16, seq_len=64)
    return fp32, quantize(fp32, recipe, tmp_path_factory.mktemp("q") / "int8-sq", calib=[CALIB_TEXT])


@pytest.fixture(scope="module")
def int8_tiny(exported, tmp_path_factory, quantized_tiny):
    return _int8(exported, tmp_path_factory)


LAYERS = [
    {"name": "/model/layers.0/mlp/down_proj/MatMul", "group": "layers.0.mlp", "precision": "fp16",
     "sensitivity": 0.42, "reason": "largest share of the held-out KL", "weight_bytes": 3_000_000},
    {"name": "/model/layers.0/self_attn/q_proj/MatMul", "group": "layers.0.attn", "precision": "int8",
     "sensitivity": 0.01, "reason": "within budget", "weight_bytes": 1_000_000},
    {"name": "/model/layers.1/mlp/up_proj/MatMul", "group": "layers.1.mlp", "precision": "int8",
     "sensitivity": 0.02, "reason": "within budget", "weight_bytes": 6_000_000},
]
BUDGET = {"metric": "kl_mean", "limit": 0.01, "measured": 0.006, "measured_all_quantized": 0.02,
          "held_out_samples": 16, "met": True,
          "rounding": {"lever": "weight_rounding=gptq", "tried": True, "used": True, "reason": "used: 0.02 against 0.03"}}


def test_precision_assignment_is_shown_from_the_manifest(int8_tiny, tmp_path, validate_report):
    fp32, q = int8_tiny
    cand = copy_artifact(q.path, tmp_path / "budgeted")

    def add(m):
        m["quantization"]["layers"] = LAYERS
        m["quantization"]["budget"] = BUDGET

    edit_manifest(cand, add)
    rep = check_parity(fp32.path, cand, [EVAL_TEXT], "int8", tmp_path / "r", options=fast_options())
    pa = validate_report(rep.path)["candidate"]["quantization"]["precision_assignment"]
    assert pa["precision"] == "int8" and pa["layers"] == 3 and pa["weight_bytes"] == 10_000_000
    assert pa["by_precision"]["int8"]["share_pct"] == pytest.approx(70.0)
    assert pa["by_precision"]["fp16"] == {"layers": 1, "weight_bytes": 3_000_000, "share_pct": pytest.approx(30.0)}
    assert [x["name"] for x in pa["kept"]] == ["/model/layers.0/mlp/down_proj/MatMul"]
    assert pa["budget"] == BUDGET
    html = (rep.path / "report.html").read_text()
    summary = "<details><summary>precision assignment: 70 % int8, 30 % fp16 of the weights; 1 layer kept off int8"
    assert summary in html, html[html.find("precision assignment") - 100:html.find("precision assignment") + 200]
    assert "largest share of the held-out KL" in html and "measured with every layer quantized" in html
    assert "weight rounding (GPTQ, no extra byte)" in html and "used: 0.02 against 0.03" in html
    md = (rep.path / "report.md").read_text()
    assert "Precision assignment: 70 % int8, 30 % fp16 of the weights" in md and "Accuracy budget: kl_mean" in md
    # without the keys, nothing is shown
    plain = check_parity(fp32.path, q.path, [EVAL_TEXT], "int8", tmp_path / "plain", options=fast_options())
    assert "precision_assignment" not in plain.content["candidate"]["quantization"]
    assert "precision assignment" not in (plain.path / "report.html").read_text()


def scale_one_weight(folder, node_part: str, factor: float) -> str:
    """Multiply the weight scale of the first quantized GEMM whose name contains node_part."""
    from onnx import numpy_helper

    hit = {}

    def plant(model):
        inits = {t.name: t for t in model.graph.initializer}
        producers = {o: n for n in model.graph.node for o in n.output}
        gemm = next(n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and node_part in n.name)
        dq = next(producers[i] for i in gemm.input
                  if i in producers and producers[i].op_type == "DequantizeLinear" and producers[i].input[0] in inits)
        t = inits[dq.input[1]]
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(factor), t.name))
        hit["node"] = gemm.name

    edit_model(folder, plant)
    return hit["node"]


def test_the_int8_gate_fails_a_planted_weight_scale_fault(int8_tiny, tmp_path):
    """The gate's point: a healthy quantized model passes its preset, the same model with one
    GEMM's weight scale multiplied by 8 (the planted fault of docs/parity.md's evidence) fails."""
    fp32, q = int8_tiny
    healthy = check_parity(fp32.path, q.path, [EVAL_TEXT], "int8", tmp_path / "healthy", options=fast_options())
    assert healthy.passed, [c.message for c in healthy.failures]
    bad = copy_artifact(q.path, tmp_path / "fault")
    node = scale_one_weight(bad, "layers.0/mlp/down_proj", 8.0)
    rep = check_parity(fp32.path, bad, [EVAL_TEXT], "int8", tmp_path / "r", options=fast_options())
    assert not rep.passed and rep.exit_code == 1, node
    failed = {c.metric for c in rep.failures}
    assert {"snr_db", "kl_mean"} & failed, failed


@pytest.fixture(scope="module")
def int4_tiny(exported, tmp_path_factory, quantized_tiny):
    from trtforge.calibration import get_preset, quantize

    from .conftest import CALIB_TEXT

    fp32 = exported("llama", task="causal-lm")
    recipe = get_preset("int4-awq").replace(num_samples=16, seq_len=64, block_size=32)
    return fp32, quantize(fp32, recipe, tmp_path_factory.mktemp("q4") / "int4-awq", calib=[CALIB_TEXT])


def test_the_int4_gate_fails_a_planted_weight_scale_fault(int4_tiny, tmp_path):
    """The same point for the int4 preset, whose limits are the loosest: healthy INT4 AWQ of a tiny
    LLaMA passes it; one down_proj's block scales x8 (the planted fault of docs/parity.md) fails it
    on the decoder metrics, not only on the per-output ones."""
    fp32, q = int4_tiny
    healthy = check_parity(fp32.path, q.path, [EVAL_TEXT], "int4", tmp_path / "healthy", options=fast_options())
    assert healthy.passed, [c.message for c in healthy.failures]
    bad = copy_artifact(q.path, tmp_path / "fault")
    node = scale_one_weight(bad, "layers.0/mlp/down_proj", 8.0)
    rep = check_parity(fp32.path, bad, [EVAL_TEXT], "int4", tmp_path / "r", options=fast_options())
    assert not rep.passed and rep.exit_code == 1, node
    failed = {c.metric for c in rep.failures}
    assert {"top1_agreement", "kl_mean", "ppl_change_pct"} & failed, failed
