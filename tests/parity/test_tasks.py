"""Task-level parity (--prompts): greedy continuations of categorized prompts, compared and gated per category."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from trtforge.cli import main
from trtforge.errors import InputError, OptionError
from trtforge.parity import check_parity
from trtforge.parity.options import ParityOptions, Thresholds, load_thresholds
from trtforge.parity.prompts import answer_correct, load_prompts, normalize
from trtforge.parity.tasks import (
    accuracy_prompts_needed,
    agreement_prompts_needed,
    first_divergence,
    mcnemar_exact,
    sample_size_note,
    wilson_interval,
)

from ..conftest import leftovers  # noqa: TID252
from ..conftest import one_line_error as _one_line_error
from .conftest import EVAL_TEXT, PROMPTS, small_prompts, write_prompts

FAST = ParityOptions(max_new_tokens=10, prompt_batch_size=4)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# --------------------------------------------------------------------------- statistics


@pytest.mark.parametrize(("b", "c", "p"), [
    (0, 0, 1.0),  # no discordant pairs: no evidence of a difference
    (0, 6, 2 / 64),  # 6-0: the smallest split significant at 5 %
    (0, 5, 2 / 32),  # 5-0 is not
    (1, 5, 2 * (1 + 6) / 64),
    (5, 1, 2 * (1 + 6) / 64),  # symmetric
    (2, 8, 2 * (1 + 10 + 45) / 1024),
    (3, 3, 1.0),  # a tie: the doubled tail passes 1 and is capped
    (10, 0, 2 / 1024),
])
def test_exact_mcnemar_on_known_cases(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)


def test_mcnemar_matches_the_binomial_definition_for_every_small_split():
    for n in range(1, 16):
        for b in range(n + 1):
            k = min(b, n - b)
            tail = sum(math.comb(n, i) * 0.5**n for i in range(k + 1))
            assert mcnemar_exact(b, n - b) == pytest.approx(min(1.0, 2 * tail))


def test_wilson_interval_known_values_and_bracketing():
    lo, hi = wilson_interval(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)  # the textbook 8/10 example
    lo, hi = wilson_interval(0, 8)
    assert lo == 0.0 and hi == pytest.approx(0.3244, abs=1e-4)
    lo, hi = wilson_interval(8, 8)
    assert hi == 1.0 and lo == pytest.approx(8 / (8 + 1.959963984540054**2))
    assert wilson_interval(0, 0) is None
    for n in range(1, 40):
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_sample_size_notes():
    assert agreement_prompts_needed(0.95) == 73 and agreement_prompts_needed(0.5) == 4
    assert agreement_prompts_needed(1.0) is None and agreement_prompts_needed(0.0) is None
    assert accuracy_prompts_needed(5.0) == 120 and accuracy_prompts_needed(10.0) == 60
    note = sample_size_note(8, 8, 0.95, 5.0)
    assert "n = 8" in note and "73 prompts needed" in note and "12.5 points" in note and "120 needed" in note
    assert sample_size_note(100, 0, 0.95, 5.0) is None  # enough prompts, and no answers to count
    assert "answered" in sample_size_note(100, 30, 0.95, 5.0)
    assert sample_size_note(3, 0, None, None) is None


def test_answer_rule_and_divergence():
    assert normalize("  The  Answer\n is 42. ") == "the answer is 42."
    assert answer_correct(" The answer is\n42.", "42") and answer_correct("MAX(A,  b)", "max(a, b)")
    assert not answer_correct("forty-two", "42")
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 9]) == 2  # one stopped early (end of sequence)


# --------------------------------------------------------------------------- prompts files


@pytest.mark.parametrize(("content", "needles"), [
    ('{"prompt": "a", "category": "math"}\n{"prompt": "b", "category": \n', [":2 is not valid JSON"]),
    ('["a", "math"]\n', [":1 is a JSON list, not an object"]),
    ('\n{"category": "math"}\n', [":2 has no 'prompt'"]),
    ('{"prompt": "a"}\n', [":1 has no 'category'"]),
    ('{"prompt": "a", "category": "  "}\n', [":1: 'category' is empty"]),
    ('{"prompt": "", "category": "x"}\n', [":1: 'prompt' is empty"]),
    ('{"prompt": "a", "category": 3}\n', [":1: 'category' is int, not text"]),
    ('{"prompt": "a", "category": "x", "anwser": "4"}\n', [":1 has unknown key(s) 'anwser'", "allowed keys"]),
    ('{"prompt": "a", "category": "x", "answer": " "}\n', [":1: 'answer' is empty"]),
    ('{"prompt": "a", "category": "x", "answer": true}\n', [":1: 'answer' is bool"]),
    ("\n  \n", ["holds no prompts"]),
    ("", ["holds no prompts"]),
])
def test_malformed_prompt_files_are_one_line_errors_with_the_line(tmp_path, bert, content, needles):
    path = tmp_path / "p.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError) as info:
        load_prompts(path)
    for n in needles:
        assert n in str(info.value)
    line = _one_line_error(run("parity", "--reference", bert.path, "--candidate", bert.path, "--prompts", path,
                               "-o", tmp_path / "r"), *needles)
    assert str(path) in line
    assert not (tmp_path / "r").exists() and not leftovers(tmp_path)


def test_prompt_files_that_load(tmp_path):
    p = load_prompts(PROMPTS)
    assert p.categories == ["math", "code", "reasoning", "chat"]
    assert all(len(p.in_category(c)) == 8 for c in p.categories)
    assert not any(x.answer for x in p.in_category("chat")) and all(x.answer for x in p.in_category("math"))
    path = write_prompts(tmp_path / "n.jsonl", [{"prompt": "a", "category": " x ", "answer": 42, "id": 7}])
    one = load_prompts(path).prompts[0]
    assert (one.category, one.answer, one.id, one.line) == ("x", "42", "7", 1)  # numbers are text, names stripped
    with pytest.raises(InputError, match="does not exist"):
        load_prompts(tmp_path / "gone.jsonl")


# --------------------------------------------------------------------------- thresholds


def test_task_limits_in_presets_files_and_category_overrides(tmp_path):
    for name, agree, drop in (("fp16", 0.75, 2.0), ("fp8", 0.5, 5.0), ("int8", 0.5, 5.0), ("int4", 0.3, 10.0)):
        t = Thresholds.preset(name)
        assert (t.limits["task_agreement"], t.limits["task_accuracy_drop"]) == (agree, drop)
    f = tmp_path / "gate.toml"
    f.write_text('preset = "int8"\ntask_agreement = 0.9\n\n[tasks.math]\ntask_accuracy_drop = 1\n'
                 "[tasks.chat]\ntask_agreement = false\n")
    t = load_thresholds(f, "int8")
    assert t.task_limit("math", "task_agreement") == 0.9 and t.task_limit("math", "task_accuracy_drop") == 1.0
    assert t.task_limit("chat", "task_agreement") is None and t.task_limit("code", "task_accuracy_drop") == 5.0
    assert t.to_json()["tasks"] == {"math": {"task_accuracy_drop": {"limit": 1.0, "direction": "max"}},
                                    "chat": {"task_agreement": None}}
    assert t.name == "int8+gate.toml"
    # the same keys as an inline table (a run recipe's [parity.thresholds])
    assert load_thresholds({"preset": "int4", "tasks": {"code": {"task_agreement": 0.2}}}, "int8").task_limit(
        "code", "task_agreement") == 0.2
    for text, match in (("[tasks.math]\nsnr_db = 3\n", r"\[tasks.math\] has unknown keys: snr_db"),
                        ("[tasks.math]\ntask_agreement = 'high'\n", "is not a number"),
                        ("tasks = 3\n", "tasks must be a table")):
        f.write_text(text)
        with pytest.raises(InputError, match=match):
            load_thresholds(f, "int8")


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def identical(llama_fp16, tmp_path_factory):
    """The FP16 export (with KV cache) against itself, prompts only."""
    root = tmp_path_factory.mktemp("tasks")
    return check_parity(llama_fp16.path, llama_fp16.path, None, None, root / "same",
                        prompts=small_prompts(root / "p.jsonl"), options=FAST)


def test_identical_models_agree_on_every_prompt_and_pass(identical, validate_report):
    rep = identical
    assert rep.passed and rep.exit_code == 0
    report = validate_report(rep.path)
    t = report["tasks"]
    assert t["order"] and set(t["order"]) == {"math", "code", "reasoning", "chat"}
    for name, c in t["categories"].items():
        assert c["passed"] and c["agreement"] == 1.0 and c["n"] == 3 and c["diverged"] == []
        assert c["mean_tokens_before_divergence"] == pytest.approx(
            sum(len(p["reference_ids"]) for p in t["prompts"] if p["category"] == name) / 3)
        assert c["agreement_ci95"][0] <= 1.0 == c["agreement_ci95"][1]
        assert c["sample_size_note"] and "n = 3" in c["sample_size_note"]  # 3 prompts cannot show 0.95
        if name == "chat":  # no answers: no accuracy, and no accuracy check
            assert c["n_with_answer"] == 0 and c["accuracy_reference"] is None and "task_accuracy_drop" not in c["limits"]
        else:
            assert c["accuracy_drop"] == 0 and c["mcnemar_p"] == 1.0 and c["flips"]["right_to_wrong"] == 0
    assert all(p["reference_ids"] == p["candidate_ids"] and 0 < len(p["reference_ids"]) <= 10 for p in t["prompts"])
    # prompts only: the task checks and nothing else
    assert report["data"] is None and report["outputs"] == {} and report["logits"] is None
    assert {c["metric"] for c in report["checks"]} == {"task_agreement", "task_accuracy_drop"}
    assert {c["scope"] for c in report["checks"]} == {f"tasks.{n}" for n in t["order"]}
    assert report["headline"]["task_agreement_min"] == 1.0
    md = (rep.path / "report.md").read_text()
    assert "Tasks (worst first):" in md and "**math** (n=3): agreement 1" in md and len(md.splitlines()) < 40
    html = (rep.path / "report.html").read_text()
    assert "Tasks: 4 categories, 12 prompts" in html and "flipped and diverging" not in html


def _answered_from_reference(identical, path):
    """The same prompts with answers the reference gets right: the first words of its continuation
    (code and chat get none, so both kinds of category are present)."""
    rows = []
    for p in identical.content["tasks"]["prompts"]:
        row = {"prompt": p["prompt"], "category": p["category"]}
        words = normalize(p["reference"]).split()
        if p["category"] in ("math", "reasoning") and words:
            row["answer"] = " ".join(words[:2])
        rows.append(row)
    return write_prompts(path, rows)


@pytest.fixture(scope="module")
def broken(identical, llama_fp16, corrupted_llama, tmp_path_factory):
    """The corrupted LM head (conftest) against the FP16 reference, with answers the reference gets right."""
    root = tmp_path_factory.mktemp("tasks")
    prompts = _answered_from_reference(identical, root / "answered.jsonl")
    return check_parity(llama_fp16.path, corrupted_llama, None, "fp16", root / "broken", prompts=prompts,
                        options=FAST), prompts


def test_a_broken_candidate_diverges_loses_answers_and_fails_naming_the_worst_category(broken, validate_report):
    rep, _ = broken
    report = validate_report(rep.path)
    t = report["tasks"]
    assert not rep.passed
    worst = t["worst_category"]
    assert worst == t["order"][0] and not t["categories"][worst]["passed"]
    assert rep.failures[0].scope == f"tasks.{worst}" and f"worst category: {worst}" in report["summary"]
    assert report["summary"].split("first: ")[1].startswith(f"tasks.{worst} ")
    agreements = [t["categories"][c]["agreement"] for c in t["order"]]
    assert min(agreements) < 1.0
    for name, c in t["categories"].items():
        lo, hi = c["agreement_ci95"]
        assert lo <= c["agreement"] <= hi  # the intervals bracket the estimates
        rows = [p for p in t["prompts"] if p["category"] == name]
        assert c["diverged"] == [p["index"] for p in rows if not p["agree"]]
        for p in rows:
            assert p["agree"] == (p["reference_ids"] == p["candidate_ids"])
            assert p["reference"].startswith(p["common_prefix"])
        if c["n_with_answer"]:
            assert c["accuracy_reference"] == 1.0  # the answers were taken from the reference
            f = c["flips"]
            assert f["wrong_to_right"] == 0
            assert f["right_to_wrong_prompts"] == [p["index"] for p in rows if not p["candidate_correct"]]
            assert c["accuracy_drop"] == pytest.approx(100 * f["right_to_wrong"] / c["n_with_answer"])
            assert c["mcnemar_p"] == mcnemar_exact(f["right_to_wrong"], f["wrong_to_right"])
            for key in ("accuracy_reference", "accuracy_candidate"):
                lo, hi = c[key + "_ci95"]
                assert lo <= c[key] <= hi
        else:
            assert c["accuracy_reference"] is None and c["flips"] is None and c["mcnemar_p"] is None
    lost = sum(c["flips"]["right_to_wrong"] for c in t["categories"].values() if c["flips"])
    assert lost > 0, "the corrupted head should lose some of the reference's answers"


def test_the_html_shows_flipped_prompts_side_by_side_escaped(broken, tmp_path):
    from trtforge.parity.html import render_html

    rep, _ = broken
    html = (rep.path / "report.html").read_text()
    assert "flipped and diverging prompts" in html and "reference continuation" in html and "<mark>" in html
    # text from the prompts file and the models is escaped, never markup
    content = json.loads(json.dumps(rep.content))
    row = next(p for p in content["tasks"]["prompts"] if not p["agree"])
    row["prompt"] = "<script>alert(1)</script>"
    row["candidate"] = row["common_prefix"] + "</td><b>x</b>"
    page = render_html(content)
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "</td><b>x</b>" not in page and "&lt;/td&gt;&lt;b&gt;x&lt;/b&gt;" in page


def test_a_strict_task_agreement_fails_with_exit_1_and_names_the_category(llama_fp16, corrupted_llama, broken,
                                                                          tmp_path):
    _, prompts = broken
    strict = tmp_path / "strict.toml"
    strict.write_text("task_agreement = 1.0\ntask_accuracy_drop = false\n")
    r = run("parity", "--reference", llama_fp16.path, "--candidate", corrupted_llama, "--prompts", prompts,
            "--max-new-tokens", 10, "--thresholds", strict, "-o", tmp_path / "r")
    assert r.exit_code == 1, r.output
    first = r.stdout.splitlines()[0]
    assert first.startswith("FAIL") and "tasks." in first and "task_agreement" in first and "worst category:" in first
    worst = json.loads((tmp_path / "r" / "report.json").read_text())["tasks"]["worst_category"]
    assert f"tasks.{worst} task_agreement" in first and f"BAD {worst}:" in r.stdout
    # turning the failing categories off per category makes the same run pass
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    bad = [c for c, v in report["tasks"]["categories"].items() if not v["passed"]]
    strict.write_text("task_agreement = 1.0\ntask_accuracy_drop = false\n"
                      + "".join(f"[tasks.{c}]\ntask_agreement = false\n" for c in bad))
    r = run("parity", "--reference", llama_fp16.path, "--candidate", corrupted_llama, "--prompts", prompts,
            "--max-new-tokens", 10, "--thresholds", strict, "-o", tmp_path / "r2", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["passed"] is True


def test_the_plain_export_recomputes_and_decodes_what_the_kv_cache_decodes(llama_plain_fp32, llama_fp32, tmp_path,
                                                                           validate_report):
    """causal-lm (recomputation) and causal-lm-with-past (KV cache) exports of the same weights give
    the same greedy tokens, each compared through its own runner; and with --data both kinds of
    metric are in one report."""
    prompts = small_prompts(tmp_path / "p.jsonl", per_category=2)
    plain = check_parity(llama_plain_fp32.path, llama_plain_fp32.path, [EVAL_TEXT], None, tmp_path / "plain",
                         prompts=prompts, options=ParityOptions(max_new_tokens=8, num_samples=4, max_len=24,
                                                                batch_sizes=(1, 3), prompt_batch_size=3))
    cached = check_parity(llama_fp32.path, llama_fp32.path, None, None, tmp_path / "cached", prompts=prompts,
                          options=ParityOptions(max_new_tokens=8, prompt_batch_size=1))
    assert plain.passed and cached.passed
    validate_report(plain.path)
    a = [p["reference_ids"] for p in plain.content["tasks"]["prompts"]]
    b = [p["reference_ids"] for p in cached.content["tasks"]["prompts"]]
    assert a == b and all(len(x) == 8 for x in a)
    # text metrics and task metrics side by side
    assert plain.content["logits"]["top1_agreement"] == 1.0 and plain.content["data"]["num_samples"] == 4
    metrics = {c["metric"] for c in plain.content["checks"]}
    assert {"task_agreement", "top1_agreement", "snr_db"} <= metrics


def test_fp16_against_fp32_with_the_example_prompts(llama_fp16, llama_fp32, tmp_path, validate_report):
    """The shipped prompt set end to end through the CLI on the two precisions of one model."""
    r = run("parity", "--reference", llama_fp16.path, "--candidate", llama_fp32.path, "--prompts", PROMPTS,
            "--max-new-tokens", 6, "-o", tmp_path / "r", "--json")
    assert r.exit_code in (0, 1), r.output
    report = validate_report(tmp_path / "r")
    assert report["thresholds"]["name"] == "fp16" and report["tasks"]["prompts_file"]["num_prompts"] == 32
    assert report["tasks"]["categories"]["math"]["n_with_answer"] == 8
    assert report["tasks"]["categories"]["code"]["n_with_answer"] == 7
    assert json.loads(r.stdout)["headline"]["worst_category"] in ("math", "code", "reasoning", "chat")


def test_empty_and_unknown_categories(llama_fp16, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [{"prompt": "One, two, three,", "category": "count"}])
    gate = tmp_path / "gate.toml"
    gate.write_text("[tasks.math]\ntask_agreement = 0.5\n")
    rep = check_parity(llama_fp16.path, llama_fp16.path, None, gate, tmp_path / "r", prompts=prompts,
                       options=ParityOptions(max_new_tokens=4))
    assert rep.passed and list(rep.content["tasks"]["categories"]) == ["count"]
    assert any("categories with no prompts" in w and "math" in w for w in rep.content["warnings"])
    c = rep.content["tasks"]["categories"]["count"]
    assert c["n"] == 1 and c["agreement_ci95"][0] < 0.5  # one prompt says little, and the note says so
    assert "n = 1" in c["sample_size_note"]


def test_prompts_need_a_causal_lm_and_per_layer_category_needs_per_layer(bert, llama_fp16, tmp_path):
    prompts = small_prompts(tmp_path / "p.jsonl", 1)
    _one_line_error(run("parity", "--reference", bert.path, "--candidate", bert.path, "--prompts", prompts,
                        "-o", tmp_path / "r"), "--prompts need a causal LM", "feature-extraction")
    _one_line_error(run("parity", "--reference", llama_fp16.path, "--candidate", llama_fp16.path, "--prompts", prompts,
                        "--per-layer-category", "math", "-o", tmp_path / "r"), "--per-layer-category", "--per-layer")
    _one_line_error(run("parity", "--reference", llama_fp16.path, "--candidate", llama_fp16.path, "--per-layer",
                        "--per-layer-category", "math", "-o", tmp_path / "r"), "--per-layer-category needs --prompts",
                    "add --prompts: a JSONL file")
    with pytest.raises(OptionError) as info:
        ParityOptions(max_new_tokens=0)
    assert info.value.fields == ("max_new_tokens",)
    assert run("parity", "--reference", "x", "--candidate", "x", "-o", "y", "--max-new-tokens", "0").exit_code == 2
    assert not (tmp_path / "r").exists() and not leftovers(tmp_path)


def test_a_run_recipe_takes_prompts_relative_to_its_folder(tiny_model, tmp_path):
    """`[parity] prompts` in a run recipe: resolved against the recipe's folder, checked line by line
    before any work, and passed to every parity report (prompts only: task metrics)."""
    import trtforge
    from trtforge.pipeline_recipe import load_pipeline_recipe

    from ..conftest import DATA  # noqa: TID252

    folder = tmp_path / "recipe"
    folder.mkdir()
    small_prompts(folder / "tasks.jsonl", per_category=1)
    recipe = folder / "r.toml"
    recipe.write_text(f"""
