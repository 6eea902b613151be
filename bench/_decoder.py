"""A small LLaMA trained on CPU for the decoder benchmarks (no hub; a random model cannot show
quantization effects on perplexity). Cached under bench/out/.

Corpus: the docstrings of this Python's standard library (English technical prose, the same on
every CPython of a version, read with ``ast``: nothing is imported). Modules whose name hashes
to 0 mod 10 are held out for evaluation; calibration text is cut from the training split.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sysconfig
import time
from pathlib import Path

import numpy as np


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            d = ast.get_docstring(node)
            if d and len(d.split()) >= 8:
                out.append(" ".join(d.split()))
    return out


def corpus(out: Path) -> dict:
    """Write train.txt / calib.txt / eval.txt under ``out``; returns a description."""
    if (out / "corpus.json").exists():
        return json.loads((out / "corpus.json").read_text())
    std = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in std.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts
                   and "idlelib" not in p.parts)
    train, held = [], []
    for p in files:
        rel = str(p.relative_to(std))
        bucket = held if int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 10 == 0 else train
        bucket += _docstrings(p)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    calib_idx = set(rng.choice(len(train), size=min(400, len(train)), replace=False).tolist())
    (out / "train.txt").write_text("\n\n".join(train))
    (out / "calib.txt").write_text("\n\n".join(t for i, t in enumerate(train) if i in calib_idx))
    (out / "eval.txt").write_text("\n\n".join(held))
    info = {"source": f"docstrings of the Python {sysconfig.get_python_version()} standard library ({std})",
            "train_docstrings": len(train), "eval_docstrings": len(held), "calib_docstrings": len(calib_idx),
            "train_sha256": hashlib.sha256((out / "train.txt").read_bytes()).hexdigest(),
            "eval_sha256": hashlib.sha256((out / "eval.txt").read_bytes()).hexdigest()}
    (out / "corpus.json").write_text(json.dumps(info, indent=2))
    return info


def train_llama(out: Path, data: Path, steps: int = 800, seed: int = 0) -> dict:
    """Train a 4-layer LLaMA (hidden 320, GQA 5/1 heads, tied embeddings, ~6M parameters)."""
    import torch
    import transformers

    from trtforge.testing.tinymodels import make_tokenizer

    if (out / "train.json").exists():
        return json.loads((out / "train.json").read_text())
    torch.manual_seed(seed)
    text = (data / "train.txt").read_text()
    tok = make_tokenizer("bpe", vocab_size=4000, texts=text.split("\n\n"))
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], np.int64)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=320, intermediate_size=864, num_hidden_layers=4, num_attention_heads=5,
        num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    model = transformers.LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    rng = np.random.default_rng(seed)
    seq, batch = 128, 16
    t0 = time.time()
    model.train()
    losses = []
    for _ in range(steps):
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
    info = {"steps": steps, "batch": batch, "seq": seq, "seconds": round(time.time() - t0, 1),
            "final_train_loss": float(np.mean(losses[-20:])), "train_tokens": int(len(ids)),
            "tokens_seen": steps * batch * seq, "params": int(sum(p.numel() for p in model.parameters()))}
    (out / "train.json").write_text(json.dumps(info, indent=2))
    return info


def with_outliers(src: Path, out: Path) -> Path:
    """The same function with LLM-like activation outliers (see trtforge.testing.tinymodels.inject_outliers)."""
    import shutil

    import transformers

    from trtforge.testing.tinymodels import inject_outliers

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
