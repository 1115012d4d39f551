"""Temporaries of killed writers are cleaned at the start of a run; a running writer's never are.

Writers here are real processes: one is killed with SIGKILL while it holds its temporary, one
keeps holding it while the cleaning runs."""

import subprocess
import sys
import textwrap

import pytest

from mnist37.storage import partials
from mnist37.sources.archive import extract
from mnist37.config import load
from mnist37.plan import plan
from mnist37.locate import locate
from tests.conftest import PROJECT_ROOT, make_image_folder

WRITER = textwrap.dedent("""
    import sys
    from mnist37.storage.partials import claimed
    with claimed(sys.argv[1]):
        open(sys.argv[1], "wb").write(b"half a chunk")
        print("holding", flush=True)
        sys.stdin.readline()  # holds the temporary until told, or until killed
""")


def writer(path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=PROJECT_ROOT, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert process.stdout.readline() == "holding\n"
    return process


def test_a_killed_writers_temporary_is_removed_a_running_writers_is_kept(tmp_path):
    killed, running = tmp_path / ".a.arrow.1.partial", tmp_path / ".b.arrow.2.partial"
    victim, alive = writer(killed), writer(running)
    try:
        victim.kill()
        victim.wait()
        assert killed.exists()  # what a killed writer leaves
        assert partials.clean(tmp_path) == 1
        assert not killed.exists() and running.read_bytes() == b"half a chunk"
    finally:
        alive.communicate("done\n", timeout=30)
    assert partials.clean(tmp_path) == 1 and not running.exists()  # its writer has gone since


def test_a_run_cleans_its_chunk_folder_and_listings(tmp_path):
    data = make_image_folder(tmp_path / "data", {"train": {"3": 3, "7": 3}, "valid": {"3": 2, "7": 2}})
    chunks = tmp_path / "chunks"
    left = [chunks / "train" / ".train-4-000000.arrow.77.partial", chunks / ".listings" / ".abc.npz.78.partial"]
    for path in left:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"torn")
    (chunks / "train" / "keep.txt").write_text("not a temporary")
    (chunks / "valid").mkdir()
    alive = writer(chunks / "valid" / ".valid-4-000000.arrow.79.partial")
    try:
        plan(locate(load(data=str(data), chunk_dir=str(chunks), shard_size=4)))
        assert not any(path.exists() for path in left)
        assert (chunks / "train" / "keep.txt").exists()
        assert (chunks / "valid" / ".valid-4-000000.arrow.79.partial").exists()  # its writer still runs
    finally:
        alive.communicate("done\n", timeout=30)


def test_an_extraction_killed_part_way_is_cleared_by_the_next(tmp_path):
    import tarfile

    folder = make_image_folder(tmp_path / "src", {"train": {"3": 2, "7": 2}})
    archive = tmp_path / "ds.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="ds")
    target = extract(archive, tmp_path / "cache")
    stale = target.parent / f".{target.name}.4242-dead1234.partial"
    (stale / "ds" / "train").mkdir(parents=True)  # a staging folder whose extractor was killed
    target.rename(target.with_name(target.name + "-moved"))  # force a fresh extraction
    assert extract(archive, tmp_path / "cache") == target and not stale.exists()


@pytest.mark.parametrize("name", ["x.arrow", "listing.npz", "mnist_sample-0123[4]"])
def test_temporary_names_carry_the_writer_and_are_unique(tmp_path, name):
    import os
    import re

    names = {partials.partial_name(name) for _ in range(100)}
    assert len(names) == 100  # threads of one process writing the same file never share a temporary
    assert all(re.fullmatch(rf"\.{re.escape(name)}\.{os.getpid()}-[0-9a-f]{{8}}\.partial", n) for n in names)
    for n in [*names, f".{name}.x.1-abcdabcd.partial", f".{name}-other.1-abcdabcd.partial"]:
        (tmp_path / n).touch()
    assert sorted(p.name for p in tmp_path.glob(partials.partials_of(name))) == sorted(names)
