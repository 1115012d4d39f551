"""Full and read-only folders on a real filesystem (a small tmpfs, mounted as root): the chunk
store, the cache and the output folder each fail with one StorageError line naming the folder,
what was being written and the errno, and leave no partial file; freeing space is enough."""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mnist37.storage import locations
from mnist37.on_ray import tasks
from mnist37.sources.archive import extract
from mnist37.images import Decoding
from mnist37.chunks import chunk_table, write_chunk
from mnist37.sources.folder import list_split
from mnist37.report import write_outputs
from mnist37.sources.folder import make_shards
from mnist37.steps import DecodeRequest
from mnist37.storage.writes import StorageError, publish, publish_folder
from tests.conftest import make_image_folder


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = "1m") -> Iterator[Path]:
    """A real filesystem of `size` at `folder`, unmounted afterwards; skips where it cannot mount."""
    folder.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mount.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path, leave_bytes: int = 0) -> Path:
    """Take all but `leave_bytes` of the filesystem's free space with one file; remove it to free."""
    filler = folder / "filler"
    stat = os.statvfs(folder)
    with open(filler, "wb") as f:
        with contextlib.suppress(OSError):
            f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave_bytes))
    return filler


def read_only(folder: Path, on: bool = True) -> None:
    subprocess.run(["mount", "-o", f"remount,{'ro' if on else 'rw'}", str(folder)], check=True)


def leftovers(folder: Path) -> list[str]:
    """Partial files and extraction staging folders under `folder`."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if "partial" in p.name or p.name.startswith(".tiny-"))


def sample_table():
    images = np.random.default_rng(0).integers(0, 256, (4000, 28, 28), dtype=np.uint8)  # ~3 MB
    return chunk_table(images, [0] * 4000, [f"train/3/{i}.png" for i in range(4000)], ["3", "7"], "train")


@pytest.mark.parametrize("uri", [False, True])
def test_a_full_chunk_store_names_itself_the_chunk_and_the_errno(tmp_path, uri):
    with tmpfs(tmp_path / "store") as store:
        root = store.as_uri() if uri else str(store)
        with pytest.raises(StorageError) as error:
            write_chunk(f"{root}/train/train-4000-000000.arrow", sample_table(), store=root)
        assert str(error.value) == (f"chunk store {root}: no space left on device (ENOSPC) "
                                    "while writing train/train-4000-000000.arrow")
        assert leftovers(store) == [] and os.listdir(store / "train") == []


def test_a_read_only_chunk_store_names_the_errno(tmp_path):
    with tmpfs(tmp_path / "store") as store:
        read_only(store)
        with pytest.raises(StorageError, match=rf"^chunk store {store}: read-only file system \(EROFS\) "
                                               r"while writing valid/x.arrow$"):
            write_chunk(f"{store}/valid/x.arrow", sample_table(), store=store)


def test_a_full_store_under_ray_tasks_arrives_as_the_one_line(ray_local, image_folder, tmp_path):
    """The task raises StorageError; Ray wraps it; bounded_map gives back the StorageError itself."""
    shards = make_shards(list_split(image_folder, "train", ["3", "7"]), 16)
    with tmpfs(tmp_path / "store", "64k") as store:
        fill(store, leave_bytes=8192)
        with pytest.raises(StorageError) as error:
            list(tasks.decode_shards([DecodeRequest(s, str(image_folder), str(store), Decoding((8, 8)), True, None,
                                                         locations.store()) for s in shards], None, 2))
        assert type(error.value) is StorageError
        message = str(error.value)
        assert message.startswith(f"chunk store {store}: no space left on device (ENOSPC) "
                                  "while writing train/train-16-")
        assert "\n" not in message
        # The tasks still running when the first one failed ran to their end before the error
        # came back (none cancelled): each removed its own temporary, or renamed it into place.
        assert leftovers(store) == []


@pytest.fixture
def tiny_tgz(tmp_path) -> Path:
    """A .tgz of 300 small PNGs: ~1.2 MB extracted on tmpfs (a 4 KiB page per file)."""
    data = make_image_folder(tmp_path / "tiny", {"train": {"3": 150, "7": 150}})
    path = tmp_path / "tiny.tgz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(data, arcname="tiny")
    return path


def test_a_full_cache_is_not_a_damaged_archive(tmp_path, tiny_tgz):
    with tmpfs(tmp_path / "cache", "512k") as cache:
        with pytest.raises(StorageError, match=rf"^cache {cache}: no space left on device \(ENOSPC\) while "
                                               r"extracting tiny.tgz into extracted/tiny-[0-9a-f]{16}$"):
            extract(tiny_tgz, cache)
        assert os.listdir(cache / "extracted") == []  # the staging folder is gone
        subprocess.run(["mount", "-o", "remount,size=4m", str(cache)], check=True)  # space freed
        assert len(list((extract(tiny_tgz, cache) / "tiny" / "train" / "7").iterdir())) == 150


def test_a_read_only_cache_names_the_errno(tmp_path, tiny_tgz):
    with tmpfs(tmp_path / "cache") as cache:
        read_only(cache)
        with pytest.raises(StorageError, match=rf"^cache {cache}: read-only file system \(EROFS\) while extracting"):
            extract(tiny_tgz, cache)


def results_of(prototypes):
    config = {"eval_split": "valid"}
    metric = {"per_class": {"3": 1.0, "7": 0.5}, "mean_class_accuracy": 0.75, "overall_accuracy": 0.75,
              "confusion": [[2, 0], [1, 1]]}
    return {"classes": ["3", "7"], "config": config, "counts": {"valid": {"3": 2, "7": 2}},
            "files": {"valid": {c: {"found": 2, "used": 2, "rejected": 0, "ignored": 0} for c in "37"}},
            "metrics": {"l1": metric}, "rejected": [], "data": {"source": "x", "root": "x", "fingerprint": "f"},
            "shards": {"count": {"valid": 1}, "shard_size": 4, "files_reused": 0, "transport": "filesystem"},
            "ray": {"nodes": []}, "elapsed_s": {"total": 1.0}, "examples": {},
            "prototypes_sha256": hashlib.sha256(prototypes.tobytes()).hexdigest()}


@pytest.mark.parametrize("how", ["full", "read-only"])
def test_an_output_folder_that_refuses_writes_keeps_what_was_there(tmp_path, how):
    prototypes = np.random.default_rng(0).random((2, 8, 8), dtype=np.float32)
    with tmpfs(tmp_path / "out", "256k") as out:
        write_outputs(out, results_of(prototypes), prototypes)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        filler = None
        if how == "full":
            filler = fill(out)
        else:
            read_only(out)
        changed = results_of(prototypes * 0.5)
        with pytest.raises(StorageError) as error:
            write_outputs(out, changed, prototypes * 0.5)
        errno_name = "ENOSPC" if how == "full" else "EROFS"
        assert str(error.value).startswith(f"output folder {out}: ")
        assert f"({errno_name}) while writing " in str(error.value)
        assert leftovers(out) == []
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "filler"} == before
        if filler:
            filler.unlink()
        else:
            read_only(out, on=False)
        write_outputs(out, changed, prototypes * 0.5)
        assert json.loads((out / "results.json").read_text())["prototypes_sha256"] != \
            json.loads(before["results.json"])["prototypes_sha256"]
        np.testing.assert_array_equal(np.load(io.BytesIO((out / "prototypes.npy").read_bytes())), prototypes * 0.5)


@pytest.fixture
def disk_events(monkeypatch) -> list[tuple[str, str]]:
    """Every os.fsync (of the real file or folder its descriptor names), os.sync, and os.replace
    or os.rename (Path.rename's too), in order, as they happen: the calls still run."""
    events: list[tuple[str, str]] = []
    fsync, sync, replace, rename = os.fsync, os.sync, os.replace, os.rename

    def recorded_sync():
        events.append(("sync", ""))
        return sync()

    def recorded_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def recorded(call):
        def moved(source, destination, *args, **kwargs):
            events.append(("replace", f"{os.fspath(source)} -> {os.fspath(destination)}"))
            return call(source, destination, *args, **kwargs)
        return moved

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "sync", recorded_sync)
    monkeypatch.setattr(os, "replace", recorded(replace))
    monkeypatch.setattr(os, "rename", recorded(rename))
    return events


