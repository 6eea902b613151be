"""Gemma 3, Qwen3 and Phi-3 on tiny random models: what is new in each family exports exactly.

* left-padded batches match PyTorch (causal-lm);
* greedy decoding through the exported KV cache equals ``generate()`` token for token, for a
  prompt shorter than Gemma's tiny 4-token window and for a padded batch whose prompts run past
  it (transformers' own cache keeps only the last ``window - 1`` positions of a sliding layer,
  the export keeps them all and masks: the same attention);
* FP16 exports keep every norm (Gemma's (1 + w) ones and the QK-norms included) and the
  softmax in FP32;
* the family's graph patterns: (1 + w) scales as ``.weight_plus_one`` initializers, scaled
  embeddings, Phi-3's fused qkv_proj and gate_up_proj as one GEMM each.

A test marked ``real`` runs the Gemma 3 270M check of bench/gemma3_decode.py when
``TRTFORGE_GEMMA3_DIR`` names the prepared folder (bench/models.py gemma3-270m).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from trtforge.graph import GraphIndex, find_norms
from trtforge.inputs import positions_from_mask, tokenize_batch
from trtforge.testing.decode import onnx_greedy, torch_greedy

FAMILIES = ["gemma3_text", "qwen3", "phi3"]
TEXTS = ["A short line.", "The quick brown fox jumps over the lazy dog near the quiet river bank today.",
         "Engines are built per GPU."]
STEPS = 12
F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


def _session(art) -> ort.InferenceSession:
    return ort.InferenceSession(str(art.model_path), providers=["CPUExecutionProvider"])


def _batch(art):
    tok = transformers.AutoTokenizer.from_pretrained(str(art.path))
    return tokenize_batch(tok, TEXTS, "left", 64, art.manifest["io"]["pad_token_id"])


def _torch_model(folder: Path, **config_overrides):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager",
                                                             **config_overrides).eval()


@pytest.mark.parametrize("preset", FAMILIES)
def test_causal_lm_matches_pytorch_on_left_padded_batch(exported, tiny_model, preset):
    art = exported(preset, task="causal-lm")
    assert art.manifest["validation"]["passed"]
    ids, mask, _ = _batch(art)
    assert (mask == 0).any() and mask.sum(1).max() > 4, "padding, and a prompt past Gemma's 4-token window"
    pos = positions_from_mask(mask, ids.shape[1])
    got = _session(art).run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": pos})[0]
    with torch.no_grad():
        ref = _torch_model(tiny_model(preset))(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                               position_ids=torch.from_numpy(pos)).logits.numpy()
    valid = mask.astype(bool)
    assert np.abs(got - ref)[valid].max() < 1e-4


@pytest.mark.parametrize("prompt", ["short", "past-window-padded"])
@pytest.mark.parametrize("preset", FAMILIES)
def test_greedy_decoding_through_the_cache_equals_generate(exported, tiny_model, preset, prompt):
    art = exported(preset)
    assert art.task == "causal-lm-with-past"
    ids, mask, _ = _batch(art)
    if prompt == "short":  # 3 tokens: shorter than the window; decoding then crosses it
        row = ids[0][mask[0] == 1][:3]
        ids, mask = row[None, :], np.ones((1, 3), np.int64)
    model = _torch_model(tiny_model(preset))
    want = torch_greedy(model, ids, mask, STEPS, art.manifest["io"]["pad_token_id"])
    got = onnx_greedy(_session(art), ids, mask, STEPS)
    for step in range(STEPS):
        np.testing.assert_allclose(got.logits[step], want.logits[step], atol=1e-4, rtol=1e-4, err_msg=f"step {step}")
    assert (got.tokens == want.tokens).all()


@pytest.mark.parametrize("prompt_len", [28, 40])  # crosses the 32-position switch while decoding / in the prompt
def test_phi3_longrope_switches_frequencies_like_transformers(exported, tiny_model, prompt_len):
    """Phi-4-mini's longrope: transformers updates a buffer in place (no ONNX op); the export's
    equivalent picks short or long frequencies from max(position_ids) in the graph."""
    art = exported("phi3-longrope")
    tok = transformers.AutoTokenizer.from_pretrained(str(art.path))
    text = " ".join(TEXTS * 8)
    ids = np.array([tok(text)["input_ids"][:prompt_len]])
    assert ids.shape[1] == prompt_len
    mask = np.ones_like(ids)
    model = _torch_model(tiny_model("phi3-longrope"))
    want = torch_greedy(model, ids, mask, STEPS, art.manifest["io"]["pad_token_id"])
    got = onnx_greedy(_session(art), ids, mask, STEPS)
    for step in range(STEPS):
        np.testing.assert_allclose(got.logits[step], want.logits[step], atol=1e-4, rtol=1e-4, err_msg=f"step {step}")
    assert (got.tokens == want.tokens).all()


def test_gemma_window_is_applied_and_the_exported_cache_is_full_length(exported, tiny_model):
    """The tiny window changes the model's output (so the decoding test above tests it), and the
    export keeps every position of a sliding layer where transformers' cache keeps window - 1."""
    art = exported("gemma3_text")
    folder = tiny_model("gemma3_text")
    cfg = json.loads((folder / "config.json").read_text())
    window, types = cfg["sliding_window"], cfg["layer_types"]
    assert "sliding_attention" in types and "full_attention" in types and window == 4
    ids, mask, _ = _batch(art)
    got = onnx_greedy(_session(art), ids, mask, 1)
    unwindowed = _torch_model(folder, sliding_window=10_000)
    with torch.no_grad():
        far = unwindowed(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                         position_ids=torch.from_numpy(positions_from_mask(mask, ids.shape[1]))).logits[:, -1]
    assert np.abs(got.logits[0] - far.numpy()).max() > 1e-2, "the window must change the logits"
    # transformers' cache of a sliding layer: the last window - 1 positions; the export: all of them
    model = _torch_model(folder)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    sliding = types.index("sliding_attention")
    assert cache.layers[sliding].keys.shape[2] == window - 1
    sess = _session(art)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions_from_mask(mask, ids.shape[1])}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((ids.shape[0], i.shape[1], 0, i.shape[3]), np.float32)
    present = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    assert present[f"present.{sliding}.key"].shape[2] == ids.shape[1]


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types |= {t.name: t.data_type for t in model.graph.initializer}
    return types


