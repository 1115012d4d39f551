"""Progress of a long stage: a bar on a terminal, plain periodic log lines otherwise (so
`ray job logs` and CI logs stay readable)."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


class Progress:
    """A progress bar on a terminal; otherwise a log line every few seconds."""

    def __init__(self, label: str, total: int, unit: str = "", every_s: float = 5.0):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        # None until the first line: time.monotonic() counts from boot, so no clock value can
        # stand for "never logged" (on a node up for less than every_s, 0.0 would hide it).
        self.done, self.tty, self.last = 0, sys.stderr.isatty(), None

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.tty:
            filled = int(30 * self.done / max(self.total, 1))
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] "
                             f"{self.done:,}/{self.total:,}{self.unit}")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif self.last is None or now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            log.info("%s: %s/%s%s", self.label, f"{self.done:,}", f"{self.total:,}", self.unit)


@dataclass
class Status:
    """Where a running job is, for a one-line account when it is stopped part way."""

    stage: str = "starting"
    shards_total: int = 0
    shards_decoded: int = 0
    chunks_total: int = 0
    chunks_classified: int = 0
