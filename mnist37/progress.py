"""Progress of a long stage: a bar on a terminal, plain periodic log lines otherwise (so
`ray job logs` and CI logs stay readable); and the watch on a wait (`Watch`): a line while
nothing finishes, one error once nothing has finished for stall_timeout_s."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from mnist37 import Mnist37Error

log = logging.getLogger(__name__)


def on_terminal() -> bool:
    """Whether stderr is a terminal that redraws a line on a carriage return: not a file, a
    pipe or a log, and not a Jupyter kernel's stream (ipykernel's OutStream: a notebook
    cell's output, where a \\r or an ANSI code shows as a stray character or a repeated
    line, whatever its isatty() says)."""
    return sys.stderr.isatty() and not type(sys.stderr).__module__.startswith("ipykernel")


class Progress:
    """A progress bar on a terminal; otherwise a log line every few seconds."""

    def __init__(self, label: str, total: int, unit: str = "", every_s: float = 5.0):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        # None until the first line: time.monotonic() counts from boot, so no clock value can
        # stand for "never logged" (on a node up for less than every_s, 0.0 would hide it).
        self.done, self.tty, self.last = 0, on_terminal(), None

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


class Stalled(Mnist37Error, TimeoutError):
    """Nothing a stage waited for finished within stall_timeout_s."""


# While nothing finishes, a line this often saying what is outstanding.
REPORT_EVERY_S = 30.0


class Watch:
    """What a stage waits for, and for how long nothing has finished: `waiting()` is called
    by a waiting loop each time a short wait ends with nothing done; it logs a line every
    `report_s` saying what is outstanding, and raises Stalled, naming what never finished and
    the likely cause, once nothing has finished for `stall_s`. Every finished thing starts the
    count again (`finished()`), so a slow job that moves is never stopped. `describe()` gives
    the state of what is being waited on (the cluster's free CPUs) and its likely cause."""

    def __init__(self, what: str, total: int, unit: str, stall_s: float,
                 describe: Callable[[], tuple[str, str]] = lambda: ("", ""), report_s: float = REPORT_EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.what, self.total, self.unit, self.stall_s, self.report_s = what, total, unit, stall_s, report_s
        self.describe, self.clock, self.done = describe, clock, 0
        self.since = self.reported = clock()

    def finished(self, n: int = 1) -> None:
        self.done += n
        self.since = self.reported = self.clock()

    def renew(self) -> None:
        """Start the count again though nothing finished: what the stage waits for was just
        submitted again (a lost node's tasks), so Ray works on it."""
        self.since = self.reported = self.clock()

    def outstanding(self, pending: int) -> str:
        return (f"{self.what}: {self.done:,}/{self.total:,}{self.unit} done, "
                f"{pending} task{'s' if pending != 1 else ''} pending")

    def waiting(self, pending: int) -> None:
        now = self.clock()
        idle = now - self.since
        if idle >= self.stall_s:
            state, cause = self.describe()
            raise Stalled(f"{self.outstanding(pending)} and none finished in {idle:.0f} s (stall_timeout_s)"
                          + (f"; {state}" if state else "") + (f": {cause}" if cause else ""))
        if now - self.reported >= self.report_s:
            self.reported = now
            state, _ = self.describe()
            log.warning("%s for %.0f s%s", self.outstanding(pending), idle, f"; {state}" if state else "")
