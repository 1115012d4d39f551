"""Child processes for timing and memory figures."""

from __future__ import annotations


def fresh_process(argv: list[str]) -> list[str]:
    """`argv` started by a shell that forks it: a process forked from this one inherits this
    process's peak RSS as its own (Linux keeps the peak across fork and exec), so a child's
    `ru_maxrss` would never read lower than the benchmark's own."""
    return ["sh", "-c", '"$@"; exit $?', "sh", *argv]