def assert_flushed_then_published(events: list[tuple[str, str]], final: Path) -> None:
    """The temporary of `final`, beside it, was flushed to disk (a file fsync'd; a folder, with
    all it holds, by os.sync), renamed onto it, and then its folder fsync'd."""
    (renamed,) = [i for i, (kind, what) in enumerate(events) if kind == "replace" and what.endswith(f" -> {final}")]
    temporary = events[renamed][1].split(" -> ")[0]
    assert Path(temporary).parent == final.parent and Path(temporary).name.endswith(".partial"), temporary
    assert (("sync", "") if final.is_dir() else ("fsync", temporary)) in events[:renamed], events
    assert ("fsync", str(final.parent)) in events[renamed + 1:], events


def test_a_chunk_is_on_disk_before_it_is_published(tmp_path, disk_events):
    path = tmp_path / "chunks" / "train" / "train-4000-000000.arrow"
    size = write_chunk(path, sample_table(), store=tmp_path / "chunks")
    assert size == path.stat().st_size
    assert_flushed_then_published(disk_events, path)


def test_outputs_are_on_disk_before_they_are_published(tmp_path, disk_events):
    prototypes = np.random.default_rng(0).random((2, 8, 8), dtype=np.float32)
    write_outputs(tmp_path / "out", results_of(prototypes), prototypes)
    for name in ("results.json", "table.txt", "prototypes.npy"):
        assert_flushed_then_published(disk_events, tmp_path / "out" / name)
    published = [what.split(" -> ")[1] for kind, what in disk_events if kind == "replace"]
    assert published[-1] == str(tmp_path / "out" / "results.json")  # last, once the others are on disk


