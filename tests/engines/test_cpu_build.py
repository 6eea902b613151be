"""--target cpu: an ONNX Runtime artifact that runs, fused, with the session options recorded."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from trtforge.artifacts import OnnxArtifact, sha256_file
from trtforge.cli import main
from trtforge.engines.build import build
from trtforge.errors import BuildError, InputError, OutputExistsError
from trtforge.ort import session

from ..conftest import leftovers  # noqa: TID252
from .qdq import llama_feeds


def _run_recorded(art: OnnxArtifact, feeds: dict) -> np.ndarray:
    """Run the artifact the way the parity stage does: trtforge.ort.session with the recorded runtime."""
    rt = art.manifest["runtime"]
    sess = session(art.model_path, providers=[rt["provider"]], config=rt["session_config"],
                   optimization=rt["graph_optimization_level"])
    return sess.run(["logits"], feeds)[0]


def _run_plain(art: OnnxArtifact, feeds: dict) -> np.ndarray:
    return session(art.model_path, optimization="ORT_DISABLE_ALL").run(["logits"], feeds)[0]


def test_manifest_records_everything_the_parity_stage_needs(cpu_built, quantized):
    art = cpu_built("int8")
    m = art.manifest
    src = quantized("int8")
    assert (m["kind"], m["stage"], m["target"]["name"]) == ("onnx", "build", "cpu")
    assert m["runtime"]["provider"] == "CPUExecutionProvider"
    assert m["runtime"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert m["runtime"]["session_config"]["session.qdq_matmulnbits_accuracy_level"] == "0"
    assert m["io"] == src.manifest["io"] and m["dims"] == src.manifest["dims"]
    assert m["quantization"]["precision"] == "int8" and art.precision == "int8"
    assert m["upstream"]["model_sha256"] == sha256_file(src.model_path)
    assert m["files"]["model.onnx"] == sha256_file(art.model_path)
    assert "tokenizer.json" in m["files"]  # side files travel so parity can tokenize


def test_int8_graph_is_fused_on_unsigned_activations(cpu_built):
    art = cpu_built("int8")
    b = art.manifest["build"]
    assert b["uint8_activation_groups"] == b["ops_before"]["QuantizeLinear"] > 0
    assert b["ops_after"].get("MatMulIntegerToFloat", 0) >= 14 and "DequantizeLinear" not in b["ops_after"]
    model = onnx.load(str(art.model_path))
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            assert inits[n.input[2]].data_type == onnx.TensorProto.UINT8
        if n.op_type == "MatMulIntegerToFloat":  # weights unsigned too: the U8U8 kernel, exact without VNNI
            assert inits[n.input[1]].data_type == onnx.TensorProto.UINT8
            assert np.all(onnx.numpy_helper.to_array(inits[n.input[5]]) == 128)
    gemm = b["int8_gemm"]
    assert gemm["kernel"] == "U8U8" and b["uint8_weight_dequantize"] == 14 == gemm["uint8_weight_dequantize"]
    assert gemm["weight_types_after"] == {"uint8": b["ops_after"]["MatMulIntegerToFloat"]}
    assert gemm["build_machine"]["u8u8_max_rel_err"] == 0.0 and "u8s8_max_rel_err" in gemm["build_machine"]
    assert isinstance(gemm["build_machine"]["flags"], list)
    # exact integer GEMMs: only float rounding (was 0.04 with U8S8 on an AVX2 CPU without VNNI)
    assert b["self_check"]["max_normalized_err"] < 1e-4
    assert b["self_check"]["relative_rms_err"] < 1e-5
    assert b["self_check"]["uint8_rewrite_identical"] is True
    assert "session.disable_prepacking" not in art.manifest["runtime"]["session_config"]  # INT8 keeps prepacked GEMMs


@pytest.mark.parametrize("precision,fused,folded", [
    ("fp32", "MatMul", 0),
    ("fp16", "MatMul", 0),
    ("int8", "MatMulIntegerToFloat", 0),
    ("fp8", "MatMul", 14),
    ("int4-weight-only", "MatMulNBits", 0),
])
def test_every_precision_runs_and_matches_its_input(cpu_built, quantized, exported, precision, fused, folded):
    art = cpu_built(precision)
    assert art.manifest["build"]["ops_after"].get(fused, 0) > 0
    assert art.manifest["build"]["folded_weight_dequantize"] == folded
    src = exported("llama", task="causal-lm", dtype=precision) if precision in ("fp32", "fp16") else quantized(precision)
    feeds = llama_feeds(3, 10, art.manifest["dims"]["vocab_size"], n=1, seed=7)[0]
    got, ref = _run_recorded(art, feeds), _run_plain(src, feeds)
    assert got.shape == ref.shape == (3, 10, 1000) and np.isfinite(got).all()
    d = got.astype(np.float64) - ref
    # relative RMS: robust to a rare activation crossing a rounding boundary of a later Q node
    rms = np.sqrt((d ** 2).mean() / (ref.astype(np.float64) ** 2).mean())
    assert rms < {"fp32": 1e-5, "fp16": 5e-3}.get(precision, 5e-3), rms


def test_fp16_int8_graph_gets_folded_weights_and_a_note(cpu_built):
    art = cpu_built("int8", "fp16")
    rt = art.manifest["runtime"]
    assert art.manifest["build"]["folded_weight_dequantize"] == 14
    assert art.manifest["build"]["uint8_activation_groups"] > 0
    assert art.manifest["build"]["uint8_weight_dequantize"] == 0 and art.manifest["build"]["int8_gemm"] is None
    assert any("fp16 graph has no fused" in n for n in rt["notes"])
    assert rt["session_config"]["session.disable_prepacking"] == "1"
    assert art.manifest["build"]["self_check"]["relative_rms_err"] < 1e-2


def _deep_fp8_graph(layers: int = 8, width: int = 320, seed: int = 0) -> onnx.ModelProto:
    """x -> layers x (FP8 Q/DQ -> MatMul(FP8 weight, K=320) -> Tanh -> *2): a deep chain of FP8 quantizers."""
    import ml_dtypes
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes = []
    inits = [helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0]),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    x = "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        s = (np.abs(w).max(axis=0) / 448.0).astype(np.float32)
        q = (w / s).astype(ml_dtypes.float8_e4m3fn)
        inits += [helper.make_tensor(f"w{i}_q", TensorProto.FLOAT8E4M3FN, [width, width], q.view(np.uint8).tobytes(),
                                     raw=True),
                  numpy_helper.from_array(s, f"w{i}_s"), numpy_helper.from_array(np.array(4.0 / 448, np.float32), f"a{i}_s")]
        nodes += [helper.make_node("QuantizeLinear", [x, f"a{i}_s", "zp"], [f"a{i}_q"]),
                  helper.make_node("DequantizeLinear", [f"a{i}_q", f"a{i}_s", "zp"], [f"a{i}_dq"]),
                  helper.make_node("DequantizeLinear", [f"w{i}_q", f"w{i}_s"], [f"w{i}"], axis=1),
                  helper.make_node("MatMul", [f"a{i}_dq", f"w{i}"], [f"m{i}"]),
                  helper.make_node("Tanh", [f"m{i}"], [f"t{i}"]),
                  helper.make_node("Mul", [f"t{i}", "two"], ["y" if i == layers - 1 else f"h{i}"])]
        x = f"h{i}"
    graph = helper.make_graph(nodes, "deep_fp8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def test_deep_fp8_graph_computes_what_its_input_computes(tiny_art, tmp_path):
    """Folded FP8 weights run unpacked: prepacked float GEMMs (K > 256) sum in another order than the
    input's run-time dequantized weights, and the differences flip the FP8 quantizers downstream."""
    from .qdq import tiny_manifest

    man = tiny_manifest("fp8")
    man["io"] = {"inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 320]}],
                 "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 320]}]}
    src = tiny_art("fp8", model=_deep_fp8_graph(), manifest=man, name="deep-fp8")
    art = build(src, "cpu", tmp_path / "cpu")
    b, rt = art.manifest["build"], art.manifest["runtime"]
    assert b["folded_weight_dequantize"] == 8 and b["int8_gemm"] is None
    assert rt["session_config"]["session.disable_prepacking"] == "1"
    assert any("disable_prepacking" in n for n in rt["notes"])
    assert b["self_check"]["relative_rms_err"] < 1e-6, b["self_check"]
    # the same artifact with prepacking: what the option avoids (recorded, machine-dependent)
    x = (np.random.default_rng(1).standard_normal((16, 320)) * 2).astype(np.float32)
    ref = session(src.model_path, optimization="ORT_DISABLE_ALL").run(None, {"x": x})[0].astype(np.float64)
    unpacked = session(art.model_path, config=rt["session_config"]).run(None, {"x": x})[0]
    packed = session(art.model_path, config={k: v for k, v in rt["session_config"].items()
                                             if k != "session.disable_prepacking"}).run(None, {"x": x})[0]

    def rms(a):
        return float(np.sqrt(((a - ref) ** 2).mean() / (ref ** 2).mean()))

    assert rms(unpacked) < 1e-6 and rms(unpacked) <= rms(packed)


def test_failure_leaves_nothing_behind(quantized, tmp_path, monkeypatch):
    import trtforge.engines.cpu as cpu

    def broken(*a, **k):
        raise BuildError("simulated self-check failure", "none")

    monkeypatch.setattr(cpu, "self_check", broken)
    with pytest.raises(BuildError, match="simulated"):
        build(quantized("int8"), "cpu", tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_existing_output_and_wrong_inputs(quantized, cpu_built, tmp_path):
    out = tmp_path / "out"
    build(quantized("fp8"), "cpu", out)
    with pytest.raises(OutputExistsError):
        build(quantized("fp8"), "cpu", out)
    first = sha256_file(out / "manifest.json")
    build(quantized("int8"), "cpu", out, force=True)
    assert sha256_file(out / "manifest.json") != first and OnnxArtifact.open(out).precision == "int8"
    with pytest.raises(InputError, match="written by 'trtforge build'"):
        build(cpu_built("int8").path, "cpu", tmp_path / "again")
    with pytest.raises(InputError, match="inside the input artifact"):
        build(quantized("int8"), "cpu", quantized("int8").path / "sub")


def test_cli_build_cpu(quantized, tmp_path):
    r = CliRunner().invoke(main, ["build", str(quantized("int4-weight-only").path), "--target", "cpu",
                                  "-o", str(tmp_path / "c"), "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["target"]["name"] == "cpu" and m["build"]["ops_after"]["MatMulNBits"] > 0
    r = CliRunner().invoke(main, ["build", str(quantized("int8").path), "-t", "cpu", "-o", str(tmp_path / "d")])
    assert r.exit_code == 0 and "INT8 activation Q/DQ -> UINT8" in r.output
    r = CliRunner().invoke(main, ["build", str(quantized("int8").path), "-t", "cpu", "-o", str(tmp_path / "d")])
    assert r.exit_code == 1 and "already exists" in r.output


def test_external_data_models_stay_external(tmp_path):
    """Models over 2 GB keep weights in model.onnx.data; the CPU target must write them the same way."""
    from trtforge.artifacts import file_table, write_json

    from .qdq import tiny_graph, tiny_manifest

    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(tiny_graph("int8"), str(src / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    man = tiny_manifest("int8")
    man["model"]["external_data"] = "model.onnx.data"
    man["files"] = file_table(src)
    write_json(src / "manifest.json", man)
    art = build(src, "cpu", tmp_path / "cpu")
    assert art.manifest["model"]["external_data"] == "model.onnx.data"
    assert (tmp_path / "cpu" / "model.onnx.data").stat().st_size > 1000 and "model.onnx.data" in art.manifest["files"]
    assert not (tmp_path / "cpu" / "_work").exists()
    assert art.manifest["upstream"]["external_data_sha256"] == sha256_file(src / "model.onnx.data")
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    got = session(art.model_path, config=art.manifest["runtime"]["session_config"]).run(None, {"x": x})[0]
    ref = session(src / "model.onnx", optimization="ORT_DISABLE_ALL").run(None, {"x": x})[0]
    assert np.allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_decoder_with_kv_cache(exported, tmp_path):
    src = exported("llama", task="causal-lm-with-past")
    art = build(src, "cpu", tmp_path / "kv")
    check = art.manifest["build"]["self_check"]
    assert check["shapes"] == {"batch": 2, "past_sequence": 4, "sequence": 8} and check["relative_rms_err"] < 1e-4
    assert art.manifest["profile"]["symbols"]["total_sequence"] == [1, 129, 256]


def test_inspect_says_which_integer_kernel_runs(cpu_built):
    from trtforge.engines.check import Machine, check_cpu, int8_kernel_check

    art = cpu_built("int8")
    avx2 = ("avx2",)
    report = check_cpu(art, Machine(None, (), "1.32.0", avx2))
    kernel = next(c for c in report.checks if c.what == "INT8 GEMM kernel")
    assert kernel.ok and not kernel.warning and kernel.detail.startswith("U8U8 (14 GEMMs")
    # an artifact built before the UINT8 weights: its fused GEMMs read int8 weights (U8S8)
    legacy = {"ops_after": {"MatMulIntegerToFloat": 14, "QuantizeLinear": 8}}
    no_vnni = int8_kernel_check(legacy, avx2)
    assert no_vnni.ok and no_vnni.warning and "saturates" in no_vnni.detail and no_vnni.detail.startswith("14 GEMMs")
    vnni = int8_kernel_check(legacy, ("avx2", "avx512f", "avx512_vnni"))
    assert vnni.ok and not vnni.warning
    assert int8_kernel_check(legacy, None).warning
    assert int8_kernel_check({"ops_after": {"MatMul": 3}}, avx2) is None  # no integer GEMM, no check
    assert check_cpu(art, Machine(None, (), "1.32.0")).loads  # flags unknown: still loads


@pytest.mark.parametrize("precision,op", [("int8", "MatMulIntegerToFloat"), ("int4-weight-only", "MatMulNBits")])
def test_every_integer_gemm_is_checked_against_exact_math(cpu_built, precision, op):
    """Each fused GEMM of the optimized model, on the activations it sees, against float64 math of its
    own integers and scales: a kernel that sums exactly is off by float32 rounding only."""
    art = cpu_built(precision)
    b = art.manifest["build"]
    check = b["gemm_check"]
    assert check["checked"] == b["ops_after"][op] > 0 and check["ops"] == [op]
    assert check["failed"] == [] and check["worst"]["max_rel_err"] < check["worst"]["tolerance"]
    assert check["worst"]["max_rel_err"] > 0 or precision == "int8"  # MatMulNBits sums floats: rounding shows


def test_an_inexact_integer_kernel_falls_back_to_a_float_gemm(quantized, tmp_path, monkeypatch, caplog):
    """Signed INT8 weights (U8S8: pairs of u8*s8 products summed in a saturating int16 on x86 CPUs
    without VNNI): the GEMMs whose kernel is off on the model's own activations run in float, named
    in the manifest and the log, and the artifact then computes what its input computes."""
    import trtforge.engines.cpu as cpu

    if cpu.probe_int8_gemm()["u8s8_max_rel_err"] == 0.0:
        pytest.skip("ONNX Runtime's U8S8 kernel is exact on this CPU (VNNI): nothing to fall back from")
    monkeypatch.setattr(cpu, "int8_weights_to_uint8", lambda model, weights=None: (model, 0))
    with caplog.at_level("WARNING", logger="trtforge.engines.cpu"):
        art = build(quantized("int8"), "cpu", tmp_path / "out")
    b = art.manifest["build"]
    fb = b["int8_gemm"]["float_fallback"]
    assert fb, "the saturating U8S8 kernel should have been caught on the tiny LLaMA"
    assert all(f["max_rel_err"] > 1e-4 and "kernel not exact" in f["why"] for f in fb)
    assert sum("falls back to a float GEMM" in r.getMessage() for r in caplog.records) == len(fb)
    model = onnx.load(str(art.model_path), load_external_data=False)
    fused_weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"}
    assert not fused_weights & {f["weight"] for f in fb}
    assert b["gemm_check"]["failed"] == [] and b["ops_after"]["MatMul"] >= len(fb)
    assert b["self_check"]["relative_rms_err"] < 1e-3  # U8S8 everywhere was 0.04 max on this model


def test_rounding_flips_are_told_from_wrong_values_by_the_inputs_own_flip_floor(tiny_art, tmp_path, monkeypatch):
    """Over the end-to-end tolerance with every GEMM exact: the input model run in another summation
    order (weights folded, prepacked) moves as far from itself, so the build passes and records the
    floor; the same distance against a floor it exceeds fails with both figures."""
    import trtforge.engines.cpu as cpu

    from .qdq import tiny_manifest

    man = tiny_manifest("fp8")
    man["io"] = {"inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 320]}],
                 "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 320]}]}
    src = tiny_art("fp8", model=_deep_fp8_graph(), manifest=man, name="deep-fp8")
    real = cpu.runtime_for

    def prepacked(info):  # the artifact sums as the floor does: differences are flips only
        rt = real(info)
        return cpu.CpuRuntime({k: v for k, v in rt.session_config.items() if k != cpu.DISABLE_PREPACKING})

    monkeypatch.setattr(cpu, "runtime_for", prepacked)
    monkeypatch.setattr(cpu, "QUANTIZED_TOLERANCE", 1e-9)
    art = build(src, "cpu", tmp_path / "cpu")
    sc = art.manifest["build"]["self_check"]
    if sc["relative_rms_err"] <= 1e-9:
        pytest.skip("prepacked GEMMs sum in the same order as the input's on this CPU: no flips to tell apart")
    assert sc["flip_floor"]["relative_rms_err"] > 0 and sc["passed_by"].startswith("within 2x")
    assert sc["relative_rms_err"] <= sc["limit"] == 2 * sc["flip_floor"]["relative_rms_err"]
    monkeypatch.setattr(cpu, "FLIP_FACTOR", 1e-3)
    with pytest.raises(BuildError, match=r"differs from the input model by .* every integer GEMM is exact on its own"):
        build(src, "cpu", tmp_path / "cpu2")
    assert not (tmp_path / "cpu2").exists()
