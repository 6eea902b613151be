from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers

from trtforge.artifacts import OnnxArtifact, sha256_file
from trtforge.exporter import DType, ExportOptions, Task, export_onnx
from trtforge.inputs import positions_from_mask, tokenize_batch

TEXTS = ["A short line.", "The quick brown fox jumps over the lazy dog near the quiet river bank today.",
         "Engines are built per GPU."]


def _session(art: OnnxArtifact) -> ort.InferenceSession:
    return ort.InferenceSession(str(art.model_path), providers=["CPUExecutionProvider"])


def _tokenize(art: OnnxArtifact, side: str):
    tok = transformers.AutoTokenizer.from_pretrained(str(art.path))
    pad = art.manifest["io"]["pad_token_id"]
    return tokenize_batch(tok, TEXTS, side, 64, pad)


@pytest.mark.parametrize("preset,task", [("bert", "feature-extraction"), ("bert-cls", "sequence-classification")])
def test_encoder_matches_pytorch_on_right_padded_batch(exported, tiny_model, preset, task):
    art = exported(preset)
    assert art.task == task
    ids, mask, tt = _tokenize(art, "right")
    assert (mask == 0).any(), "the batch must contain padding"
    got = _session(art).run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt})[0]
    auto = transformers.AutoModel if task == "feature-extraction" else transformers.AutoModelForSequenceClassification
    model = auto.from_pretrained(str(tiny_model(preset)), attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    token_type_ids=torch.from_numpy(tt))
    ref = (out.last_hidden_state if task == "feature-extraction" else out.logits).numpy()
    if task == "feature-extraction":
        valid = mask.astype(bool)
        assert np.abs(got - ref)[valid].max() < 1e-4
    else:
        assert np.abs(got - ref).max() < 1e-4


@pytest.mark.parametrize("preset", ["llama", "gpt2", "qwen2"])
def test_decoder_matches_pytorch_on_left_padded_batch(exported, tiny_model, preset):
    art = exported(preset, task="causal-lm")
    ids, mask, _ = _tokenize(art, "left")
    pos = positions_from_mask(mask, ids.shape[1])
    got = _session(art).run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos})[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model(preset)), attn_implementation="eager").eval()
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(pos)).logits.numpy()
    valid = mask.astype(bool)
    assert np.abs(got - ref)[valid].max() < 1e-4


@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_with_past_prefill_and_three_greedy_steps_match_generate(exported, tiny_model, preset):
    art = exported(preset)
    assert art.task == "causal-lm-with-past"
    dims = art.manifest["dims"]
    sess = _session(art)
    names = [o.name for o in sess.get_outputs()]
    ids, mask, _ = _tokenize(art, "left")
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions_from_mask(mask, ids.shape[1])}
    for i in range(dims["num_layers"]):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((len(TEXTS), dims["num_kv_heads"], 0, dims["head_dim"]), np.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model(preset)), attn_implementation="eager").eval()
    with torch.no_grad():
        gen = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=4,
                             min_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=art.manifest["io"]["pad_token_id"])
    out = dict(zip(names, sess.run(None, feeds)))
    for step in range(4):  # prefill, then three decode steps
        logits = out["logits"][:, -1]
        np.testing.assert_allclose(logits, gen.logits[step].numpy(), atol=1e-4, rtol=1e-4)
        tok = logits.argmax(-1)
        assert (tok == gen.sequences[:, ids.shape[1] + step].numpy()).all()
        mask = np.concatenate([mask, np.ones((len(TEXTS), 1), np.int64)], axis=1)
        feeds = {"input_ids": tok[:, None].astype(np.int64), "attention_mask": mask,
                 "position_ids": positions_from_mask(mask, 1)}
        for i in range(dims["num_layers"]):
            for kv in ("key", "value"):
                feeds[f"past_key_values.{i}.{kv}"] = out[f"present.{i}.{kv}"]
        out = dict(zip(names, sess.run(None, feeds)))


def test_dynamic_axes_share_one_symbol_per_meaning(exported):
    art = exported("llama")
    shapes = {io["name"]: io["shape"] for io in art.inputs + art.outputs}
    assert {s[0] for s in shapes.values()} == {"batch"}
    assert shapes["input_ids"] == ["batch", "sequence"]
    assert shapes["attention_mask"] == ["batch", "total_sequence"]
    assert shapes["past_key_values.0.key"] == ["batch", 2, "past_sequence", 16]
    assert shapes["present.1.value"] == ["batch", 2, "total_sequence", 16]
    assert shapes["logits"][:2] == ["batch", "sequence"]


