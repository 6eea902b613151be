"""Tiny Hugging Face models with real tokenizers, built from configs in code (test helpers).

Used by the tests, the examples and the benchmarks: no model hub is reachable, so every model
except the packaged all-MiniLM-L6-v2 is made here, with a fixed seed. Shapes are deliberately
awkward (hidden sizes 128 does not divide, grouped-query attention, tied embeddings), the way
real small models are.

``inject_outliers`` reproduces what makes real LLMs hard to quantize: a few hidden channels
whose normalized activations are 20-60x larger than the rest. It scales those channels of each
normalization's weight and divides the same input rows of the GEMMs that read it, so the
model computes exactly the same function (SmoothQuant's transform run backwards).
"""

from __future__ import annotations

from pathlib import Path

from trtforge.sample_text import SENTENCES

# name -> (model_type, config kwargs, head)
PRESETS: dict[str, tuple[str, dict, str]] = {
    "bert": ("bert", dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=200,
                          max_position_embeddings=128, type_vocab_size=2), "base"),
    "bert-cls": ("bert", dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=200,
                              max_position_embeddings=128, type_vocab_size=2, num_labels=3), "cls"),
    # RoBERTa counts positions from pad_token_id + 1, so it needs two positions more than BERT.
    "roberta": ("roberta", dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=200,
                                max_position_embeddings=130, type_vocab_size=1), "base"),
    "gpt2": ("gpt2", dict(n_embd=96, n_layer=2, n_head=4, n_positions=128), "lm"),
    # GQA (6 query heads, 2 kv heads), tied embeddings, hidden 96 / intermediate 160: neither
    # divisible by 128, so INT4 block sizes must fall back.
    "llama": ("llama", dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
                            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                            rms_norm_eps=1e-5), "lm"),
    "qwen2": ("qwen2", dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
                            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True), "lm"),
    "mistral": ("mistral", dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
                                num_key_value_heads=2, max_position_embeddings=256, sliding_window=None), "lm"),
    # QK-norm over an explicit head_dim 32 (6 x 32 = 192 != hidden 96, as in real Qwen3)
    "qwen3": ("qwen3", dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
                            num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                            tie_word_embeddings=True), "lm"),
    # fused qkv_proj / gate_up_proj, GQA (real Phi-3-mini has none, Phi-4-mini has 24/8) and Phi-4-mini's
    # partial rotary (0.75 of head_dim 16: 12 rotated channels)
    "phi3": ("phi3", dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
                          num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                           "partial_rotary_factor": 0.75},
                          tie_word_embeddings=False), "lm"),
    # Phi-4-mini's rotary: longrope (short factors up to original_max_position_embeddings, long ones
    # past it; here 32 positions, so test prompts cross it) on 0.75 of head_dim
    "phi3-longrope": ("phi3", dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
                                   num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                                   rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                    "partial_rotary_factor": 0.75,
                                                    "original_max_position_embeddings": 32,
                                                    "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0],
                                                    "short_factor": [1.0, 1.0, 1.1, 1.2, 1.3, 1.4]},
                                   tie_word_embeddings=False), "lm"),
    # Gemma 3's layer mix in small: a 4-token window (so test prompts run past it), sliding and
    # full layers with their own RoPE bases, head_dim 32 with query_pre_attn_scalar 24 (the
    # attention scale is not head_dim ** -0.5), (1 + w) norms, QK-norm, scaled tied embeddings
    "gemma3_text": ("gemma3_text", dict(
        hidden_size=96, intermediate_size=160, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
        head_dim=32, query_pre_attn_scalar=24, max_position_embeddings=256, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
        pad_token_id=0, tie_word_embeddings=True), "lm"),
    # ~110M parameters, the LLaMA layout of SmolLM-135M with fewer layers: hidden 576 and MLP 1536
    # (128 divides neither), 9/3 GQA heads, a 49152-token vocabulary, tied embeddings.
    "llama-100m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=24, num_attention_heads=9,
                                 num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
                                 vocab_size=49152), "lm"),
}