def test_a_kept_listing_is_published_whole_but_not_flushed(tmp_path, disk_events, monkeypatch):
    """A kept listing is a cache its reader checks (tests/test_folder.py: a damaged one is
    listed again), so it is renamed into place from its temporary, as every file is, but
    neither it nor its folder is flushed to disk (2,000 of them: 2.3-2.4 s with the flushes,
    0.6-1.0 s without)."""
    from mnist37.sources import folder as folder_module

    monkeypatch.setattr(folder_module, "SETTLED_S", 0.0)  # keep the listing of a folder just written
    data = make_image_folder(tmp_path / "data", {"train": {"3": 3}})
    reuse = tmp_path / "chunks" / ".listings"
    names, _, reused, not_kept = folder_module._image_names(os.fsencode(data / "train" / "3"), reuse)
    assert len(names) == 3 and not reused and not_kept == ""
    (kept,) = reuse.iterdir()
    (renamed,) = [what for kind, what in disk_events if kind == "replace" and what.endswith(f" -> {kept}")]
    assert renamed.split(" -> ")[0].endswith(".partial")
    assert [kind for kind, _ in disk_events] == ["replace"], disk_events


# Every writer publishes through mnist37.storage.writes: outside the storage package no module
# moves a file into place or makes a temporary of its own for a final file.
PACKAGE = Path(__file__).resolve().parent.parent / "mnist37"
MOVES = {"os.replace", "os.rename", "os.renames", "shutil.move", "tempfile.mkstemp", "tempfile.NamedTemporaryFile"}
TEMPORARY_NAMES = {"partial_name", "claimed"}  # the storage layer's own temporaries
TEMPORARY_WORDS = (".partial", ".tmp")


def own_publishing(source: str) -> list[str]:
    """What in `source` moves a file into place or makes a temporary for one, by line:
    os.replace/os.rename/shutil.move, any `x.rename(y)` or `x.replace(y)` (a Path's),
    tempfile's named temporaries (and `mkdtemp(dir=...)`, a temporary beside a target), the
    storage layer's temporary names, and a name spelled with `.partial` or `.tmp`."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            call = f"{ast.unparse(node.func.value)}.{node.func.attr}"
            path_move = node.func.attr in {"rename", "replace"} and len(node.args) == 1 and not node.keywords
            beside = call == "tempfile.mkdtemp" and any(k.arg == "dir" for k in node.keywords)
            if call in MOVES or beside or (path_move and not call.startswith("dataclasses.")):
                found.append(f"{node.lineno}: {call}()")
        elif isinstance(node, ast.Name | ast.Attribute | ast.alias):
            name = {ast.Name: "id", ast.Attribute: "attr", ast.alias: "name"}[type(node)]
            if getattr(node, name) in TEMPORARY_NAMES:
                found.append(f"{getattr(node, 'lineno', '?')}: {getattr(node, name)}")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
              and any(word in node.value for word in TEMPORARY_WORDS)):
            found.append(f"{node.lineno}: {node.value!r}")
    return found


def test_no_module_outside_storage_publishes_a_file_its_own_way():
    offenders = {str(path.relative_to(PACKAGE)): found for path in sorted(PACKAGE.rglob("*.py"))
                 if "storage" not in path.relative_to(PACKAGE).parts and (found := own_publishing(path.read_text()))}
    assert offenders == {}


@pytest.mark.parametrize("line", [
    "os.replace(temp, out)", "os.rename(a, b)", "staging.rename(target)", "Path(a).replace(b)", "shutil.move(a, b)",
    "tempfile.mkdtemp(prefix='.x-', dir=target.parent)", "tempfile.NamedTemporaryFile(delete=False)",
    "partial = final.with_name(partials.partial_name(final.name))", "from mnist37.storage.partials import claimed",
    "temp = dest / f'.{name}.partial'"])
def test_the_check_sees_each_way_of_publishing_alone(line):
    assert own_publishing(line) != []


@pytest.mark.parametrize("line", ["text.replace('a', 'b')", "dataclasses.replace(done, examples={})",
                                  "tempfile.mkdtemp(prefix='mnist37-')", "publish(out / name, write)"])
def test_the_check_leaves_other_calls_alone(line):
    assert own_publishing(line) == []


def test_a_folder_published_first_by_another_writer_stays_as_it_is(tmp_path):
    target = tmp_path / "x"
    with pytest.raises(FileExistsError, match=rf"already published by another writer: '{re.escape(str(target))}'"):
        with publish_folder(target) as staging:
            (staging / "mine").write_text("mine")
            target.mkdir()
            (target / "theirs").write_text("theirs")
    assert os.listdir(tmp_path) == ["x"] and os.listdir(target) == ["theirs"]


@pytest.mark.parametrize("folder", [False, True])
def test_a_failed_write_publishes_nothing_and_leaves_no_temporary(tmp_path, folder):
    def half(f):
        f.write(b"half")
        raise ValueError("cut short")

    with pytest.raises(ValueError, match="cut short"):
        if folder:
            with publish_folder(tmp_path / "x") as staging:
                half(open(staging / "a", "wb"))
        else:
            publish(tmp_path / "x", half)
    assert os.listdir(tmp_path) == []
