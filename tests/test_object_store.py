"""Data and results in an object store: a real S3-compatible server (moto) on 127.0.0.1, the
job reading an ImageFolder from it and writing its outputs to it, a fault proxy in front of
it, and the store's refusals (no bucket, no such prefix, access denied) as one line each."""

import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

import mnist37
from mnist37.sources.folder import list_class_folder
from mnist37.chunks import chunk_table, read_chunk, write_chunk
from mnist37.storage.objects import read_objects
from mnist37.storage.writes import publish

from tests.conftest import PROJECT_ROOT, make_image_folder, shared_ray_address
from tests.s3server import FaultProxy, aws_env, serving
from tests.test_evaluate_job import run_job

BUCKET = "mnist37-test"
COUNTS = {"train": {"3": 12, "7": 10}, "valid": {"3": 6, "7": 7}}
# What must agree between a run from the store and one from disk.
FIGURES = ("counts", "files", "rejected", "metrics", "prototypes_sha256", "classes", "image_shape")


@pytest.fixture(scope="module")
def s3():
    """The server, with this process's AWS variables pointed at it (and nowhere else)."""
    with serving(BUCKET) as server:
        yield server


@pytest.fixture(scope="module")
def s3_ray(s3):
    """The Ray the jobs that read or write the store join: the session's, whose nodes hold the
    test server's credentials but not its endpoint (tests/conftest.py: ray_env); each job
    brings the endpoint in its driver's environment (this process's, pointed at the server),
    and its tasks read the store the driver read."""
    return shared_ray_address()


@pytest.fixture(scope="module")
def stored_folder(s3, tmp_path_factory):
    """A tiny ImageFolder on disk and the same files at s3://BUCKET/sample."""
    root = make_image_folder(tmp_path_factory.mktemp("data") / "sample", COUNTS)
    (root / "train" / "3" / "labels.csv").write_text("not an image\n")
    s3.upload(root, BUCKET, "sample")
    return root, f"s3://{BUCKET}/sample"


@pytest.fixture(scope="module")
def stored_archive(s3, stored_folder, tmp_path_factory):
    """stored_folder as a .tgz on disk and the same archive at s3://BUCKET/archives/sample.tgz."""
    root, _ = stored_folder
    path = tmp_path_factory.mktemp("archive") / "sample.tgz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(root, arcname="sample")
    s3.client().upload_file(str(path), BUCKET, "archives/sample.tgz")
    return path, f"s3://{BUCKET}/archives/sample.tgz"


@pytest.fixture(scope="module")
def on_disk(ray_local, stored_folder, tmp_path_factory):
    """The job over stored_folder's files on disk, once a module, in this process on the
    session's Ray (mnist37.evaluate): (its --out folder, its results), the figures every run
    from the store must give."""
    root, _ = stored_folder
    out = tmp_path_factory.mktemp("on-disk")
    return out / "out", mnist37.evaluate(root, out=out / "out", cache_dir=str(out / "cache")).results


def figures(results: dict) -> dict:
    return {key: results[key] for key in FIGURES} | {"fingerprint": results["data"]["fingerprint"]}


def read_json(s3, key: str) -> dict:
    return json.loads(s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())


@pytest.mark.ray
def test_an_archive_object_gives_the_figures_of_the_archive_on_disk(s3, s3_ray, ray_local, stored_archive, tmp_path):
    path, uri = stored_archive
    env = aws_env(s3.endpoint)
    mnist37.evaluate(path, out=tmp_path / "local", cache_dir=str(tmp_path / "c1"))  # in this process
    remote = run_job("--ray-address", s3_ray, "--data", uri, "--out", str(tmp_path / "remote"),
                     "--cache-dir", str(tmp_path / "c2"), env_extra=env)
    assert remote.returncode == 0, remote.stderr
    on_disk = json.loads((tmp_path / "local" / "results.json").read_text())
    from_store = json.loads((tmp_path / "remote" / "results.json").read_text())
    assert figures(from_store) == figures(on_disk)
    fetched = list((tmp_path / "c2" / "downloads" / "objects").glob("sample-*.tgz"))
    assert len(fetched) == 1 and fetched[0].read_bytes() == path.read_bytes()
    missing = run_job("--ray-address", s3_ray, "--data", f"s3://{BUCKET}/archives/nothing.tgz", "--out",
                      str(tmp_path / "missing"), "--cache-dir", str(tmp_path / "c3"), env_extra=env)
    one_error_line(missing, f"s3://{BUCKET}/archives/nothing.tgz", "archive not found")


