"""Export time and peak memory: all-MiniLM-L6-v2 and a ~100M-parameter LLaMA built from a config.

Each export runs in its own process. Peak RSS is that process's high-water mark (VmHWM); the
figure that matters is the peak above the RSS after importing torch, transformers, onnx and
onnxruntime, in units of the weights' size: the export stage aims at about two copies.

    python bench/export.py [--json docs/results/export.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine, minilm_dir  # noqa: E402

OUT = REPO / "bench" / "out" / "export"

CHILD = r"""
import json, sys, time

def hwm_mib():  # VmHWM: this process's peak RSS (ru_maxrss can carry the parent's across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

t0 = time.perf_counter()
from trtforge.exporter import DType, ExportOptions, Task, export_onnx
t_import = time.perf_counter() - t0
src, out, dtype, task = sys.argv[1:5]
import onnx, onnxruntime, torch, transformers  # the libraries' own memory is not the export's
base = hwm_mib()
t = time.perf_counter()
art = export_onnx(src, out, ExportOptions(dtype=DType(dtype), task=Task(task) if task != "-" else None), force=True)
print(json.dumps({"seconds": time.perf_counter() - t, "import_s": t_import, "timings": art.manifest["timings"],
                  "peak_rss_mib": hwm_mib(),
                  "rss_before_export_mib": base,
                  "validation_err": art.manifest["validation"].get("max_normalized_err")}))
"""


def weights_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20


def run(src: Path, name: str, dtype: str, task: str = "-") -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, str(src), str(OUT / f"{name}-{dtype}"), dtype, task],
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(p.stderr)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r.update(model=name, dtype=dtype, weights_mib=weights_mib(src))
    r["peak_over_weights"] = (r["peak_rss_mib"] - r["rss_before_export_mib"]) / r["weights_mib"]
    print(f"{name:12} {dtype}  {r['seconds']:6.1f}s  peak RSS {r['peak_rss_mib']:7.0f} MiB "
          f"(+{r['peak_rss_mib'] - r['rss_before_export_mib']:.0f} MiB during export = "
          f"{r['peak_over_weights']:.2f}x the {r['weights_mib']:.0f} MiB of weights)", flush=True)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=REPO / "docs" / "results" / "export.json")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    llama = OUT / "llama-100m-src"
    if not (llama / "config.json").exists():  # in a child, so this process stays small
        subprocess.run([sys.executable, "-c", "import sys; from trtforge.testing.tinymodels import make_model; "
                        "make_model('llama-100m', sys.argv[1])", str(llama)], check=True)
    rows = [run(minilm_dir(), "minilm", "fp32"), run(minilm_dir(), "minilm", "fp16"),
            run(llama, "llama-100m", "fp32"), run(llama, "llama-100m", "fp16")]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
