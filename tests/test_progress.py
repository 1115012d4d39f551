import io
import logging

from mnist37 import progress
from mnist37.progress import Progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar(monkeypatch):
    screen = FakeTerminal()
    monkeypatch.setattr(progress.sys, "stderr", screen)
    bar = Progress("decode", 4, " shards")
    for _ in range(4):
        bar.update()
    frames = screen.getvalue().split("\r")[1:]
    assert len(frames) == 4 and frames[0].startswith("decode [#######")
    assert frames[-1] == "decode [" + "#" * 30 + "] 4/4 shards\n"


def test_a_log_gets_periodic_lines_and_the_last_one(monkeypatch, caplog):
    monkeypatch.setattr(progress.sys, "stderr", io.StringIO())
    caplog.set_level(logging.INFO, logger="mnist37.progress")
    bar = Progress("classify", 1000, " shards", every_s=3600)
    for _ in range(1000):
        bar.update()
    assert [r.getMessage() for r in caplog.records] == ["classify: 1/1,000 shards", "classify: 1,000/1,000 shards"]
