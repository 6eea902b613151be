"""Progress on stderr: a bar on a terminal, periodic log lines otherwise (and in JSON logs).

Log lines come every tenth of the work and at least every LOG_EVERY_S seconds, each with the
time so far and the ETA, so that an hours-long calibration of a large model says where it is.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from trtforge.logs import is_json_logging

T = TypeVar("T")
log = logging.getLogger("trtforge.progress")
LOG_EVERY_S = 30.0


def _use_bar() -> bool:
    if not (sys.stderr.isatty() and not is_json_logging() and log.isEnabledFor(logging.INFO)):
        return False
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


class Progress:
    """``step(where)`` after each unit of work: ``where`` (e.g. "layer 3/22, window 5/16") is shown
    with the count, the seconds so far and the ETA."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.done = max(total, 0), desc, 0
        self._t0 = self._last = time.perf_counter()
        self._every = max(1, self.total // 10)
        self._bar = None
        if _use_bar():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)

    def step(self, where: str = "") -> None:
        self.done += 1
        if self._bar is not None:
            if where:
                self._bar.set_postfix_str(where, refresh=False)
            self._bar.update(1)
            if self.done >= self.total:
                self._bar.close()
            return
        now = time.perf_counter()
        if self.done % self._every and self.done != self.total and now - self._last < LOG_EVERY_S:
            return
        self._last = now
        seconds = now - self._t0
        eta = seconds / self.done * (self.total - self.done)
        at = f" ({where})" if where else ""
        log.info("%s %d/%d%s (%.0fs, ETA %.0fs)", self.desc, self.done, self.total, at, seconds, eta,
                 extra={"event": "progress", "progress": self.done, "total": self.total, "where": where,
                        "seconds": round(seconds, 2), "eta_s": round(eta, 2)})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def progress(items: Iterable[T], total: int, desc: str) -> Iterator[T]:
    p = Progress(total, desc)
    try:
        for item in items:
            yield item
            p.step()
    finally:
        p.close()
