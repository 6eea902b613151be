"""calib_device: where calibration runs ONNX Runtime (auto | cpu | cuda), recorded in the manifest.

The CPU tests cover the choice (auto on a machine without onnxruntime-gpu, cuda refused before
any work, the CUDA provider and its options handed to the sessions when ONNX Runtime lists it,
with the session factory stubbed so that no CUDA session is created). The ``gpu``+``ort_cuda``
test runs calibration on both devices where onnxruntime-gpu sees a GPU and compares the ranges.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from trtforge import ort as tort
from trtforge.artifacts import read_json
from trtforge.calibration import ActivationRanges, get_preset, quantize
from trtforge.cli import main
from trtforge.errors import OptionError
from trtforge.vocab import CalibDevice

from ..conftest import DATA, one_line_error  # noqa: TID252

CALIB = DATA / "calib-mpl-lgpl.txt"
SMALL = {"num_samples": 4, "seq_len": 32}
# amax of the same tensors on CUDA and on the CPU, relative: FP32 GEMMs without TF32 (use_tf32=0)
# differ from the CPU's only in summation order, about sqrt(K) * 2^-24 relative per dot product
# (K <= 256 here: ~1e-6), and the error grows through the layers by a few times that; 1e-3 is
# 100x that headroom and still 8x under an INT8 step at the range's end (1/127 ~ 8e-3), so
# ranges that pass give the same scales to well within a quantization step.
AMAX_RTOL = 1e-3


def test_auto_is_the_cpu_without_onnxruntime_gpu(monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    d = tort.calibration_device("auto")
    assert d.device == CalibDevice.CPU and d.providers == ("CPUExecutionProvider",)
    assert tort.calibration_device("cpu").device == CalibDevice.CPU
    with pytest.raises(OptionError) as e:
        tort.calibration_device("cuda")
    assert "onnxruntime-gpu" in e.value.hint and "calib_device=cpu" in e.value.hint


@pytest.fixture
def fake_cuda(monkeypatch):
    """ONNX Runtime listing CUDAExecutionProvider, and an InferenceSession that records the
    providers it is asked for, then runs the graph on the CPU (no CUDA session is created)."""
    ort = pytest.importorskip("onnxruntime")
    real_session = ort.InferenceSession
    calls: list[list] = []

    def fake(src, so=None, providers=None, **kw):
        calls.append(list(providers or []))
        return real_session(src, so, providers=["CPUExecutionProvider"], **kw)

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", fake)
    return calls


def _cuda_calls(calls: list[list]) -> list[list]:
    out = [c for c in calls if c and isinstance(c[0], tuple) and c[0][0] == "CUDAExecutionProvider"]
    for c in out:
        assert c[0][1] == tort.CUDA_CALIB_OPTIONS and c[1:] == ["CPUExecutionProvider"]
    return out


def test_auto_chooses_cuda_and_the_sessions_get_its_options(fake_cuda, exported, tmp_path):
    """auto picks CUDA where ONNX Runtime lists it, and the calibration session is asked for CUDA
    (with use_tf32=0) then the CPU; asserted on InferenceSession's arguments."""
    calls = fake_cuda
    d = tort.calibration_device(CalibDevice.AUTO)
    assert d.device == CalibDevice.CUDA
    assert d.providers[0][0] == "CUDAExecutionProvider" and d.providers[0][1]["use_tf32"] == "0"
    assert d.providers[-1] == "CPUExecutionProvider"

    art = quantize(exported("llama"), get_preset("fp8").replace(**SMALL), tmp_path / "q", calib=[CALIB])
    assert len(_cuda_calls(calls)) == 1, calls  # the calibration probe
    # the checks of the written model (quick check, smoothing check) stay on the CPU
    assert any(c == ["CPUExecutionProvider"] for c in calls)
    rec = art.manifest.quantization.extra["calibration_device"]
    assert rec["requested"] == "auto"
    assert rec["provider_options"]["CUDAExecutionProvider"]["use_tf32"] == "0"
    # what actually ran (the stub ran the CPU): the device comes from the session, not the request
    assert rec["providers"] == ["CPUExecutionProvider"] and rec["device"] == "cpu"


