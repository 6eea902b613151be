"""Progress on stderr: a bar on a terminal, periodic log lines otherwise (and in JSON logs)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from trtforge.logs import is_json_logging

T = TypeVar("T")
log = logging.getLogger("trtforge.progress")


def progress(items: Iterable[T], total: int, desc: str) -> Iterator[T]:
    use_bar = sys.stderr.isatty() and not is_json_logging() and log.isEnabledFor(logging.INFO)
    if use_bar:
        try:
            from tqdm import tqdm
        except ImportError:
            use_bar = False
    if use_bar:
        yield from tqdm(items, total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
        return
    t0 = time.perf_counter()
    step = max(1, total // 10)
    for i, item in enumerate(items, 1):
        yield item
        if i % step == 0 or i == total:
            seconds = time.perf_counter() - t0
            eta = seconds / i * (total - i)
            log.info("%s %d/%d (%.0fs, ETA %.0fs)", desc, i, total, seconds, eta,
                     extra={"event": "progress", "progress": i, "total": total,
                            "seconds": round(seconds, 2), "eta_s": round(eta, 2)})
