"""Models over 2 GB, on tiny models: every quantize recipe and the CPU build run on graphs whose
weights are in external data (or in a one-file model.onnx read as references into it) without
ever serializing, copying or loading the model whole.

CI cannot hold a 2 GB model, so the tiny models are exported with ``external_data=True`` and the
limits are patched down: while a stage runs, serializing or copying a ModelProto that holds an
initializer of 4 KiB or more raises protobuf's ``EncodeError`` (what a real model over 2 GiB
gets), and so does loading a model's external data into its proto. Each result is compared with
the same stage on the same model exported without external data (the in-memory path).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from google.protobuf.message import EncodeError

import trtforge.onnx_io
from trtforge.artifacts import OnnxArtifact
from trtforge.calibration import get_preset, quantize
from trtforge.engines.build import build
from trtforge.exporter import ExportOptions, Task, export_onnx
from trtforge.onnx_io import DATA_FILE, is_external, tensor_nbytes
from trtforge.ort import session

from .conftest import DATA

CALIB = [DATA / "calib-mpl-lgpl.txt"]
WEIGHT = 4096  # an initializer this large counts as a weight
RECIPES = ["int8-sq", "int8", "fp8", "int4-awq", "int4-rtn", "int4-gptq", "int4-awq-gptq"]


def _holds_weights(model: onnx.ModelProto) -> bool:
    return any(not is_external(t) and tensor_nbytes(t) >= WEIGHT for t in model.graph.initializer)


def install_guard(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on (until ``monkeypatch`` undoes it), a whole-model serialization, copy or data load
    fails as it would over 2 GiB; returns the list the refused calls are recorded in."""
    calls: list[str] = []

    def guard(name, orig):
        def wrapped(self, *a, **k):
            other = a[0] if name in ("CopyFrom", "MergeFrom") and a else self
            if isinstance(other, onnx.ModelProto) and _holds_weights(other):
                calls.append(name)
                raise EncodeError(f"Failed to serialize proto ({name} of a model with its weights)")
            return orig(self, *a, **k)
        return wrapped

    for name in ("SerializeToString", "SerializePartialToString", "ByteSize", "CopyFrom", "MergeFrom"):
        monkeypatch.setattr(onnx.ModelProto, name, guard(name, getattr(onnx.ModelProto, name)))

    def no_load(*a, **k):
        calls.append("load_external_data_for_model")
        raise EncodeError("loading all external data into the proto")

    monkeypatch.setattr(onnx, "load_external_data_for_model", no_load)
    monkeypatch.setattr(trtforge.onnx_io, "EXTERNAL_DATA_THRESHOLD", 100_000)
    # a model saved as one file is read as references into it, however small
    monkeypatch.setattr(trtforge.onnx_io, "PARSE_WHOLE_BELOW", 0)
    return calls


def guarded(fn, *args, **kw):
    """``fn(*args, **kw)`` under the guard; fails the test if anything was refused."""
    with pytest.MonkeyPatch.context() as mp:
        calls = install_guard(mp)
        out = fn(*args, **kw)
    assert calls == [], calls
    return out