def corpus() -> list[str]:
    """Text to train tiny tokenizers on: the packaged example data plus the sample sentences."""
    texts = list(SENTENCES)
    data = Path(__file__).resolve().parents[2] / "examples" / "data"  # a source checkout
    # held-out evaluation text (eval-*.txt) never trains a tokenizer
    for p in sorted(data.glob("calib-*.txt")) if data.is_dir() else []:
        texts += [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    return texts


def make_tokenizer(kind: str, vocab_size: int = 1000, texts: list[str] | None = None):
    """A trained WordPiece (BERT-style) or byte-level BPE (GPT-2/LLaMA-style) fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = corpus() if texts is None else texts
    if kind == "wordpiece":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
        tok.decoder = decoders.WordPiece()
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
            mask_token="[MASK]", model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        )
    specials = ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
        model_input_names=["input_ids", "attention_mask"],
    )


def make_model(preset: str, out: str | Path, *, seed: int = 0, vocab_size: int | None = None,
               outliers: bool = False, **overrides) -> Path:
    """Save a tiny random model + tokenizer to ``out`` (safetensors); returns the folder."""
    import torch
    import transformers

    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    model_type, kwargs, head = PRESETS[preset]
    kwargs = {**kwargs, **overrides}
    tokenizer = make_tokenizer("wordpiece" if model_type in ("bert", "roberta") else "bpe")
    vocab = vocab_size or kwargs.pop("vocab_size", None) or max(len(tokenizer), 1000)
    kwargs.pop("vocab_size", None)
    cfg_cls = transformers.AutoConfig.for_model(model_type).__class__
    special = {}
    if model_type in ("bert", "roberta"):
        special = {"pad_token_id": tokenizer.pad_token_id}
    else:
        special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    cfg = cfg_cls(vocab_size=vocab, **special, **kwargs)
    cls_name = {"base": "AutoModel", "cls": "AutoModelForSequenceClassification", "lm": "AutoModelForCausalLM"}[head]
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name).from_config(cfg, attn_implementation="eager").eval()
    _randomize_norms(model, seed)
    if outliers:
        inject_outliers(model, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def _randomize_norms(model, seed: int) -> None:
    """Freshly initialized norms are all ones/zeros; trained ones are not. Give them spread
    so tests exercise per-channel folding (and the exporter cannot deduplicate them)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in model.modules():
            if type(mod).__name__.endswith(("LayerNorm", "RMSNorm")) and getattr(mod, "weight", None) is not None:
                # Gemma's norms scale by (1 + w) and start at w = 0: spread them around 0, not 1
                centre = 0.0 if not mod.weight.any() else 1.0
                mod.weight.mul_(0).add_(centre + 0.2 * torch.randn(mod.weight.shape, generator=g))
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(0.05 * torch.randn(mod.bias.shape, generator=g))


def inject_outliers(model, *, channels: int = 3, scale: tuple[float, float] = (20.0, 60.0), seed: int = 0) -> None:
    """Make a few hidden channels of each pre-GEMM norm output 20-60x larger, function-preserving."""
    import torch

    g = torch.Generator().manual_seed(seed + 7)
    pairs = list(_norm_linear_pairs(model))
    hidden = pairs[0][0].weight.shape[0]
    idx = torch.randperm(hidden, generator=g)[:channels]  # the same channels in every layer, as in real LLMs
    factors = scale[0] + (scale[1] - scale[0]) * torch.rand(channels, generator=g)
    with torch.no_grad():
        for norm, linears in pairs:
            norm.weight[idx] *= factors
            if getattr(norm, "bias", None) is not None:
                norm.bias[idx] *= factors
            for lin in linears:
                w = lin.weight  # nn.Linear: [out, in]; GPT-2 Conv1D: [in, out]
                if type(lin).__name__ == "Conv1D":
                    w[idx, :] /= factors[:, None]
                else:
                    w[:, idx] /= factors[None, :]


def _norm_linear_pairs(model):
    """(norm, [linears reading its output]) for the attention and MLP input norms."""
    for layer in _layers(model):
        names = {type(m).__name__: m for m in layer.modules()}
        if hasattr(layer, "input_layernorm"):  # llama / qwen2 / mistral
            a = layer.self_attn
            yield layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj]
            yield layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj]
        elif hasattr(layer, "ln_1"):  # gpt2
            yield layer.ln_1, [layer.attn.c_attn]
            yield layer.ln_2, [layer.mlp.c_fc]
        else:  # bert: the norms sit after the residual; outliers go into the output LayerNorms
            del names
            att = layer.attention
            yield att.output.LayerNorm, [layer.intermediate.dense]


def _layers(model):
    for attr in ("model.layers", "transformer.h", "layers", "h", "encoder.layer", "bert.encoder.layer"):
        obj = model
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    raise ValueError(f"cannot find layers in {type(model).__name__}")