# A node that has not fetched the archive: the driver's extraction is removed after locate, so
# only the listing and decode tasks (worker processes) can bring it back before reading it.
_ON_ANOTHER_NODE = """
import json, shutil, sys
import ray
from mnist37.on_ray.tasks import RayExecutor, map_listings
from mnist37.config import load
from mnist37.evaluation import evaluate
from mnist37.locate import locate
from mnist37.plan import plan

cache = sys.argv[2]
located = locate(load(data=sys.argv[1], cache_dir=cache, chunk_dir=cache + "/chunks"))
extraction = located.root.parent
assert located.archive is not None and extraction.parent.name == "extracted", located.root
shutil.rmtree(extraction)
ray.init(address=sys.argv[3], configure_logging=False)
evaluation = evaluate(plan(located, map_listings), executor=RayExecutor())
print(json.dumps({"counts": {s: c.tolist() for s, c in evaluation.decoding.counts.items()},
                  "extracted_again": (located.root / "train").is_dir()}))
"""


@pytest.mark.ray
def test_tasks_extract_an_archive_object_on_their_node(s3, s3_ray, stored_archive, tmp_path):
    _, uri = stored_archive
    run = subprocess.run([sys.executable, "-c", _ON_ANOTHER_NODE, uri, str(tmp_path / "cache"), s3_ray], cwd=PROJECT_ROOT,
                         env={**os.environ, **aws_env(s3.endpoint)}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    done = json.loads(run.stdout.strip().splitlines()[-1])
    assert done == {"counts": {split: [COUNTS[split]["3"], COUNTS[split]["7"]] for split in ("train", "valid")},
                    "extracted_again": True}


def test_listing_pages_past_1000_objects(s3):
    client, names = s3.client(), [f"{i:05d}.png" for i in range(1_100)]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: client.put_object(Bucket=BUCKET, Key=f"many/train/3/{n}", Body=n.encode()), names))
    client.put_object(Bucket=BUCKET, Key="many/train/3/README.txt", Body=b"x")
    client.put_object(Bucket=BUCKET, Key="many/train/3/sub/inner.png", Body=b"x")

    summary, files = list_class_folder(f"s3://{BUCKET}/many", "train", "3")

    listed, stamps = files.names, files.stamps
    assert [n.decode() for n in listed] == names  # every page, sorted
    assert summary.count == 1_100 and summary.head.tolist() == listed[:100].tolist()
    assert summary.ignored == 2  # README.txt and the sub/ "folder"
    assert stamps.dtype == np.int64 and stamps.shape == (1_100, 2)
    assert (stamps[:, 0] == 9).all() and (stamps[:, 1] > 0).all()  # size, mtime


def test_objects_are_read_many_at_once_in_order(s3):
    client = s3.client()
    for i in range(40):
        client.put_object(Bucket=BUCKET, Key=f"read/{i}.bin", Body=bytes([i]) * (i + 1))
    names = [f"{i}.bin" for i in range(40)] + ["gone.bin"]
    got = read_objects(f"s3://{BUCKET}/read", names, requests=8)
    assert got[:40] == [bytes([i]) * (i + 1) for i in range(40)]
    assert isinstance(got[40], FileNotFoundError)  # listed, then deleted: a rejected file, not a stop


def test_an_object_is_written_whole(s3):
    assert publish(f"s3://{BUCKET}/out/x.json", lambda f: f.write(b'{"a": 1}')) == 8
    assert read_json(s3, "out/x.json") == {"a": 1}


def test_a_chunk_write_answered_503_past_the_sdks_tries_is_tried_again(s3, monkeypatch):
    """Five uploads in a row answered 503 SlowDown (the AWS SDK tries 3 times by itself): the
    chunk is written, whole, and reads back as written."""
    proxy = FaultProxy(s3.endpoint, slow_every=0, drop_every=0, slow_writes=5, writes_matching=".arrow")
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    images = np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    table = chunk_table(images, [0, 1] * 25, [f"train/{i}.png" for i in range(50)], ["3", "7"], "train")
    location = f"s3://{BUCKET}/retried/train/train-50-000000.arrow"
    try:
        size = write_chunk(location, table, store=f"s3://{BUCKET}/retried")
        chunk = read_chunk(location, table.schema.metadata[b"mnist37.checksum"].decode())
    finally:
        proxy.stop()
    assert proxy.counts["slow_writes"] == 5
    assert np.array_equal(chunk.images, images) and chunk.class_indices.tolist() == [0, 1] * 25
    assert size == s3.client().head_object(Bucket=BUCKET, Key="retried/train/train-50-000000.arrow")["ContentLength"]


