"""Container formats in an object store: Parquet, WebDataset tar shards and IDX (plain and .gz)
uploaded to a real S3-compatible server on 127.0.0.1 (moto) read as the same files on disk
are, bad records included; a warm run reuses every chunk; the store's refusals are one line."""

from __future__ import annotations

import json

import pytest

import mnist37
from mnist37.sources import container_root, detect
from mnist37.sources.base import FormatError, iter_records
from mnist37.locate import locate
from mnist37.config import load
from mnist37.plan import plan

from tests.conftest import make_image_folder, shared_ray_address
from tests.s3server import FaultProxy, aws_env, serving
from tests.test_bad_records import parquet_corpus, webdataset_corpus
from tests.test_evaluate_job import run_job
from tests.test_formats import write_idx
from tests.test_object_store import FIGURES, one_error_line

BUCKET = "mnist37-formats"


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


def idx_corpus(clean, root):
    """IDX with the training split gzipped and the validation split plain: both readers."""
    write_idx(clean, root, ["3", "7", "9"], [3, 7, 9], gz=True, splits=("train",))
    write_idx(clean, root, ["3", "7", "9"], [3, 7, 9], gz=False, splits=("valid",))
    return root, {}, 0


CORPORA = {"parquet": parquet_corpus, "webdataset": webdataset_corpus, "idx": idx_corpus}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("png"), {"train": {"3": 20, "7": 20, "9": 5},
                                                               "valid": {"3": 8, "7": 8, "9": 2}})


@pytest.fixture(scope="module")
def stored(s3, clean, tmp_path_factory):
    """format -> (folder on disk, the same files at s3://BUCKET/<format>, {record: (reason, class)})."""
    stored = {}
    for fmt, corpus in CORPORA.items():
        data, bad, _ = corpus(clean, tmp_path_factory.mktemp("corpora") / fmt)
        s3.upload(data, BUCKET, fmt)
        stored[fmt] = data, f"s3://{BUCKET}/{fmt}", bad
    return stored


def figures(results: dict) -> dict:
    return {key: results[key] for key in FIGURES} | {"fingerprint": results["data"]["fingerprint"]}


def test_detection_and_plan_from_the_store(stored, tmp_path):
    """Listing, detection and planning through pyarrow.fs give the plan the files on disk give
    (the reuse keys differ only by the objects' mtimes)."""
    for fmt, (data, uri, _) in stored.items():
        assert detect(container_root(uri)) == fmt
        on_disk, in_store = (plan(locate(load(data=str(d), classes="3 7", shard_size=7, chunk_dir=str(tmp_path / "c"))))
                             for d in (data, uri))
        assert in_store.format == fmt and in_store.root == uri
        assert (in_store.classes, in_store.shape) == (on_disk.classes, on_disk.shape)
        assert ([(s.split, s.source, s.labels_source, s.start, s.stop, s.num_records) for s in in_store.shards] ==
                [(s.split, s.source, s.labels_source, s.start, s.stop, s.num_records) for s in on_disk.shards])
        assert locate(load(data=uri, format=fmt, classes="3 7")).format == fmt  # the format key, stated
    with pytest.raises(FormatError, match=f"{stored['webdataset'][1]}: no parquet files for split 'train'; "
                                          "found splits: none"):
        locate(load(data=stored["webdataset"][1], format="parquet"))


def test_tars_read_through_throttling_and_dropped_connections(stored, s3, monkeypatch, tmp_path):
    """Every request for a tar is retried: through a proxy answering every 5th request with 503
    SlowDown, dropping every 7th connection and failing 12 requests in a row (four times what
    pyarrow's AWS SDK absorbs by itself, STORE_ATTEMPTS tries a request, so mnist37's own
    retries take over: 40 in a row proved the same in 29 s of backoff), the tars give the
    records they give on disk."""
    data, uri, _ = stored["webdataset"]
    shards = plan(locate(load(data=str(data), classes="3 7", chunk_dir=str(tmp_path / "c")))).shards
    proxy = FaultProxy(s3.endpoint, slow_every=5, drop_every=7, slow_burst=range(3, 15))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    try:
        got = [list(iter_records(shard, uri)) for shard in shards]
    finally:
        proxy.stop()
    assert got == [list(iter_records(shard, data)) for shard in shards]
    assert proxy.counts["slow_down"] + proxy.counts["dropped"] >= 12, proxy.counts


@pytest.mark.ray
@pytest.mark.parametrize("fmt", CORPORA)
def test_job_from_the_store_matches_the_files_on_disk(fmt, stored, s3, ray_local, tmp_path):
    """Skipping bad records (a truncated tar, Parquet rows without image bytes, ...): the same
    counts, accounts, rejections, metrics, prototypes, fingerprint and table.txt; then a warm run
    decodes nothing (each shard's reuse key holds its objects' size and mtime)."""
    data, uri, bad = stored[fmt]
    # In this process on the session's Ray (mnist37.evaluate runs the job's main), its
    # environment pointed at the S3 test server (`s3`): the job hands the endpoint to its tasks.
    common = {"on_bad_file": "skip", "classes": "3 7", "shard_size": 7}
    on_disk = mnist37.evaluate(data, out=tmp_path / "local", cache_dir=str(tmp_path / "c1"), **common).results
    cold, warm = (mnist37.evaluate(uri, out=tmp_path / name, cache_dir=str(tmp_path / "c2"), **common).results
                  for name in ("cold", "warm"))
    assert cold["data"]["format"] == fmt and cold["data"]["root"] == uri
    assert {r["path"]: r["reason"] for r in cold["rejected"]} == {p: reason for p, (reason, _) in bad.items()}
    assert figures(cold) == figures(on_disk)
    assert (tmp_path / "cold" / "table.txt").read_text() == (tmp_path / "local" / "table.txt").read_text()
    assert cold["shards"]["files_reused"] == 0
    assert warm["shards"]["files_decoded"] == 0 and all(s["reused"] for s in warm["shards"]["per_shard"])
    assert figures(warm) == figures(on_disk)


@pytest.mark.ray
def test_a_missing_bucket_is_one_line(s3, tmp_path):
    run = run_job("--ray-address", "local", "--data", "s3://no-such-bucket-here/wds", "--format", "webdataset",
                  "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"), env_extra=aws_env(s3.endpoint))
    one_error_line(run, "s3://no-such-bucket-here", "bucket not found")


@pytest.mark.ray
def test_a_denied_tar_stops_the_job_even_when_skipping(stored, s3, s3_ray, tmp_path):
    """A bucket policy denies one tar shard to GetObject: its decode task stops the job with one
    line naming the object (on_bad_file = skip leaves out bad records, not refusals)."""
    _, uri, _ = stored["webdataset"]
    denied = "webdataset/valid-000000.tar"
    client = s3.client()
    client.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Deny", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{BUCKET}/{denied}"}]}))
    try:
        run = run_job("--ray-address", s3_ray, "--data", uri, "--out", str(tmp_path / "out"), "--cache-dir",
                      str(tmp_path / "c"), "--on-bad-file", "skip", "--classes", "3", "7", env_extra=aws_env(s3.endpoint))
    finally:
        client.delete_bucket_policy(Bucket=BUCKET)
    one_error_line(run, f"s3://{BUCKET}/{denied}", "access denied")
