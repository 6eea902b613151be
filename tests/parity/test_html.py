"""report.html: self-contained, and it renders in a real browser (headless Chromium screenshot).

Chromium is Debian's ``chromium`` package (``apt-get install -y chromium``); without it the
screenshot test is skipped with that hint.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
BANNER = {"pass": (0x1A, 0x7F, 0x37), "fail": (0xCF, 0x22, 0x2E)}


def test_html_is_self_contained(fp16_vs_fp32, corrupted_report):
    for rep in (fp16_vs_fp32, corrupted_report):
        html = (rep.path / "report.html").read_text()
        assert "<script" not in html.lower()
        # no external resources: nothing is loaded from a URL or another file
        assert not re.findall(r"(?:src|href)\s*=|url\(|@import|<link|<img|<iframe", html, re.IGNORECASE)
        assert html.count("<svg") >= 4  # error distributions of several outputs
        c = rep.content
        for digest in (c["reference"]["model_sha256"], c["candidate"]["model_sha256"], c["data"]["feeds_sha256"],
                       c["data"]["sources"][0]["sha256"]):
            assert digest in html
        assert ("Parity PASSED" if rep.passed else "Parity FAILED") in html
        assert f'class="banner {"pass" if rep.passed else "fail"}"' in html
        assert f".banner.pass{{background:#{''.join(f'{v:02x}' for v in BANNER['pass'])}}}" in html
        assert c["environment"]["versions"]["onnxruntime"] in html
    assert "top1_agreement" in (corrupted_report.path / "report.html").read_text()


def _png_pixels(path: Path):
    """An 8-bit, non-interlaced RGB(A) PNG (what Chromium writes) as an [h, w, 3] uint8 array."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    w, h, depth, color, _, _, interlace = ihdr
    assert depth == 8 and color in (2, 6) and interlace == 0, ihdr
    bpp = 3 if color == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, w * bpp + 1)
    out = np.zeros((h, w * bpp), np.uint8)
    prev = np.zeros(w * bpp, np.int64)
    for y in range(h):
        f, line = raw[y, 0], raw[y, 1:].astype(np.int64)
        if f == 1:  # Sub: a running sum per channel
            line = np.cumsum(line.reshape(w, bpp), axis=0).reshape(-1) & 255
        elif f == 2:  # Up
            line = (line + prev) & 255
        elif f in (3, 4):  # Average, Paeth: sequential along the row
            cur = line.tolist()
            up = prev.tolist()
            for i in range(len(cur)):
                a = cur[i - bpp] if i >= bpp else 0
                b, c = up[i], up[i - bpp] if i >= bpp else 0
                if f == 3:
                    cur[i] = (cur[i] + (a + b) // 2) & 255
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            line = np.array(cur, np.int64)
        out[y] = line
        prev = line
    return out.reshape(h, w, bpp)[:, :, :3]


def screenshot(html: Path, png: Path, *, width: int = 1280, height: int = 1600) -> Path:
    """Render ``html`` with headless Chromium (flags that work as root, no network, no profile)."""
    profile = png.parent / f"{png.stem}-profile"
    profile.mkdir()
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={width},{height}", html.as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env={**os.environ, "HOME": str(profile)})
    assert png.is_file(), r.stderr[-2000:]
    return png


@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium: apt-get install -y chromium")
def test_report_renders_in_chromium(corrupted_report, tmp_path):
    """One screenshot (Chromium takes seconds to start): the failing report, whose red banner,
    check table and plots must all show."""
    which = "fail"
    png = screenshot(corrupted_report.path / "report.html", tmp_path / "report.png")
    px = _png_pixels(png)
    assert px.shape == (1600, 1280, 3)
    # the banner across the top has the verdict's colour
    assert np.abs(px[30, 20].astype(int) - BANNER[which]).max() < 8, px[30, 20]
    # the page is not blank: text, tables and plots give many colours and little empty space
    flat = px.reshape(-1, 3)
    colours = np.unique(flat, axis=0)
    assert len(colours) > 60, len(colours)
    background = np.all(flat == 255, axis=1) | np.all(flat == (0xF6, 0xF8, 0xFA), axis=1)
    assert background.mean() < 0.85, background.mean()
