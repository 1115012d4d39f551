"""This process's descendants, and stopping them: what a Ray the job started is made of while
`ray.init` is still starting it (its GCS, raylet and dashboard are the job's children, the
raylet's agents and workers their children), before Ray itself knows how to stop them.

`stopped_by_signals` is how a SIGINT or SIGTERM that arrives during `ray.init` still ends the
job at once and leaves no Ray process behind: Python runs a signal's handler only between the
main thread's bytecodes (not while `ray.init` waits in C++), and `ray.init` puts its own SIGTERM
handler in place (`sys.exit(15)`, no line) as it begins. The signal's number reaches a thread of
ours through `signal.set_wakeup_fd` whatever Python handler is installed, and that thread stops
the half-started Ray and ends the job.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

STOPPING = (signal.SIGINT, signal.SIGTERM)


def _parents() -> dict[int, int]:
    """Every running process's parent: pid -> parent pid (Linux's /proc; none elsewhere)."""
    parents: dict[int, int] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    parents[int(entry.name)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue  # ended meanwhile
    return parents


def descendants(pid: int | None = None) -> list[int]:
    """Every process below `pid` (default: this one), children first (Linux's /proc; none
    elsewhere)."""
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, frontier = [], [root]
    while frontier:
        below = [child for pid in frontier for child in children.get(pid, [])]
        found += below
        frontier = below
    return found


def children_running(*parts: str) -> list[int]:
    """This process's children whose command line holds every one of `parts`."""
    found, me = [], os.getpid()
    for pid, parent in _parents().items():
        if parent != me:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # ended meanwhile
        if all(part in command for part in parts):
            found.append(pid)
    return found


def stop_descendants() -> list[int]:
    """SIGKILL every process below this one; return their pids. Each is first paused
    (SIGSTOP) until no new one appears, so none starts another meanwhile, and this process's
    own children are reaped, so none is left a zombie while it lives on."""
    paused: list[int] = []
    while new := [pid for pid in descendants() if pid not in paused]:
        for pid in new:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGSTOP)
        paused += new
    for pid in paused:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for pid in paused:
        with contextlib.suppress(OSError):  # ChildProcessError: not ours to reap
            os.waitpid(pid, 0)
    return paused


def _noted(signum, frame) -> None:
    """A handler that does nothing: with it in place, the signal's number reaches the wakeup
    fd, where `stopped_by_signals`' thread takes it."""


@contextlib.contextmanager
def stopped_by_signals(on_signal: Callable[[int], object] | None) -> Iterator[None]:
    """While the body runs (in the main thread), a SIGINT or SIGTERM stops every process
    below this one (`stop_descendants`) and calls `on_signal(signum)`, which must end the
    process, from a thread: wherever the main thread waits, whichever Python handler the body
    installs meanwhile. The handlers in place before are put back after. Without `on_signal`,
    or off the main thread, nothing changes."""
    if on_signal is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    def watch() -> None:
        while (byte := os.read(read_fd, 1)) and byte[0] != 0:  # 0: the body is over
            if byte[0] in STOPPING:
                # The main thread runs on meanwhile (ray.init may start the GCS just after the
                # first pass): again until a pass 0.1 s later finds none, for 2 s at most.
                for _ in range(20):
                    if stop_descendants():
                        continue
                    time.sleep(0.1)
                    if not descendants():
                        break
                on_signal(byte[0])
                return

    saved = {signum: signal.getsignal(signum) for signum in STOPPING}
    for signum in STOPPING:
        signal.signal(signum, _noted)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, name="mnist37-signals", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        # A signal's byte is in the pipe before the end's: the watcher takes it first, and
        # then ends the process, however the body ended (ray.init's SIGTERM handler raises
        # SystemExit in the main thread).
        os.write(write_fd, b"\0")
        while watcher.is_alive():
            try:
                watcher.join()
            except BaseException:  # noqa: BLE001: another signal; the watcher ends the process
                continue
        signal.set_wakeup_fd(previous_fd)
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        os.close(read_fd)
        os.close(write_fd)
