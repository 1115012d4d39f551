import io
import logging

import pytest

from mnist37 import progress
from mnist37.progress import Progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    """time.monotonic as a test sets it: it counts from boot, so any value can be 'now'."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_terminal_gets_a_bar(monkeypatch):
    screen = FakeTerminal()
    monkeypatch.setattr(progress.sys, "stderr", screen)
    bar = Progress("decode", 4, " shards")
    for _ in range(4):
        bar.update()
    frames = screen.getvalue().split("\r")[1:]
    assert len(frames) == 4 and frames[0].startswith("decode [#######")
    assert frames[-1] == "decode [" + "#" * 30 + "] 4/4 shards\n"


@pytest.mark.parametrize("boot_s", [0.5, 3.0, 30 * 86400.0])  # a node booted a moment ago, or weeks ago
def test_a_log_gets_its_first_line_periodic_lines_and_the_last_one(monkeypatch, caplog, boot_s):
    clock = Clock(boot_s)
    monkeypatch.setattr(progress.sys, "stderr", io.StringIO())
    monkeypatch.setattr(progress.time, "monotonic", clock)
    caplog.set_level(logging.INFO, logger="mnist37.progress")
    bar = Progress("classify", 1000, " shards", every_s=5)
    for i in range(1000):
        clock.now = boot_s + i * 0.01  # 10 s in all: lines at 0 s, 5 s and the end
        bar.update()
    assert [r.getMessage() for r in caplog.records] == [
        "classify: 1/1,000 shards", "classify: 501/1,000 shards", "classify: 1,000/1,000 shards"]


def test_a_jupyter_kernel_gets_plain_lines_whatever_isatty_says(monkeypatch, caplog):
    """A notebook cell shows \\r and ANSI codes as stray characters: under ipykernel, lines."""
    kernel_stream = type("OutStream", (FakeTerminal,), {"__module__": "ipykernel.iostream"})  # isatty: True
    screen = kernel_stream()
    monkeypatch.setattr(progress.sys, "stderr", screen)
    with caplog.at_level(logging.INFO, logger="mnist37.progress"):
        bar = Progress("decode", 2, " shards")
        bar.update()
        bar.update()
    assert screen.getvalue() == ""
    assert [r.getMessage() for r in caplog.records] == ["decode: 1/2 shards", "decode: 2/2 shards"]