@pytest.fixture(scope="module")
def exports(tiny_model, tmp_path_factory):
    """exports("llama", external=True) -> export artifact (cached for the module)."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("big-exports")

    def get(preset: str, external: bool, task: str | None = None) -> OnnxArtifact:
        key = (preset, external, task)
        if key not in cache:
            opts = ExportOptions(task=Task(task) if task else None, external_data=external)
            cache[key] = export_onnx(tiny_model(preset), root / f"{preset}-{task}-{external}", opts)
        return cache[key]

    return get


def _feeds(art: OnnxArtifact, seq: int = 12) -> dict:
    rng = np.random.default_rng(3)
    d = art.manifest["dims"]
    f16 = any(i["dtype"] == "float16" for i in art.inputs)
    feeds = {}
    for i in art.inputs:
        n = i["name"]
        if n == "input_ids":
            feeds[n] = rng.integers(1, d["vocab_size"], (2, seq)).astype(np.int64)
        elif n in ("attention_mask", "token_type_ids"):
            feeds[n] = (np.ones if n == "attention_mask" else np.zeros)((2, seq), np.int64)
        elif n == "position_ids":
            feeds[n] = np.tile(np.arange(seq, dtype=np.int64), (2, 1))
        elif n.startswith("past_key_values"):
            feeds[n] = np.zeros((2, d["num_kv_heads"], 0, d["head_dim"]), np.float16 if f16 else np.float32)
    return feeds


def _outputs(art: OnnxArtifact, feeds: dict, **kw) -> list[np.ndarray]:
    return session(art.model_path, **kw).run(None, feeds)


def _assert_external(art: OnnxArtifact) -> None:
    assert art.manifest["model"]["external_data"] == DATA_FILE
    assert (art.path / DATA_FILE).stat().st_size > 0
    graph = onnx.load(str(art.model_path), load_external_data=False)
    assert not _holds_weights(graph)
    assert not [p.name for p in art.path.iterdir() if p.name.startswith(("linked", "_"))]  # no scratch left


def _quantized(exports, tmp_path_factory, preset, recipe, external, task="causal-lm", *, lazy=None, **changes):
    """``lazy`` (default: ``external``): under the guard, the weights read from the files tensor by
    tensor; else the one-file export parsed whole and edited in memory (the reference)."""
    lazy = external if lazy is None else lazy
    src = exports(preset, external, task)
    r = get_preset(recipe).replace(num_samples=8, seq_len=32, **changes)
    out = tmp_path_factory.mktemp("q") / f"{preset}-{recipe}-{external}-{lazy}"
    if lazy:
        return guarded(quantize, src, r, out, calib=CALIB)
    return quantize(src, r, out, calib=CALIB)


def _same_function(big: OnnxArtifact, small: OnnxArtifact, tol: float, **kw) -> None:
    feeds = _feeds(big)
    for a, b in zip(_outputs(big, feeds, **kw), _outputs(small, feeds, **kw), strict=True):
        assert a.dtype == b.dtype
        a, b = a.astype(np.float32), b.astype(np.float32)
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * max(1.0, float(np.abs(b).max())))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_quantizes_without_a_whole_model(exports, tmp_path_factory, recipe):
    big = _quantized(exports, tmp_path_factory, "llama", recipe, True)
    _assert_external(big)
    q = big.manifest["quantization"]
    assert q["counts"]["quantized"] > 0
    timings = big.manifest["timings"]
    assert {"calibrate_s", "prepare_s", "quantize_s", "write_s", "check_s"} <= set(timings)
    if recipe == "int8-sq":
        assert q["smoothing_check"]["max_rel_err"] < 1e-3 and "smoothing_check_s" in timings
    # the same model held in memory quantizes to the same function
    small = _quantized(exports, tmp_path_factory, "llama", recipe, False)
    assert small.manifest["model"]["external_data"] is None
    _same_function(big, small, 1e-5)
    # and so does the one-file export read as references into its model.onnx (no external data)
    one_file = _quantized(exports, tmp_path_factory, "llama", recipe, False, lazy=True)
    _same_function(one_file, small, 1e-5)


@pytest.mark.parametrize("recipe", ["int8-sq", "int4-awq", "int4-gptq"])
def test_layer_by_layer_quantize_without_a_whole_model(exports, tmp_path_factory, recipe, monkeypatch):
    """A model too big to hold (forced here): calibration and the checks (smoothing, the quick
    check of the float and the quantized model) run a layer at a time; the result is the
    whole-graph one's function, and so are the checks' figures."""
    monkeypatch.setenv("TRTFORGE_CALIB_LAYERWISE", "1")
    big = _quantized(exports, tmp_path_factory, "llama", recipe, True)
    _assert_external(big)
    q = big.manifest["quantization"]
    assert q["quick_check"]["layer_by_layer"] is True and q["quick_check"]["min_cosine_vs_float"] > 0.9
    if recipe == "int8-sq":
        assert q["smoothing_check"]["layer_by_layer"] is True and q["smoothing_check"]["max_rel_err"] < 1e-3
    monkeypatch.setenv("TRTFORGE_CALIB_LAYERWISE", "0")
    whole = _quantized(exports, tmp_path_factory, "llama", recipe, True)
    assert whole.manifest["quantization"]["quick_check"]["layer_by_layer"] is False
    _same_function(big, whole, 1e-4)
    assert q["quick_check"]["mean_cosine_vs_float"] == pytest.approx(
        whole.manifest["quantization"]["quick_check"]["mean_cosine_vs_float"], abs=1e-5)


@pytest.mark.parametrize("preset,task,recipe,changes", [
    ("llama", "causal-lm", "int8-sq", {"dtype": "fp16"}),  # the FP16 cast, recorded per external tensor
    ("llama", "causal-lm", "fp8", {"dtype": "fp16"}),
    ("bert", None, "int8-sq", {}),  # LayerNorm and explicit-Mul folds
])
def test_fp16_rest_and_encoder_smoothing_without_a_whole_model(exports, tmp_path_factory, preset, task, recipe, changes):
    big = _quantized(exports, tmp_path_factory, preset, recipe, True, task, **changes)
    _assert_external(big)
    small = _quantized(exports, tmp_path_factory, preset, recipe, False, task, **changes)
    _same_function(big, small, 1e-3 if changes else 1e-5)


@pytest.mark.parametrize("recipe", ["int8-sq", "fp8", "int4-awq", None])
def test_cpu_build_without_a_whole_model(exports, tmp_path_factory, recipe):
    if recipe is None:
        src, ref_src = exports("llama", True, "causal-lm"), exports("llama", False, "causal-lm")
    else:
        src = _quantized(exports, tmp_path_factory, "llama", recipe, True)
        ref_src = _quantized(exports, tmp_path_factory, "llama", recipe, False)
    root = tmp_path_factory.mktemp("cpu")
    big = guarded(build, src, "cpu", root / "big")
    _assert_external(big)
    small = build(ref_src, "cpu", root / "small")
    one_file = guarded(build, ref_src, "cpu", root / "one-file")  # weights referenced inside model.onnx
    _same_function(one_file, small, 1e-5)
    check = big.manifest["build"]["self_check"]
    assert check["relative_rms_err"] <= check["tolerance"]
    rt = big.manifest["runtime"]
    _same_function(big, small, 1e-5, config=rt["session_config"], optimization=rt["graph_optimization_level"])


def test_the_guard_catches_whole_model_serialization(exports, monkeypatch):
    small, big = exports("llama", False, "causal-lm"), exports("llama", True, "causal-lm")
    model = onnx.load(str(small.model_path))
    install_guard(monkeypatch)
    with pytest.raises(EncodeError):
        model.SerializeToString()
    with pytest.raises(EncodeError):
        onnx.ModelProto().CopyFrom(model)
    with pytest.raises(EncodeError):
        onnx.load(str(big.model_path))
    with pytest.raises(EncodeError):
        onnx.shape_inference.infer_shapes(model)
    light = onnx.load(str(big.model_path), load_external_data=False)
    assert light.SerializeToString()  # a graph without its weights is fine


def test_calibration_batches_are_cut_to_the_output_budget(exports, monkeypatch):
    """The probe returns every watched activation of a batch at once: on a big model batches
    shrink (to one sequence) so that stays under OUTPUT_BUDGET. The statistics do not depend on
    the batching (up to float rounding: GEMM sums run in another order), the histogram's bin
    edges aside, and the same rows are kept."""
    from trtforge.calibration import collect
    from trtforge.calibration.quantize import attention_bmm_inputs, watched_tensors
    from trtforge.textdata import build_samples, load_tokenizer

    art = exports("llama", True, "causal-lm")
    d = art.manifest["dims"]
    samples = build_samples(CALIB, load_tokenizer(art.path), mode="windows", num_samples=6, seq_len=32, seed=0,
                            max_positions=d["max_positions"], vocab_size=d["vocab_size"])

    def ranges():
        model = onnx.load(str(art.model_path), load_external_data=False)
        watched = watched_tensors(model)
        return collect.collect_ranges(model, watched, samples, d, batch_size=4, base_dir=art.path,
                                      per_tensor=set(attention_bmm_inputs(model)))

    whole = ranges()
    assert whole.meta["batches"] == 2
    monkeypatch.setattr(collect, "OUTPUT_BUDGET", 1)
    with pytest.MonkeyPatch.context() as mp:
        install_guard(mp)
        cut = ranges()
    assert cut.meta["batches"] == 6
    for name, st in whole.tensors.items():
        other = cut.tensors[name]
        assert st.count == other.count and st.absmax == pytest.approx(other.absmax, rel=1e-5)
        np.testing.assert_allclose(st.channel_absmax, other.channel_absmax, rtol=1e-5)
        if st.sample is not None:
            np.testing.assert_allclose(st.sample.astype(np.float32), other.sample.astype(np.float32), rtol=2e-3, atol=1e-3)


def test_a_one_file_model_is_read_as_references_into_itself(exports, monkeypatch):
    """load_graph walks protobuf's wire format and skips the weight bytes: the graph it returns
    equals onnx.load's, its big tensors referencing their bytes inside model.onnx."""
    from trtforge.onnx_io import Weights, load_graph

    art = exports("llama", False, "causal-lm")
    full = onnx.load(str(art.model_path))
    monkeypatch.setattr(trtforge.onnx_io, "PARSE_WHOLE_BELOW", 0)
    light = load_graph(art.model_path)
    assert not _holds_weights(light)
    refs = [t for t in light.graph.initializer if is_external(t)]
    assert refs and all({e.key: e.value for e in t.external_data}["location"] == "model.onnx" for t in refs)
    assert [n.SerializeToString() for n in light.graph.node] == [n.SerializeToString() for n in full.graph.node]
    assert light.graph.input == full.graph.input and light.opset_import == full.opset_import
    weights = Weights(light, art.path)
    by_name = {t.name: t for t in full.graph.initializer}
    assert [t.name for t in light.graph.initializer] == list(by_name)
    for t in light.graph.initializer:
        want = onnx.numpy_helper.to_array(by_name[t.name])
        got = weights.array(t)
        assert got.dtype == want.dtype and np.array_equal(got, want), t.name
    feeds = _feeds(art)
    from trtforge.ort import graph_session
    for a, b in zip(graph_session(light, art.path).run(None, feeds), _outputs(art, feeds), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("preset,dtype", [("llama", "fp32"), ("llama", "fp16"), ("gemma3_text", "fp32")])
def test_export_without_a_whole_model(exports, tiny_model, tmp_path, preset, dtype):
    """Export streams every weight to external data (never a ModelProto holding them) and gives
    the graph the one-file export gives."""
    opts = ExportOptions(task=Task("causal-lm"), dtype=dtype, external_data=True)
    big = guarded(export_onnx, tiny_model(preset), tmp_path / "big", opts)
    _assert_external(big)
    assert big.manifest["model"]["weights"] == "attached from the module"
    assert big.manifest["validation"]["passed"]
    small = export_onnx(tiny_model(preset), tmp_path / "small", ExportOptions(task=Task("causal-lm"), dtype=dtype))
    assert small.manifest["model"]["external_data"] is None
    _same_function(big, small, 1e-6)


def _bf16_copy(folder, out):
    import shutil

    import torch
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    m.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    for p in folder.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name != "config.json":
            shutil.copy(p, out / p.name)
    return out


@pytest.mark.parametrize("preset", ["llama", "gemma3_text"])
def test_a_bf16_checkpoint_exports_what_loading_it_in_fp32_computes(tiny_model, tmp_path, preset):
    """A BF16 checkpoint is loaded in BF16 and upcast tensor by tensor (no FP32 copy beside the
    loader's); the graph must compute what transformers computes with the same file loaded in FP32,
    Gemma's embedding scale included (BF16 would round sqrt(hidden))."""
    import torch
    import transformers

    from trtforge.exporter._torch import checkpoint_dtype

    src = _bf16_copy(tiny_model(preset), tmp_path / "bf16")
    assert checkpoint_dtype(sorted(src.glob("*.safetensors"))) == torch.bfloat16
    assert checkpoint_dtype([tiny_model(preset) / "model.safetensors"]) == torch.float32
    art = export_onnx(src, tmp_path / "out", ExportOptions(task=Task("causal-lm")))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, attn_implementation="eager")
    feeds = _feeds(art)
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(feeds["input_ids"]), attention_mask=torch.from_numpy(feeds["attention_mask"]),
                   position_ids=torch.from_numpy(feeds["position_ids"])).logits.numpy()
    (got,) = _outputs(art, feeds)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, float(np.abs(want).max())))


def test_the_exporter_shape_inference_patch_is_undone(tiny_model, tmp_path):
    import torch

    before = torch._C._jit_pass_onnx_graph_shape_type_inference
    export_onnx(tiny_model("llama"), tmp_path / "o", ExportOptions(task=Task("causal-lm")))
    assert torch._C._jit_pass_onnx_graph_shape_type_inference is before