@pytest.mark.ray
def test_job_from_the_store_matches_the_folder_on_disk(s3, s3_ray, ray_local, stored_folder, on_disk, tmp_path):
    _, uri = stored_folder
    local_out, on_disk = on_disk
    env = aws_env(s3.endpoint)
    remote = run_job("--ray-address", s3_ray, "--data", uri, "--out", f"s3://{BUCKET}/runs/x", "--cache-dir", str(tmp_path / "c2"),
                     env_extra=env)
    assert remote.returncode == 0, remote.stderr
    assert "list: 4/4 class folders" in remote.stderr  # the listing's progress line, both splits at once

    in_store = read_json(s3, "runs/x/results.json")
    assert figures(in_store) == figures(on_disk)
    assert in_store["files"]["train"]["3"]["ignored"] == 1  # labels.csv
    assert in_store["shards"]["files_decoded"] == sum(sum(c.values()) for c in COUNTS.values())
    stored = {o["Key"] for o in s3.client().list_objects_v2(Bucket=BUCKET, Prefix="runs/x/")["Contents"]}
    # pyarrow keeps an emptied prefix as a "runs/x/" marker when the write check's probe goes
    predictions = [f"{in_store['predictions']['location']}/{f['name']}" for f in in_store["predictions"]["files"]]
    assert predictions  # one file per evaluation chunk, written by its classify task
    assert stored - {"runs/x/"} == {f"runs/x/{name}" for name in ["results.json", *in_store["outputs"], *predictions]}
    table = s3.client().get_object(Bucket=BUCKET, Key="runs/x/table.txt")["Body"].read().decode()
    assert table == (local_out / "table.txt").read_text()

    # A warm run reuses every chunk: the listing's (size, mtime) is the reuse key, no object is
    # read. (In this process on the session's Ray: mnist37.evaluate runs the job's main.)
    mnist37.evaluate(uri, out=f"s3://{BUCKET}/runs/y", cache_dir=str(tmp_path / "c2"))
    again = read_json(s3, "runs/y/results.json")
    assert again["shards"]["files_decoded"] == 0 and figures(again) == figures(on_disk)


@pytest.mark.ray
def test_throttling_and_dropped_connections_are_retried(s3, ray_local, stored_folder, on_disk, tmp_path, monkeypatch):
    _, uri = stored_folder
    proxy = FaultProxy(s3.endpoint, slow_every=5, drop_every=7)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # the job hands it to its tasks: they read through it too
    try:
        mnist37.evaluate(uri, out=tmp_path / "out", cache_dir=str(tmp_path / "c"))  # in this process, the session's Ray
    finally:
        proxy.stop()
    assert proxy.counts["slow_down"] > 5 and proxy.counts["dropped"] > 5, proxy.counts
    assert figures(json.loads((tmp_path / "out" / "results.json").read_text())) == figures(on_disk[1])


def one_error_line(run, *words: str) -> None:
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, run.stderr
    for word in words:
        assert word in errors[0], errors[0]


@pytest.mark.ray
def test_a_missing_bucket_is_one_line(s3, tmp_path):
    run = run_job("--ray-address", "local", "--data", "s3://no-such-bucket-here/sample", "--out", str(tmp_path / "out"),
                  "--cache-dir", str(tmp_path / "c"), env_extra=aws_env(s3.endpoint))
    one_error_line(run, "s3://no-such-bucket-here", "bucket not found")


@pytest.mark.ray
def test_a_wrong_prefix_is_one_line(s3, stored_folder, tmp_path):
    run = run_job("--ray-address", "local", "--data", f"s3://{BUCKET}/no-such-prefix", "--out", str(tmp_path / "out"),
                  "--cache-dir", str(tmp_path / "c"), env_extra=aws_env(s3.endpoint))
    one_error_line(run, f"s3://{BUCKET}/no-such-prefix", "does not exist")