def test_manifest_records_what_a_reviewer_needs(exported, tiny_model):
    art = exported("llama")
    m = art.manifest
    assert m["source"]["model_type"] == "llama" and m["source"]["architecture"] == "LlamaForCausalLM"
    assert len(m["source"]["weights_sha256"]) == 64
    assert m["model"]["opset"] == 17 and m["model"]["dtype"] == "fp32"
    for lib in ("torch", "transformers", "onnx", "onnxruntime", "trtforge"):
        assert m["versions"][lib]
    assert m["validation"]["passed"] is True
    assert {c["name"] for c in m["validation"]["cases"]} >= {"prefill-unpadded-1", "prefill-left-padded-3", "decode-1-after-padded"}
    assert m["timings"]["export_s"] > 0 and m["timings"]["validate_s"] > 0
    for name, digest in m["files"].items():
        assert sha256_file(art.path / name) == digest
    # tokenizer and config travel with the artifact
    assert (art.path / "tokenizer.json").exists() and (art.path / "config.json").exists()
    transformers.AutoTokenizer.from_pretrained(str(art.path))


def test_gemm_weights_carry_module_names(exported):
    names = {t.name for t in exported("llama").load().graph.initializer}
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert "model.layers.1.mlp.down_proj.weight" in names
    assert not [n for n in names if n.startswith("onnx::MatMul")]


@pytest.mark.parametrize("preset", ["llama", "gpt2", "bert"])
def test_fp16_export_keeps_norms_and_softmax_in_fp32_and_stays_finite_on_padding(exported, preset):
    art16 = exported(preset, dtype="fp16")
    model = art16.load()
    float_outs = [o for o in art16.outputs if o["dtype"].startswith("float")]
    assert all(o["dtype"] == "float16" for o in float_outs)
    idx = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    # Softmax and LayerNormalization inputs are FP32 (casts inserted around them)
    from trtforge.graph import GraphIndex, find_norms

    gi = GraphIndex(model)
    vi = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    for node in model.graph.node:
        if node.op_type in ("Softmax", "LayerNormalization"):
            assert vi.get(node.input[0], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT, node.name
    norms = find_norms(model, gi)
    assert norms, "norms must still be found after conversion"
    # GEMM weights are FP16
    w = [inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert w and all(t.data_type == onnx.TensorProto.FLOAT16 for t in w)
    del idx
    assert art16.manifest["validation"]["passed"]
    art32 = exported(preset)
    side = art32.manifest["io"]["padding_side"]
    ids, mask, tt = _tokenize(art32, side)
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in [i["name"] for i in art32.inputs]:
        feeds["token_type_ids"] = tt
    if any(i["name"] == "position_ids" for i in art32.inputs):
        feeds["position_ids"] = positions_from_mask(mask, ids.shape[1])
    for i in art32.inputs:
        if i["name"].startswith("past_key_values"):
            d = art32.manifest["dims"]
            feeds[i["name"]] = np.zeros((len(TEXTS), d["num_kv_heads"], 0, d["head_dim"]), np.float32)
    ref = _session(art32).run(None, feeds)[0]
    feeds16 = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in feeds.items()}
    got = _session(art16).run(None, feeds16)[0]
    assert np.isfinite(got).all(), "padded rows must not produce NaN/inf in FP16"
    valid = mask.astype(bool)
    err = np.abs(got.astype(np.float32) - ref)[valid].max() / max(1.0, np.abs(ref).max())
    assert err < 2e-2


def test_external_data_forced(tiny_model, tmp_path):
    art = export_onnx(tiny_model("llama"), tmp_path / "ext", ExportOptions(external_data=True))
    assert art.manifest["model"]["external_data"] == "model.onnx.data"
    assert (art.path / "model.onnx.data").stat().st_size > (art.path / "model.onnx").stat().st_size
    onnx.checker.check_model(str(art.model_path), full_check=True)
    assert art.manifest["validation"]["passed"]


def test_mistral_exports(exported):
    assert exported("mistral").manifest["validation"]["passed"]


def test_manifest_is_plain_json(exported):
    text = (exported("bert").path / "manifest.json").read_text()
    assert json.loads(text)["kind"] == "onnx"


def test_export_reports_fp16_option(exported):
    art = exported("gpt2", dtype="fp16")
    assert art.manifest["options"]["dtype"] == DType.FP16.value
    assert art.task == Task.CAUSAL_LM_WITH_PAST.value
