"""Progress of a running certification: images done, images/s and an ETA, logged as it goes."""
from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class Progress:
    """Logs images done, images/s and an ETA every ``every`` images (``total`` None: unknown)."""

    def __init__(self, total: int | None, every: int):
        self.total, self.every, self.done, self.rows = total, every, 0, 0
        self.start, self._next = time.perf_counter(), every

    def update(self, images: int, rows: int) -> None:
        self.done += images
        self.rows += rows
        if self.done >= self._next:
            self._next = (self.done // self.every + 1) * self.every
            log.info(self.line())

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def line(self) -> str:
        elapsed = self.seconds()
        rate = self.done / elapsed if elapsed > 0 else 0.0
        text = f"{self.done} images, {self.rows} rows, {rate:.2f} images/s"
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            text = f"{self.done}/{self.total} images ({100 * self.done / self.total:.1f}%), " \
                   f"{self.rows} rows, {rate:.2f} images/s, ETA {eta / 60:.1f} min"
        return text