[model]
path = "{tiny_model("llama")}"
task = "causal-lm-with-past"

[calibration]
data = ["{DATA / 'calib-mpl-lgpl.txt'}"]
num_samples = 8
seq_len = 32

[quantize]
recipe = "int8-sq"

[parity]
prompts = "tasks.jsonl"
reports = "quantized"
""")
    assert load_pipeline_recipe(recipe).raw["parity"]["prompts"] == str(folder / "tasks.jsonl")
    (folder / "bad.jsonl").write_text('{"prompt": "x", "category": "math"}\n{"prompt": "y"}\n')
    r = run("-q", "run", recipe, "-o", tmp_path / "bad", "--set", "parity.prompts=" + str(folder / "bad.jsonl"))
    _one_line_error(r, "bad.jsonl:2 has no 'category'")
    assert not (tmp_path / "bad").exists()

    m = trtforge.run(recipe, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "reports" / "int8-sq" / "report.json").read_text())
    assert set(report["tasks"]["categories"]) == {"math", "code", "reasoning", "chat"} and report["data"] is None
    assert m["exit_code"] == (0 if report["passed"] else 1)
    # the prompts are part of the report's cache key: other prompts, a new report; nothing else reruns
    small_prompts(folder / "tasks.jsonl", per_category=2)
    again = {s["name"]: s["status"] for s in trtforge.run(recipe, tmp_path / "out")["stages"]}
    assert again["reports/int8-sq"] == "done" and again["quantized/int8-sq"] == "cached"
    report = json.loads((tmp_path / "out" / "reports" / "int8-sq" / "report.json").read_text())
    assert report["tasks"]["prompts_file"]["num_prompts"] == 8
    # an inline [parity.thresholds] table with per-category overrides goes to the parity stage whole
    inline = folder / "inline.toml"
    inline.write_text(recipe.read_text() + """
