import io
import subprocess
import sys
import tarfile
import textwrap

import pytest

from mnist37.sources.archive import ArchiveError, extract
from tests.conftest import PROJECT_ROOT, make_image_folder
from tests.test_storage import assert_flushed_then_published, disk_events  # noqa: F401 (a fixture)


def make_tgz(path, folder, arcname="ds"):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return path


def add_member(tar, name, data=b"x", kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_extracts_once_and_reuses(tmp_path):
    folder = make_image_folder(tmp_path / "src", {"train": {"3": 2, "7": 2}})
    archive = make_tgz(tmp_path / "ds.tgz", folder)
    first = extract(archive, tmp_path / "cache")
    assert sorted(p.name for p in (first / "ds" / "train" / "3").iterdir()) == ["0.png", "1.png"]
    sentinel = first / "sentinel"
    sentinel.write_text("left by the first run")
    second = extract(archive, tmp_path / "cache")
    assert second == first and sentinel.exists()  # not extracted again
    assert [p.name for p in (tmp_path / "cache" / "extracted").iterdir()] == [first.name]


def test_every_extraction_has_the_members_bytes_and_modification_times(tmp_path):
    """Two caches (two nodes) extract the same archive to the same bytes and mtimes, the
    archive's own: the folder's chunk keys hold each file's (size, mtime), so chunks decoded
    from one node's extraction are reused from another's."""
    with tarfile.open(tmp_path / "ds.tar", "w") as tar:
        for i, (name, mtime) in enumerate([("ds/train/3/a.png", 1_600_000_000), ("ds/train/7/b.png", 1_700_000_123),
                                           ("ds/valid/3/big.png", 1_234_567_890)]):
            data = bytes(range(256)) * (1 + 9000 * (i == 2))  # one member over copyfileobj's 1 MiB step
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(tmp_path / "ds.tar") as tar:
        expected = {m.name: (tar.extractfile(m).read(), m.mtime) for m in tar.getmembers()}
    for cache in ("node-a", "node-b"):
        root = extract(tmp_path / "ds.tar", tmp_path / cache)
        found = {str(p.relative_to(root)): (p.read_bytes(), int(p.stat().st_mtime)) for p in root.rglob("*.png")}
        assert found == expected


def test_changed_archive_gets_its_own_folder(tmp_path):
    folder = make_image_folder(tmp_path / "src", {"train": {"3": 2, "7": 2}})
    archive = make_tgz(tmp_path / "ds.tgz", folder)
    first = extract(archive, tmp_path / "cache")
    make_image_folder(folder, {"train": {"3": 3, "7": 2}}, seed=1)
    make_tgz(archive, folder)
    second = extract(archive, tmp_path / "cache")
    assert second != first and (second / "ds" / "train" / "3" / "2.png").exists()


@pytest.mark.parametrize("name, kind, linkname, message", [
    ("../evil.png", tarfile.REGTYPE, "", r"member '../evil.png' would land outside the extraction folder"),
    ("ds/../../evil.png", tarfile.REGTYPE, "", r"member .ds/../../evil.png. would land outside the extraction folder"),
    ("/tmp/evil.png", tarfile.REGTYPE, "", r"member '/tmp/evil.png' has an absolute path"),
    ("ds/link.png", tarfile.SYMTYPE, "/etc/passwd", r"member 'ds/link.png' is a link to '/etc/passwd'"),
    ("ds/hard.png", tarfile.LNKTYPE, "ds/a.png", r"member 'ds/hard.png' is a link"),
    ("ds/fifo", tarfile.FIFOTYPE, "", r"member 'ds/fifo' is not a regular file or folder"),
])
def test_refuses_unsafe_members_and_leaves_nothing(tmp_path, name, kind, linkname, message):
    archive = tmp_path / "evil.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        add_member(tar, "ds/a.png")
        add_member(tar, name, kind=kind, linkname=linkname)
    cache = tmp_path / "cache"
    with pytest.raises(ArchiveError, match="evil.tgz: " + message):
        extract(archive, cache)
    assert list((cache / "extracted").iterdir()) == []  # no half-extracted folder to trust later
    assert not (tmp_path / "evil.png").exists()


def test_not_an_archive_and_truncated_archive(tmp_path):
    junk = tmp_path / "junk.tgz"
    junk.write_bytes(b"this is not gzip at all" * 10)
    with pytest.raises(ArchiveError, match=r"junk.tgz: not a readable .tgz/.tar archive"):
        extract(junk, tmp_path / "cache")
    folder = make_image_folder(tmp_path / "src", {"train": {"3": 20, "7": 20}})
    whole = make_tgz(tmp_path / "whole.tgz", folder).read_bytes()
    cut = tmp_path / "cut.tgz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ArchiveError, match=r"cut.tgz: not a readable .tgz/.tar archive"):
        extract(cut, tmp_path / "cache")
    assert list((tmp_path / "cache" / "extracted").iterdir()) == []


def test_missing_archive(tmp_path):
    with pytest.raises(ArchiveError, match=r"nope.tgz: archive not found"):
        extract(tmp_path / "nope.tgz", tmp_path / "cache")


def test_an_extraction_is_on_disk_before_it_is_published(tmp_path, disk_events):
    """Every extracted file and folder is fsync'd before the folder is renamed into place (a
    crash right after the rename must not leave empty files in a folder later runs trust)."""
    folder = make_image_folder(tmp_path / "src", {"train": {"3": 2, "7": 2}})
    target = extract(make_tgz(tmp_path / "ds.tgz", folder), tmp_path / "cache")
    assert_flushed_then_published(disk_events, target)


HALF_EXTRACTED = textwrap.dedent("""
    import sys
    from mnist37.sources import archive

    write = archive._write_members
    def half_then_hold(tar, members, staging):  # the real writes, then a pause to be killed in
        write(tar, members[: len(members) // 2], staging)
        print("holding", flush=True)
        sys.stdin.readline()
    archive._write_members = half_then_hold
    archive.extract(sys.argv[1], sys.argv[2])
""")


def test_an_extraction_killed_part_way_is_never_used_and_is_cleaned(tmp_path):
    folder = make_image_folder(tmp_path / "src", {"train": {"3": 6, "7": 6}})
    archive, cache = make_tgz(tmp_path / "ds.tgz", folder), tmp_path / "cache"
    killed = subprocess.Popen([sys.executable, "-c", HALF_EXTRACTED, str(archive), str(cache)], cwd=PROJECT_ROOT,
                              text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert killed.stdout.readline() == "holding\n"
    finally:
        killed.kill()
        killed.wait()
    (left,) = (cache / "extracted").iterdir()
    assert left.name.endswith(".partial") and any(left.rglob("*.png"))  # half an extraction, under a temporary
    target = extract(archive, cache)
    assert [p.name for p in (cache / "extracted").iterdir()] == [target.name]  # the killed one's is gone
    assert sorted(p.name for p in (target / "ds" / "train" / "7").iterdir()) == [f"{i}.png" for i in range(6)]
