"""mnist37.threads: work spread over a few threads within a task."""

import threading

import pytest

from mnist37 import threads


def test_run_spread_gives_every_index_once_in_interleaved_parts():
    seen, names = [], set()

    def work(indices):
        names.add(threading.current_thread().name)
        seen.extend(indices)
        return list(indices)

    parts = threads.run_spread(work, 10, 3)
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(seen) == list(range(10))
    assert all(name.startswith("mnist37-work") for name in names)
    assert threads.run_spread(work, 5, 1) == [[0, 1, 2, 3, 4]]  # one part, here


def test_run_spread_raises_a_threads_error():
    def work(indices):
        if 3 in indices:
            raise ValueError("image 3")
        return len(indices)

    with pytest.raises(ValueError, match="image 3"):
        threads.run_spread(work, 8, 2)


def test_threads_for_bounds(monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 64)
    assert threads.threads_for(10_000, 64) == threads.MAX_THREADS
    assert threads.threads_for(128, 64) == 2
    assert threads.threads_for(100, 64) == 1
    assert threads.threads_for(0, 64) == 1
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    assert threads.threads_for(10_000, 64) == 2