[parity.thresholds]
preset = "int8"
task_agreement = 0.0

[parity.thresholds.tasks.math]
task_agreement = 0.99
""")
    m = trtforge.run(inline, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "reports" / "int8-sq" / "report.json").read_text())
    cats = report["tasks"]["categories"]
    assert all(c["passed"] for name, c in cats.items() if name != "math")
    assert cats["math"]["passed"] == (cats["math"]["agreement"] >= 0.99)


@pytest.fixture(scope="module")
def int8_with_past(exported, tmp_path_factory):
    """Plain INT8 (no SmoothQuant) of the tiny LLaMA with outlier channels, KV cache kept: its
    reference, and the quantized candidate with its saved ranges."""
    from trtforge.calibration import get_preset, quantize

    from .conftest import CALIB_TEXT

    ref = exported("llama", task="causal-lm-with-past", dtype="fp16", outliers=True)
    fp32 = exported("llama", task="causal-lm-with-past", outliers=True)
    recipe = get_preset("int8").replace(num_samples=16, seq_len=64)
    return ref, quantize(fp32, recipe, tmp_path_factory.mktemp("q") / "int8", calib=[CALIB_TEXT])


def test_per_layer_ranks_layers_by_agreement_on_a_category(int8_with_past, tmp_path, validate_report):
    ref, cand = int8_with_past
    prompts = small_prompts(tmp_path / "p.jsonl", per_category=2)
    opts = ParityOptions(max_new_tokens=8, per_layer_category="reasoning", num_samples=4, max_len=24, batch_sizes=(1, 3))
    rep = check_parity(ref.path, cand.path, [EVAL_TEXT], None, tmp_path / "r", per_layer=True, prompts=prompts,
                       options=opts)
    report = validate_report(rep.path)
    pl = report["per_layer"]
    quantized = report["candidate"]["quantization"]["quantized_nodes"]
    assert len(pl["layers"]) == quantized  # the text ranking is still there
    tr = pl["task_ranking"]
    assert tr["category"] == "reasoning" and tr["chosen"] is True and tr["num_prompts"] == 2
    assert len(tr["layers"]) == quantized and [x["rank"] for x in tr["layers"]] == list(range(1, quantized + 1))
    keys = [(-x["agreement_lost"], -x["tokens_lost"]) for x in tr["layers"]]
    assert keys == sorted(keys)
    for x in tr["layers"]:
        assert x["agreement_lost"] == pytest.approx(tr["baseline_agreement"] - x["agreement"])
        assert 0 <= x["mean_tokens_before_divergence"] <= 8
    assert tr["candidate_agreement"] == report["tasks"]["categories"]["reasoning"]["agreement"]
    assert "By agreement on <b>reasoning</b>" in (rep.path / "report.html").read_text()

    # without text data and without a chosen category: the worst category, and no text ranking
    rep = check_parity(ref.path, cand.path, None, None, tmp_path / "r2", per_layer=True, prompts=prompts,
                       options=ParityOptions(max_new_tokens=8))
    pl = validate_report(rep.path)["per_layer"]
    assert pl["layers"] == [] and "task agreement only" in pl["note"]
    assert pl["task_ranking"]["category"] == rep.content["tasks"]["worst_category"]
    assert pl["task_ranking"]["chosen"] is False


def test_per_layer_category_must_be_a_category(int8_with_past, tmp_path):
    ref, cand = int8_with_past
    prompts = small_prompts(tmp_path / "p.jsonl", per_category=1)
    _one_line_error(run("parity", "--reference", ref.path, "--candidate", cand.path, "--prompts", prompts, "--per-layer",
                        "--per-layer-category", "poetry", "-o", tmp_path / "r"),
                    "--per-layer-category 'poetry' is not a category", "math, code, reasoning, chat")
    assert not (tmp_path / "r").exists()


class _CountingRunner:
    """A stand-in Polygraphy runner: the next token is the last real token + 1 (mod 50), the way an
    engine's TrtRunner is driven (infer() per step, outputs in reused buffers)."""

    def __init__(self, with_past: bool):
        import numpy as np

        self.np, self.with_past, self.calls = np, with_past, []
        self.present = np.zeros((1, 1, 0, 2), np.float16)

    def get_input_metadata(self, use_numpy_dtypes=True):
        from types import SimpleNamespace

        np = self.np
        meta = {"input_ids": np.int64, "attention_mask": np.int64, "position_ids": np.int64}
        if self.with_past:
            meta["past_key_values.0.key"] = np.float16
        return {k: SimpleNamespace(dtype=np.dtype(v)) for k, v in meta.items()}

    def infer(self, feeds):
        np = self.np
        ids = feeds["input_ids"]
        self.calls.append({k: v.shape for k, v in feeds.items()})
        assert ids.dtype == np.int64 and feeds["attention_mask"].shape[1] >= ids.shape[1]
        logits = np.zeros((*ids.shape, 50), np.float32)
        nxt = (ids[:, -1] + 1) % 50
        logits[np.arange(ids.shape[0]), -1, nxt] = 1.0
        out = {"logits": logits}
        if self.with_past:
            past = feeds["past_key_values.0.key"]
            assert past.dtype == np.float16 and past.shape[2] == feeds["attention_mask"].shape[1] - ids.shape[1]
            self.present = np.concatenate([past, np.zeros((ids.shape[0], 1, ids.shape[1], 2), np.float16)], axis=2)
            out["present.0.key"] = self.present
        return out