def test_layer_blocks_and_budget_sessions_get_the_device(fake_cuda, tiny_model, exported, tmp_path):
    from trtforge.calibration.collect import collect_ranges
    from trtforge.exporter import ExportOptions, Task, export_onnx
    from trtforge.onnx_io import load_graph
    from trtforge.textdata import build_samples, load_tokenizer

    # layer by layer: one session per block, each asked for CUDA
    art = export_onnx(tiny_model("llama"), tmp_path / "ext", ExportOptions(task=Task("causal-lm"), external_data=True))
    model = load_graph(art.model_path)
    watched = sorted({n.input[0] for n in model.graph.node if n.op_type == "MatMul"})
    dims = art.manifest.dims
    samples = build_samples([CALIB], load_tokenizer(art.path), mode="windows", num_samples=2, seq_len=16, seed=0,
                            max_positions=dims.max_positions, vocab_size=dims.vocab_size, text_field="text")
    r = collect_ranges(model, watched, samples, dims, base_dir=art.path, layerwise=True,
                       providers=list(tort.calibration_device().providers))
    assert len(_cuda_calls(fake_cuda)) == r.meta["layer_blocks"] >= 2
    assert r.meta["device"] == "cpu" and r.meta["providers"] == ["CPUExecutionProvider"]  # what the stub ran
    # the budget search: its reference, switched-graph and verification sessions too
    fake_cuda.clear()
    q = quantize(exported("bert"), get_preset("int8").replace(budget="embedding_cosine=0.9", num_samples=8),
                 tmp_path / "q", calib=[CALIB])
    assert q.manifest.quantization.budget["met"]
    assert len(_cuda_calls(fake_cuda)) >= 4, fake_cuda  # probe, reference, switched graph, written model


