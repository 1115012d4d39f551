"""Named data sets: the real download code against a real HTTP server on 127.0.0.1."""

import hashlib
import http.server
import re
import subprocess
import sys
import tarfile
import textwrap
import threading
import time

import pytest

import mnist37
from mnist37.sources import named as datasets
from mnist37.sources.named import Dataset, DownloadError, download, sha256_of
from tests.conftest import PROJECT_ROOT, make_image_folder
from tests.test_evaluate_job import run_job
from tests.test_storage import assert_flushed_then_published, disk_events  # noqa: F401 (a fixture)


class Server:
    """Serves files from a dict {path: bytes}; `cut` paths announce their full length but
    send only half and close; `held` paths send half, then the rest once `release` is set."""

    def __init__(self, files: dict[str, bytes], cut: set[str] = frozenset(), held: set[str] = frozenset()):
        self.files, self.cut, self.held, self.hits = files, cut, held, []
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                outer.hits.append(self.path)
                data = outer.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.path in outer.held:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    outer.release.wait(60)
                    data = data[len(data) // 2:]
                self.wfile.write(data[: len(data) // 2] if self.path in outer.cut else data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def archive(tmp_path):
    folder = make_image_folder(tmp_path / "src", {"train": {"3": 30, "7": 30}, "valid": {"3": 10, "7": 10}})
    path = tmp_path / "tiny.tgz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname="tiny")
    return path.read_bytes()


def checks_for(data: bytes, url: str) -> Dataset:
    return Dataset("tiny", url, len(data), hashlib.sha256(data).hexdigest(), "train", "valid", ("3", "7"))


def changed_past_first_mib(data: bytes) -> bytes:
    """`data` with one byte flipped after its first MiB: same size, same first MiB."""
    assert len(data) > (1 << 20) + 100
    at = (1 << 20) + 100
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def test_download_verifies_and_is_reused(archive, tmp_path):
    server = Server({"/d/tiny.tgz": archive})
    try:
        dataset = checks_for(archive, f"{server.url}/d/tiny.tgz")
        path = download(dataset, tmp_path / "cache")
        assert path.read_bytes() == archive and path.name == "tiny.tgz"
        assert download(dataset, tmp_path / "cache") == path and server.hits == ["/d/tiny.tgz"]  # not fetched again
    finally:
        server.close()


def test_a_truncated_response_is_not_trusted_later(archive, tmp_path):
    server = Server({"/tiny.tgz": archive}, cut={"/tiny.tgz"})
    try:
        dataset = checks_for(archive, f"{server.url}/tiny.tgz")
        with pytest.raises(DownloadError, match=r"^tiny: .*pass it with --data /path/to/tiny.tgz$"):
            download(dataset, tmp_path / "cache")
        assert list((tmp_path / "cache" / "downloads").iterdir()) == []  # no partial file left
        server.cut = set()
        assert download(dataset, tmp_path / "cache").read_bytes() == archive  # the next try starts afresh
        assert len(server.hits) == 2
    finally:
        server.close()


def test_a_download_is_on_disk_before_it_is_published(archive, tmp_path, disk_events):
    server = Server({"/tiny.tgz": archive})
    try:
        path = download(checks_for(archive, f"{server.url}/tiny.tgz"), tmp_path / "cache")
    finally:
        server.close()
    assert_flushed_then_published(disk_events, path)


DOWNLOADER = textwrap.dedent("""
    import sys
    from mnist37.sources.named import Dataset, download
    url, size, digest, cache = sys.argv[1:]
    download(Dataset("tiny", url, int(size), digest, "train", "valid", ("3", "7")), cache)
""")


def test_a_download_killed_part_way_is_never_used_and_is_cleaned(tmp_path):
    archive = bytes(range(256)) * 2048  # 512 KiB: the first half is written before the pause
    server = Server({"/tiny.tgz": archive}, held={"/tiny.tgz"})
    cache, dataset = tmp_path / "cache", checks_for(archive, f"{server.url}/tiny.tgz")
    try:
        killed = subprocess.Popen([sys.executable, "-c", DOWNLOADER, dataset.url, str(dataset.num_bytes),
                                   dataset.sha256, str(cache)], cwd=PROJECT_ROOT)
        try:
            deadline = time.monotonic() + 60  # until part of the archive is in its temporary
            while not [p for p in (cache / "downloads").glob(".tiny.tgz.*") if p.stat().st_size >= 1 << 17]:
                assert time.monotonic() < deadline and killed.poll() is None
                time.sleep(0.05)
        finally:
            killed.kill()
            killed.wait()
        (left,) = (cache / "downloads").iterdir()
        assert left.name.endswith(".partial")  # never under the final name
        server.held = set()
        assert download(dataset, cache).read_bytes() == archive
        assert [p.name for p in (cache / "downloads").iterdir()] == ["tiny.tgz"]  # the killed one's is gone
    finally:
        server.release.set()
        server.close()


def test_a_full_cache_is_not_a_failed_download(archive, tmp_path):
    from mnist37.storage.writes import StorageError
    from tests.test_storage import fill, tmpfs

    server = Server({"/tiny.tgz": archive})
    try:
        dataset = checks_for(archive, f"{server.url}/tiny.tgz")
        with tmpfs(tmp_path / "cache", "64k") as cache:
            (cache / "downloads").mkdir()
            filler = fill(cache)
            with pytest.raises(StorageError, match=rf"^cache {cache}: no space left on device \(ENOSPC\) "
                                                   r"while downloading downloads/tiny.tgz$"):
                download(dataset, cache)
            assert list((cache / "downloads").iterdir()) == []  # no partial file left
            filler.unlink()
            assert download(dataset, cache).read_bytes() == archive
    finally:
        server.close()


def test_a_wrong_checksum_or_size_is_refused(archive, tmp_path):
    server = Server({"/tiny.tgz": archive})
    try:
        good = checks_for(archive, f"{server.url}/tiny.tgz")
        wrong_digest = Dataset("tiny", good.url, good.num_bytes, "0" * 64, "train", "valid", ("3", "7"))
        with pytest.raises(DownloadError, match=rf"^tiny: checksum mismatch \(SHA-256 of the whole file {good.sha256}, "
                                                rf"expected 0{{64}}, fastai's archive\); download a copy yourself"):
            download(wrong_digest, tmp_path / "cache")
        wrong_size = Dataset("tiny", good.url, good.num_bytes + 1, good.sha256, "train", "valid", ("3", "7"))
        with pytest.raises(DownloadError, match=rf"tiny: downloaded {len(archive):,} bytes, expected {len(archive) + 1:,}"):
            download(wrong_size, tmp_path / "cache")
        assert list((tmp_path / "cache" / "downloads").iterdir()) == []
        download(good, tmp_path / "cache")
        (tmp_path / "cache" / "downloads" / "tiny.tgz").write_bytes(b"tampered")
        assert download(good, tmp_path / "cache").read_bytes() == archive  # a changed copy is fetched again
    finally:
        server.close()


def test_a_byte_changed_past_the_first_mib_is_refused(mnist_sample_tgz, tmp_path):
    """fastai's own check (size and MD5 of the first MiB) cannot see this change; the whole-file
    digest does, for a fresh download and for a copy already in the cache."""
    real = mnist_sample_tgz.read_bytes()
    tampered = changed_past_first_mib(real)
    assert len(tampered) == len(real) and hashlib.md5(tampered[: 1 << 20]).digest() == hashlib.md5(real[: 1 << 20]).digest()
    server = Server({"/tiny.tgz": tampered})
    try:
        dataset = checks_for(real, f"{server.url}/tiny.tgz")
        with pytest.raises(DownloadError, match=rf"^tiny: checksum mismatch \(SHA-256 of the whole file "
                                                rf"{hashlib.sha256(tampered).hexdigest()}, expected {dataset.sha256}, "):
            download(dataset, tmp_path / "cache")
        assert list((tmp_path / "cache" / "downloads").iterdir()) == []  # nothing kept for a later run
        server.files["/tiny.tgz"] = real
        path = download(dataset, tmp_path / "cache")
        assert sha256_of(path) == dataset.sha256
        path.write_bytes(tampered)  # changed in the cache after it was verified
        assert download(dataset, tmp_path / "cache").read_bytes() == real and len(server.hits) == 3
    finally:
        server.close()


def test_offline_is_one_line_naming_the_way_out(tmp_path):
    dataset = Dataset("tiny", "http://127.0.0.1:9/tiny.tgz", 10, "0" * 64, "train", "valid", ("3", "7"))
    with pytest.raises(DownloadError, match=r"^tiny: could not download http://127.0.0.1:9/tiny.tgz \(.*\); "
                                            r"download a copy yourself and pass it with --data /path/to/tiny.tgz$"):
        download(dataset, tmp_path / "cache")


def test_fastai_sizes_match_what_the_readme_of_shared_data_says(mnist_sample_tgz):
    """Two independent records of fastai's archive sizes: the table here and ../shared/data/README.md."""
    readme = (mnist_sample_tgz.parent / "README.md").read_text()
    for name in ("mnist_sample", "mnist"):
        dataset = datasets.DATASETS[name]
        archive = dataset.url.rsplit("/", 1)[1]
        found = re.search(rf"{re.escape(archive)}: ([\d,]+) bytes", readme)
        assert found, f"{archive} not described in {mnist_sample_tgz.parent / 'README.md'}"
        assert dataset.num_bytes == int(found[1].replace(",", ""))
    assert all(len(d.sha256) == 64 and int(d.sha256, 16) for d in datasets.DATASETS.values())


def test_named_data_set_through_the_job(mnist_sample_tgz, tmp_path):
    """--data mnist_sample against a mirror serving ../shared/data's repacked copy: its bytes
    are not fastai's, so the job must refuse it, in one line, and trust nothing afterwards."""
    server = Server({"/mnist_sample.tgz": mnist_sample_tgz.read_bytes()})
    try:
        run = run_job("--ray-address", "local", "--data", "mnist_sample", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
                      env_extra={"MNIST37_URL_BASE": server.url})
    finally:
        server.close()
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "error: mnist_sample: downloaded 3,072,978 bytes, expected 3,214,948; download a copy yourself" in run.stderr
    assert server.hits == ["/mnist_sample.tgz"]
    assert list((tmp_path / "cache" / "downloads").iterdir()) == []
    assert sha256_of(mnist_sample_tgz) != datasets.DATASETS["mnist_sample"].sha256


def test_a_pinned_digest_takes_a_mirrors_copy_and_refuses_it_changed(mnist_sample_tgz, ray_local, tmp_path, monkeypatch):
    """A user pins the whole-file SHA-256 of the copy their mirror serves (the repacked
    ../shared/data one here): the job runs on it; the same mirror serving it with one byte
    changed past the first MiB is refused in one line, before Ray starts."""
    real = mnist_sample_tgz.read_bytes()
    pin = {"MNIST37_SHA256_MNIST_SAMPLE": hashlib.sha256(real).hexdigest().upper()}
    server = Server({"/mnist_sample.tgz": changed_past_first_mib(real)})
    try:
        args = ("--data", "mnist_sample", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"))
        refused = run_job("--ray-address", "local", *args, env_extra={"MNIST37_URL_BASE": server.url, **pin})
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        [line] = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
        assert line.startswith("error: mnist_sample: checksum mismatch (SHA-256 of the whole file ")
        assert f"expected {pin['MNIST37_SHA256_MNIST_SAMPLE'].lower()}, pinned by MNIST37_SHA256_MNIST_SAMPLE)" in line
        assert list((tmp_path / "cache" / "downloads").iterdir()) == [] and not (tmp_path / "out").exists()
        server.files["/mnist_sample.tgz"] = real
        for name, value in {"MNIST37_URL_BASE": server.url, **pin}.items():
            monkeypatch.setenv(name, value)
        # in this process on the session's Ray (mnist37.evaluate runs the job's main)
        results = mnist37.evaluate("mnist_sample", out=tmp_path / "out", cache_dir=str(tmp_path / "cache")).results
        assert round(results["metrics"]["l1"]["per_class"]["3"], 4) == 0.9168  # fastbook's figure
    finally:
        server.close()


def test_a_malformed_pin_is_one_line(tmp_path):
    run = run_job("--ray-address", "local", "--data", "mnist_tiny", "--out", str(tmp_path / "out"),
                  "--cache-dir", str(tmp_path / "cache"),
                  env_extra={"MNIST37_URL_BASE": "http://127.0.0.1:9", "MNIST37_SHA256_MNIST_TINY": "abc123"})
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert ("error: MNIST37_SHA256_MNIST_TINY: expected the SHA-256 of the whole archive (64 hex digits), "
            "got 6 characters") in run.stderr


def test_no_data_flag_means_mnist_sample(tmp_path):
    run = run_job("--ray-address", "local", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
                  env_extra={"MNIST37_URL_BASE": "http://127.0.0.1:9"})
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "error: mnist_sample: could not download http://127.0.0.1:9/mnist_sample.tgz" in run.stderr