@pytest.mark.parametrize("with_past", [True, False])
def test_greedy_batches_pads_left_and_stops_at_end_of_sequence(with_past):
    from types import SimpleNamespace

    from trtforge.parity.decode import DecodeLimits, greedy
    from trtforge.vocab import Task

    task = Task.CAUSAL_LM_WITH_PAST if with_past else Task.CAUSAL_LM
    names = ["input_ids", "attention_mask", "position_ids"] + (["past_key_values.0.key"] if with_past else [])
    side = SimpleNamespace(role="candidate", task=task, input_names=names, pad_token_id=0,
                           dims=SimpleNamespace(num_kv_heads=1, head_dim=2))
    runner = _CountingRunner(with_past)
    prompts = [[5, 6, 7], [40], [1, 2], [47, 48, 49, 3]]
    got = greedy(runner, side, prompts, max_new_tokens=5, eos={46}, batch_size=3, limits=DecodeLimits(max_batch=2))
    assert got == [[8, 9, 10, 11, 12], [41, 42, 43, 44, 45], [3, 4, 5, 6, 7], [4, 5, 6, 7, 8]]
    got = greedy(runner, side, [[44]], max_new_tokens=6, eos={46}, batch_size=8)
    assert got == [[45]]  # cut before the end-of-sequence token, and decoding stopped there
    assert len(runner.calls) and max(c["input_ids"][0] for c in runner.calls) <= 2  # max_batch 2 was kept
    if with_past:  # after the prefill, one token a step
        assert all(c["input_ids"][1] == 1 for c in runner.calls[1:3])


def test_an_engines_shape_profile_limits_the_decoding():
    """What a TensorRT engine accepts (its manifest's profile) caps batch, prompt and total length."""
    from types import SimpleNamespace

    from trtforge.parity.check import decode_limits
    from trtforge.parity.decode import DecodeLimits, budget

    def engine(**symbols):
        return SimpleNamespace(kind="engine", manifest=SimpleNamespace(section=lambda name: {"symbols": symbols}))

    onnx = SimpleNamespace(kind="onnx")
    lim = decode_limits([onnx, engine(batch=[1, 4, 8], sequence=[1, 64, 128], past_sequence=[0, 64, 99],
                                      total_sequence=[1, 128, 256])])
    assert lim == DecodeLimits(max_batch=8, max_total=100, max_prompt=128)
    assert decode_limits([onnx, onnx]) == DecodeLimits()
    assert budget(8, 40, DecodeLimits(max_total=30, max_prompt=16)) == (8, 16, [])
    steps, prompt, notes = budget(32, 40, DecodeLimits(max_total=30))
    assert (steps, prompt) == (15, 15) and "leaves no room" in notes[0]