@pytest.mark.ray
def test_a_denied_object_stops_the_job_even_when_skipping_bad_files(s3, s3_ray, stored_folder, tmp_path):
    """A bucket policy denies one object of the evaluation split: read by a decode task, it
    stops the job (on_bad_file = skip leaves out bad image data, not refusals)."""
    root, uri = stored_folder
    denied = "sample/valid/7/" + sorted(p.name for p in (root / "valid" / "7").iterdir())[2]
    client = s3.client()
    client.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Deny", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{BUCKET}/{denied}"}]}))
    try:
        run = run_job("--ray-address", s3_ray, "--data", uri, "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"),
                      "--on-bad-file", "skip", env_extra=aws_env(s3.endpoint))
    finally:
        client.delete_bucket_policy(Bucket=BUCKET)
    one_error_line(run, f"s3://{BUCKET}/{denied}", "access denied")


@pytest.mark.ray
def test_chunks_in_the_store_are_reused(s3, ray_local, stored_folder, on_disk, tmp_path, monkeypatch):
    """No local disk at all: data, chunks and results in the store; the second run decodes
    nothing. The first run's chunk writes are answered 503 SlowDown 8 times (past the SDK's
    own tries): they are retried, change no figure, and leave no partial behind. Both runs in
    this process on the session's Ray (mnist37.evaluate), the first with its environment
    pointed at the proxy: the job hands that endpoint to its tasks."""
    _, uri = stored_folder
    chunks = f"s3://{BUCKET}/chunks"
    proxy = FaultProxy(s3.endpoint, slow_every=0, drop_every=0, slow_writes=8, writes_matching=".arrow")
    try:
        for i, endpoint in enumerate((proxy.endpoint, s3.endpoint)):
            monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
            mnist37.evaluate(uri, chunk_dir=chunks, out=f"s3://{BUCKET}/runs/chunks{i}", cache_dir=str(tmp_path / f"c{i}"))
    finally:
        proxy.stop()
    assert proxy.counts["slow_writes"] == 8, proxy.counts
    first, second = (read_json(s3, f"runs/chunks{i}/results.json") for i in range(2))
    assert first["shards"]["files_reused"] == 0 and figures(first) == figures(on_disk[1])
    assert second["shards"]["files_decoded"] == 0 and figures(second) == figures(first)
    listed = s3.client().list_objects_v2(Bucket=BUCKET, Prefix="chunks/")["Contents"]
    # pyarrow's create_dir leaves empty "folder/" marker objects; beside them, the chunks and no partials
    assert sorted(o["Key"] for o in listed if not o["Key"].endswith("/")) == [f"chunks/{s}/{s}-{n}-000000.arrow" for s, n in
                                                (("train", first["config"]["shard_size"]),
                                                 ("valid", first["config"]["shard_size"]))]


@pytest.mark.ray
def test_chunk_writes_refused_for_good_are_one_line(s3, s3_ray, stored_folder, tmp_path):
    _, uri = stored_folder
    proxy = FaultProxy(s3.endpoint, slow_every=0, drop_every=0, slow_writes=10**9, writes_matching=".arrow")
    try:
        run = run_job("--ray-address", s3_ray, "--data", uri, "--chunk-dir", f"s3://{BUCKET}/chunks-refused",
                      "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"), "--store-timeout-s", "1",
                      env_extra=aws_env(proxy.endpoint))
    finally:
        proxy.stop()
    one_error_line(run, f"s3://{BUCKET}/chunks-refused/", ".arrow: still failing after", "SLOW_DOWN")
    assert not (tmp_path / "out" / "results.json").exists()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("flag, location, endpoint, words", [
    ("--out", "s3://Bad_Bucket!/x", None, "bucket not found"),
    ("--chunk-dir", "s3://Bad_Bucket!/chunks", None, "bucket not found"),
    ("--out", f"s3://{BUCKET}/runs/unreachable", "closed", "Could not connect"),
], ids=["bad bucket name", "bad chunk store bucket", "unreachable endpoint"])
def test_outputs_that_cannot_be_written_are_refused_before_ray_starts(s3, stored_folder, tmp_path, flag, location,
                                                                      endpoint, words):
    root, _ = stored_folder
    argv = {"--out": str(tmp_path / "out"), "--chunk-dir": str(tmp_path / "chunks"), flag: location}
    endpoint = f"http://127.0.0.1:{_closed_port()}" if endpoint == "closed" else s3.endpoint
    run = run_job("--ray-address", "local", "--data", str(root), *(x for item in argv.items() for x in item),
                  "--store-timeout-s", "1", env_extra=aws_env(endpoint))
    kind = "output folder" if flag == "--out" else "chunk store"
    one_error_line(run, f"error: {kind} {location}: ", words, "while checking it can be written")
    assert "connecting to Ray" not in run.stderr  # the line before ray.init: Ray never started