def test_ran_on_counts_nodes_per_provider():
    class Sub:
        def __init__(self, ep, n):
            self.ep_name, self._n = ep, n

        def get_nodes(self):
            return [object()] * self._n

    class Sess:
        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

        def get_provider_graph_assignment_info(self):
            return [Sub("CUDAExecutionProvider", 40), Sub("CPUExecutionProvider", 3), Sub("CUDAExecutionProvider", 2)]

    d = tort.ran_on(Sess())
    assert d == {"device": "cuda", "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                 "nodes_by_provider": {"CUDAExecutionProvider": 42, "CPUExecutionProvider": 3}}


def test_cli_cuda_without_it_is_one_error_before_any_work(exported, tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    out = tmp_path / "q"
    for extra in (["--calib-device", "cuda"], ["--set", "calib_device=cuda"]):
        r = CliRunner().invoke(main, ["quantize", str(exported("llama").path), "--recipe", "fp8", "--calib", str(CALIB),
                                      "-o", str(out), *extra])
        line = one_line_error(r, "CUDAExecutionProvider", "onnxruntime-gpu", "calib")
        assert "calib_device=cpu" in line or "--calib-device=cpu" in line, line
        assert not out.exists()
    r = CliRunner().invoke(main, ["quantize", str(exported("llama").path), "--recipe", "fp8", "--calib", str(CALIB),
                                  "-o", str(out), "--calib-device", "gpu"])
    assert r.exit_code == 2 and "gpu" in r.output  # click's usage error names the choices


def test_manifest_and_ranges_record_the_cpu(exported, tmp_path):
    r = CliRunner().invoke(main, ["-q", "quantize", str(exported("llama").path), "--recipe", "int8-sq", "--calib", str(CALIB),
                                  "-o", str(tmp_path / "q"), "--calib-device", "cpu", "--json",
                                  *(x for k, v in SMALL.items() for x in ("--set", f"{k}={v}"))])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    rec = m["quantization"]["calibration_device"]
    assert rec == {"requested": "cpu", "device": "cpu", "providers": ["CPUExecutionProvider"]}
    assert m["quantization"]["recipe"]["calib_device"] == "cpu"
    meta = read_json(tmp_path / "q" / "ranges.json")["meta"]
    assert meta["device"] == "cpu" and meta["providers"] == ["CPUExecutionProvider"]
    # the ranges' key is the graph's, whatever the device: reused under auto, recorded as reused
    r2 = CliRunner().invoke(main, ["-q", "quantize", str(exported("llama").path), "--recipe", "int8-sq",
                                   "--ranges", str(tmp_path / "q" / "ranges.json"), "-o", str(tmp_path / "q2"), "--json",
                                   *(x for k, v in SMALL.items() for x in ("--set", f"{k}={v}"))])
    assert r2.exit_code == 0, r2.output
    rec2 = json.loads(r2.stdout)["quantization"]["calibration_device"]
    assert rec2["reused_ranges"] and rec2["device"] == "cpu" and rec2["requested"] == "auto"


def test_recipe_rejects_an_unknown_device():
    from trtforge.errors import RecipeError

    with pytest.raises(RecipeError, match="calib_device"):
        get_preset("fp8").replace(calib_device="tpu")


@pytest.mark.gpu
@pytest.mark.ort_cuda
@pytest.mark.parametrize("recipe", ["fp8", "int8-sq"])
def test_cuda_and_cpu_calibration_agree(exported, tmp_path, recipe):
    """The same graph on the CUDA and CPU providers: every watched tensor's amax within AMAX_RTOL."""
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with a visible GPU")
    art = exported("llama")
    base = get_preset(recipe).replace(**SMALL)
    qc = quantize(art, base.replace(calib_device="cuda"), tmp_path / "cuda", calib=[CALIB])
    qp = quantize(art, base.replace(calib_device="cpu"), tmp_path / "cpu", calib=[CALIB])
    assert qc.manifest.quantization.extra["calibration_device"]["providers"][0] == "CUDAExecutionProvider"
    rc, rp = ActivationRanges.load(qc.path / "ranges.json"), ActivationRanges.load(qp.path / "ranges.json")
    assert rc.model_key == rp.model_key and rc.meta["device"] == "cuda" and rp.meta["device"] == "cpu"
    assert rc.tensors.keys() == rp.tensors.keys()
    worst = worst_channel = 0.0
    for name, sp in rp.tensors.items():
        sc = rc.tensors[name]
        assert sc.count == sp.count
        worst = max(worst, abs(sc.absmax - sp.absmax) / max(sp.absmax, 1e-12))
        if sp.channel_absmax is not None:  # per channel, relative to the tensor's amax (near-zero channels)
            d = np.abs(sc.channel_absmax.astype(np.float64) - sp.channel_absmax) / max(sp.absmax, 1e-12)
            worst_channel = max(worst_channel, float(d.max()))
    assert worst <= AMAX_RTOL, f"worst relative amax difference {worst:.2e}"
    assert worst_channel <= AMAX_RTOL, f"worst per-channel amax difference {worst_channel:.2e} of the tensor's amax"


def test_run_recipe_with_cuda_is_refused_in_preflight(tiny_model, tmp_path, monkeypatch):
    import trtforge
    from trtforge.errors import RecipeError

    ort = pytest.importorskip("onnxruntime")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    p = tmp_path / "r.toml"
    p.write_text(f'[model]\npath = "{tiny_model("llama")}"\n[calibration]\ndata = ["{CALIB}"]\n'
                 '[quantize]\nrecipe = "fp8"\ncalib_device = "cuda"\n[build]\ntargets = ["cpu"]\n')
    with pytest.raises(RecipeError, match=r"\[quantize\] calib_device = cuda, but ONNX Runtime has no CUDAExecutionProvider"):
        trtforge.run(p, tmp_path / "out")
    assert not (tmp_path / "out").exists()
