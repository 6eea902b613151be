"""A small LLaMA trained on CPU for the decoder benchmarks (no hub: random init can't show
quantization effects on perplexity). Cached under bench/out/."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

LICENSES = Path("/usr/share/common-licenses")
# GPL-3 is the evaluation text; GPL and GPL-2 are near-copies of it, LGPL-3 embeds it.
TRAIN_LICENSES = ["Apache-2.0", "Artistic", "BSD", "CC0-1.0", "GFDL-1.2", "GFDL-1.3", "GPL-1", "LGPL-2",
                  "LGPL-2.1", "MPL-1.1", "MPL-2.0"]


def training_text(data_dir: Path) -> tuple[str, list[str]]:
    texts, used = [], []
    for p in sorted(data_dir.glob("calib-*.txt")):
        texts.append(p.read_text(encoding="utf-8"))
        used.append(p.name)
    for name in TRAIN_LICENSES:
        p = LICENSES / name
        if p.is_file() and not p.is_symlink():
            texts.append(p.read_text(encoding="utf-8", errors="replace"))
            used.append(str(p))
    return "\n\n".join(texts), used


def train_llama(out: Path, data_dir: Path, steps: int = 700, seed: int = 0) -> dict:
    """Train a 4-layer LLaMA (hidden 320, GQA 5/1 heads, tied embeddings) on license texts."""
    import torch
    import transformers

    from trtforge.tinymodels import make_tokenizer

    if (out / "config.json").exists():
        import json

        return json.loads((out / "train.json").read_text())
    torch.manual_seed(seed)
    tok = make_tokenizer("bpe", vocab_size=2000)
    text, used = training_text(data_dir)
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], np.int64)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=320, intermediate_size=864, num_hidden_layers=4, num_attention_heads=5,
        num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    model = transformers.LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    seq, batch = 128, 16
    t0 = time.time()
    model.train()
    losses = []
    for step in range(steps):
        starts = rng.integers(0, len(ids) - seq - 1, batch)
        x = torch.from_numpy(np.stack([ids[s : s + seq] for s in starts]))
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    info = {"steps": steps, "seconds": round(time.time() - t0, 1), "final_loss": float(np.mean(losses[-20:])),
            "tokens": int(len(ids)), "params": int(sum(p.numel() for p in model.parameters())), "corpus": used}
    import json

    (out / "train.json").write_text(json.dumps(info, indent=2))
    return info


def with_outliers(src: Path, out: Path) -> Path:
    """The same function with LLM-like activation outliers (see trtforge.tinymodels.inject_outliers)."""
    import shutil

    import transformers

    from trtforge.tinymodels import inject_outliers

    if (out / "config.json").exists():
        return out
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src)).eval()
    inject_outliers(model, channels=4, scale=(20.0, 60.0))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "train.json"):
            shutil.copy2(f, out / f.name)
    return out
