"""Freed shard buffers are kept for the next shard (mnist37.memory), in a process of its own."""

import subprocess
import sys

from tests.conftest import PROJECT_ROOT

# A shard's worth of buffers, allocated and freed 10 times: page faults per round.
_ROUNDS = """
import resource, sys
import numpy as np
from mnist37.memory import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory() and reuse_freed_memory()  # once per process, then cached
def shard():
    buffers = [np.ones(n, dtype=np.uint8) for n in (2 << 20, 6_600_000, 6_600_000, 6_400_000)]
    del buffers
shard()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    shard()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 10)
"""


def faults_per_round(mode: str) -> int:
    run = subprocess.run([sys.executable, "-c", _ROUNDS, mode], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return int(run.stdout)


def test_freed_shard_buffers_are_reused_not_faulted_in_again():
    # glibc by default gives much of these ~21 MB back to the kernel at each round's end, to
    # be faulted in again (~1,700 page faults a round here); kept, a round touches no new page.
    assert faults_per_round("default") > 1000
    assert faults_per_round("reuse") < 100
