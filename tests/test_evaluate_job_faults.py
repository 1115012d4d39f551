"""jobs/evaluate.py end to end when its folders misbehave: damaged or foreign chunks are decoded
again (one log line each) and change no figure; a full chunk store or a read-only output folder
ends the job with one `error:` line, exit status 1, no traceback and no partial file, and the
run after it completes with the figures of an undisturbed run, reusing what was finished; a
full cache stops the archive's extraction the same way."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

import mnist37
from mnist37.shards import decode_shard
from mnist37.images import Decoding
from mnist37.sources.folder import list_split, make_shards
from tests.conftest import make_image_folder
from tests.test_evaluate_job import FASTBOOK_L1, run_job
from tests.test_shards import edit_footer_counts, flip_pixels
from tests.test_storage import fill, leftovers, read_only, tmpfs

pytestmark = pytest.mark.ray  # the job, with its own local Ray

SHARD_SIZE = 16
SHARD = ("--shard-size", str(SHARD_SIZE))
COUNTS = {"train": {"3": 40, "7": 40}, "valid": {"3": 12, "7": 12}}  # 5 + 2 shards
NUM_FILES = 104


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def figures(found: dict) -> tuple:
    return found["metrics"], found["prototypes_sha256"], found["counts"], found["data"]["fingerprint"]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def undisturbed(ray_local, tmp_path_factory):
    """(data folder, its chunk folder, results) of one undisturbed run, in this process on the
    session's Ray (mnist37.evaluate runs the job's main, as the command line does)."""
    base = tmp_path_factory.mktemp("faults")
    data = make_image_folder(base / "data", COUNTS)
    ran = mnist37.evaluate(data, out=base / "out", chunk_dir=str(base / "chunks"), shard_size=SHARD_SIZE)
    return data, base / "chunks", ran.results


def test_damaged_and_foreign_chunks_are_decoded_again_with_one_line_each(undisturbed, tmp_path):
    data, reference_chunks, reference = undisturbed
    chunks = tmp_path / "chunks"
    shutil.copytree(reference_chunks, chunks)
    from mnist37.chunks import read_chunk

    damaged = {
        "train/train-16-000001.arrow": "contents do not match the checksum written with them",
        "train/train-16-000002.arrow": "contents do not match the checksum written with them",
        "train/train-16-000003.arrow": "written from other files",
        "valid/valid-16-000000.arrow": "not an Arrow IPC file",
    }
    paths = {name: chunks / name for name in damaged}
    pixels = paths["train/train-16-000002.arrow"]
    flip_pixels(pixels, read_chunk(pixels).images.copy(), 300)
    edit_footer_counts(paths["train/train-16-000001.arrow"])  # [16, 0]: unlike [8, 8], not also the image shape
    other = make_image_folder(tmp_path / "other", COUNTS, seed=1)  # another data set, same layout
    foreign = make_shards(list_split(other, "train", ["3", "7"]), 16)[3]
    os.replace(decode_shard(foreign, other, tmp_path / "other-chunks", Decoding((8, 8)), with_sums=True).chunk_path,
               paths["train/train-16-000003.arrow"])
    truncated = paths["valid/valid-16-000000.arrow"]
    truncated.write_bytes(truncated.read_bytes()[:truncated.stat().st_size - 100])

    run = run_job("--data", str(data), "--out", str(tmp_path / "out"), "--chunk-dir", str(chunks), *SHARD)
    assert run.returncode == 0, run.stderr
    for name, reason in damaged.items():
        lines = [line for line in run.stderr.splitlines() if name in line]
        assert len(lines) == 1 and reason in lines[0] and lines[0].endswith("; decoded again"), (name, lines)
    assert "Traceback" not in run.stderr
    again = results(tmp_path / "out")
    assert figures(again) == figures(reference)
    assert again["shards"]["files_reused"] == NUM_FILES - 4 * 16
    assert {f"{s['split']}/{s['split']}-16-{s['index']:06d}.arrow" for s in again["shards"]["per_shard"]
            if not s["reused"]} == set(damaged)


def test_the_issues_case_inverted_bytes_in_an_mnist_sample_chunk(sample_run, mnist_sample_tgz, cache_dir, tmp_path):
    """2,000 inverted bytes in the middle of valid-8192-000000.arrow once gave l1 mean 0.9501.

    The first run is the session's run on mnist_sample (the same job, the same arguments but
    its chunk folder): a copy of its chunk folder is damaged here."""
    _, _, first = sample_run
    shutil.copytree(first["shards"]["chunk_dir"], tmp_path / "chunks")
    argv = ("--data", str(mnist_sample_tgz), "--cache-dir", str(cache_dir), "--chunk-dir", str(tmp_path / "chunks"))
    chunk = tmp_path / "chunks" / "valid" / "valid-8192-000000.arrow"
    data = bytearray(chunk.read_bytes())
    middle = len(data) // 2
    data[middle - 1000:middle + 1000] = bytes(b ^ 0xFF for b in data[middle - 1000:middle + 1000])
    chunk.write_bytes(data)
    run = run_job(*argv, "--out", str(tmp_path / "again"))
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if "valid-8192-000000.arrow" in line]
    assert len(lines) == 1 and f"{chunk}: contents do not match the checksum written with them" in lines[0]
    again = results(tmp_path / "again")
    assert round(again["metrics"]["l1"]["mean_class_accuracy"], 4) == FASTBOOK_L1["mean"]
    assert figures(again) == figures(first)
    assert again["shards"]["files_reused"] == 6131 + 6265  # the training chunks


def test_a_full_chunk_store_is_one_line_and_the_next_run_reuses_what_was_written(undisturbed, tmp_path):
    data, _, reference = undisturbed
    with tmpfs(tmp_path / "store", "256k") as store:
        # Room for the 4 folder listings (a page each) and 3 of the 7 chunks (2 pages each): with
        # two tasks writing at once, at least two chunks fit before a write finds no space.
        filler = fill(store, leave_bytes=10 * 4096)
        argv = ("--data", str(data), "--chunk-dir", str(store / "chunks"), *SHARD)
        run = run_job(*argv, "--out", str(tmp_path / "out"))
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
        assert len(error_lines(run.stderr)) == 1, run.stderr
        (line,) = error_lines(run.stderr)
        assert re.fullmatch(rf"error: chunk store {store}/chunks: no space left on device \(ENOSPC\) "
                            r"while writing (train|valid)/(train|valid)-16-00000\d\.arrow", line), line
        assert leftovers(store) == [] and not (tmp_path / "out").exists()
        kept = list((store / "chunks").glob("*/*.arrow"))
        assert kept, "no chunk fitted: the test's room is too small to show reuse"
        filler.unlink()  # space freed
        # the next run, in this process on the session's Ray (`undisturbed`'s: mnist37.evaluate)
        again = mnist37.evaluate(data, out=tmp_path / "out", chunk_dir=str(store / "chunks"), shard_size=SHARD_SIZE).results
        assert figures(again) == figures(reference)
        reused = {f"{s['split']}-16-{s['index']:06d}.arrow" for s in again["shards"]["per_shard"] if s["reused"]}
        assert reused == {p.name for p in kept}


def test_a_read_only_output_folder_is_one_line_and_the_next_run_writes_it(undisturbed, tmp_path):
    data, reference_chunks, reference = undisturbed
    chunks = tmp_path / "chunks"
    shutil.copytree(reference_chunks, chunks)
    with tmpfs(tmp_path / "out") as out:
        read_only(out)
        argv = ("--data", str(data), "--out", str(out / "run"), "--chunk-dir", str(chunks), *SHARD)
        run = run_job(*argv)
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
        assert error_lines(run.stderr) == [
            f"error: output folder {out / 'run'}: read-only file system (EROFS) while creating it"]
        assert "connecting to Ray" not in run.stderr  # refused before Ray started, not after the evaluation
        read_only(out, on=False)
        # the next run, in this process on the session's Ray (`undisturbed`'s: mnist37.evaluate)
        again = mnist37.evaluate(data, out=out / "run", chunk_dir=str(chunks), shard_size=SHARD_SIZE).results
        assert figures(again) == figures(reference) and again["shards"]["files_reused"] == NUM_FILES
        assert leftovers(out) == []


def test_a_full_cache_is_one_line_and_the_next_run_extracts_and_completes(undisturbed, tmp_path):
    data, _, reference = undisturbed
    archive = tmp_path / "data.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(data, arcname="data")
    with tmpfs(tmp_path / "cache", "256k") as cache:  # the 104 images alone need ~420 KiB here
        argv = ("--data", str(archive), "--out", str(tmp_path / "out"), "--cache-dir", str(cache), *SHARD)
        run = run_job(*argv)
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
        (line,) = error_lines(run.stderr)
        assert re.fullmatch(rf"error: cache {cache}: no space left on device \(ENOSPC\) while extracting "
                            r"data.tgz into extracted/data-[0-9a-f]{16}", line), line
        assert os.listdir(cache / "extracted") == []
        subprocess.run(["mount", "-o", "remount,size=4m", str(cache)], check=True)  # room made
        # the next run, in this process on the session's Ray (`undisturbed`'s: mnist37.evaluate)
        again = mnist37.evaluate(archive, out=tmp_path / "out", cache_dir=str(cache), shard_size=SHARD_SIZE).results
        assert (again["metrics"], again["prototypes_sha256"], again["counts"]) == \
            (reference["metrics"], reference["prototypes_sha256"], reference["counts"])