@pytest.mark.parametrize("preset", FAMILIES)
def test_fp16_export_keeps_norms_qk_norms_and_softmax_in_fp32(exported, preset):
    art = exported(preset, dtype="fp16")
    assert art.manifest["validation"]["passed"]
    model = art.load()
    layers = art.manifest["dims"]["num_layers"]
    types = _elem_types(model)
    nodes = {n.name: n for n in model.graph.node}
    norms = find_norms(model, GraphIndex(model))
    per_layer = {"gemma3_text": 6, "qwen3": 4, "phi3": 2}[preset]  # Gemma: 4 + QK; Qwen3: 2 + QK
    assert len(norms) == layers * per_layer + 1
    assert sum(n.per_head for n in norms) == (2 * layers if preset != "phi3" else 0)
    assert all(n.plus_one for n in norms) == (preset == "gemma3_text")
    for norm in norms:
        for name in norm.nodes:
            if name == norm.scale_node and not norm.plus_one or nodes[name].op_type == "Cast":
                continue  # LLaMA-style scale multiply runs in FP16; casts are the boundaries
            for out in nodes[name].output:
                assert types.get(out) == F32, (preset, name, out)
        if norm.plus_one:  # (1 + w) multiplies in FP32, with an FP32 scale
            assert types[norm.scale] == F32
    for node in model.graph.node:
        if node.op_type == "Softmax":
            assert types.get(node.input[0]) == F32, node.name
    w = [types[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in types
         and n.input[1].endswith(".weight")]
    assert w and all(t == F16 for t in w)


def test_gemma_norm_scales_are_one_plus_the_checkpoint_weights(exported, tiny_model):
    art = exported("gemma3_text")
    model = art.load()
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    state = load_file(str(tiny_model("gemma3_text") / "model.safetensors"))
    norms = find_norms(model)
    assert art.manifest["model"]["weights"] == "attached from the module"  # no 5x-memory fallback
    for norm in norms:
        assert norm.plus_one and norm.scale.endswith(".weight_plus_one") and not norm.scale_add
        hf = norm.scale[: -len("_plus_one")]
        np.testing.assert_array_equal(inits[norm.scale], 1.0 + state[hf])
    names = {n.scale for n in norms}
    assert "model.layers.0.self_attn.q_norm.weight_plus_one" in names and "model.norm.weight_plus_one" in names
    # scaled embeddings: Gather, then Mul by sqrt(hidden)
    idx = GraphIndex(model)
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == "model.embed_tokens.weight")
    mul = idx.single_consumer(gather.output[0])
    assert mul.op_type == "Mul"
    scale = [idx.const_value(i) for i in mul.input if i != gather.output[0]][0]
    np.testing.assert_allclose(float(scale), 96 ** 0.5, rtol=1e-6)


def test_phi3_fused_projections_are_one_gemm_each_split_after(exported):
    model = exported("phi3").load()
    idx = GraphIndex(model)
    inits = {t.name: t for t in model.graph.initializer}
    for layer in range(2):
        for leaf, width, slices in (("self_attn.qkv_proj", 6 * 16 + 2 * 2 * 16, 3), ("mlp.gate_up_proj", 2 * 160, 2)):
            name = f"model.layers.{layer}.{leaf}.weight"
            assert list(inits[name].dims) == [96, width]  # [in, out]: transposed for MatMul
            (gemm,) = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] == name]
            readers = [c for c in idx.consumers[gemm.output[0]] if c.op_type != "Shape"]
            assert [c.op_type for c in readers] == ["Slice"] * slices, (leaf, [c.op_type for c in readers])


@pytest.mark.real
@pytest.mark.skipif(not os.environ.get("TRTFORGE_GEMMA3_DIR"), reason="set TRTFORGE_GEMMA3_DIR to a prepared Gemma 3 270M")
def test_real_gemma3_270m_decodes_like_generate(tmp_path):
    """bench/gemma3_decode.py's check: 20 greedy tokens for three short prompts and a ~600-token
    one (past the 512 window) through the with-past export equal PyTorch's generate()."""
    from trtforge.exporter import ExportOptions, export_onnx
    from trtforge.testing.decode import GEMMA3_STEPS, compare_greedy, gemma3_prompts

    folder = Path(os.environ["TRTFORGE_GEMMA3_DIR"])
    art = export_onnx(folder, tmp_path / "gemma-past", ExportOptions())
    assert art.manifest["validation"]["passed"]
    results = compare_greedy(art.path, folder, gemma3_prompts(folder), GEMMA3_STEPS)
    assert max(r["prompt_tokens"] for r in results) > json.loads((folder / "config.json").read_text())["sliding_window"]
    for r in results:
        assert r["identical"], r
