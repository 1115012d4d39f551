"""Named data sets: the real download code against a real HTTP server on 127.0.0.1."""

import hashlib
import http.server
import re
import tarfile
import threading

import pytest

from mnist37.sources import named as datasets
from mnist37.sources.named import Dataset, DownloadError, download, md5_first_mib
from tests.conftest import make_image_folder
from tests.test_evaluate_job import run_job


class Server:
    """Serves files from a dict {path: bytes}; `cut` paths announce their full length but
    send only half and close."""

    def __init__(self, files: dict[str, bytes], cut: set[str] = frozenset()):
        self.files, self.cut, self.hits = files, cut, []
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
    return Dataset("tiny", url, len(data), hashlib.md5(data[: 1 << 20]).hexdigest(), "train", "valid", ("3", "7"))


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


def test_a_full_cache_is_not_a_failed_download(archive, tmp_path):
    from mnist37.storage import StorageError
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
        wrong_md5 = Dataset("tiny", good.url, good.num_bytes, "0" * 32, "train", "valid", ("3", "7"))
        with pytest.raises(DownloadError, match=rf"tiny: checksum mismatch \(MD5 of first MiB {good.md5_first_mib}, "
                                                rf"expected 0{{32}}\); download a copy yourself"):
            download(wrong_md5, tmp_path / "cache")
        wrong_size = Dataset("tiny", good.url, good.num_bytes + 1, good.md5_first_mib, "train", "valid", ("3", "7"))
        with pytest.raises(DownloadError, match=rf"tiny: downloaded {len(archive):,} bytes, expected {len(archive) + 1:,}"):
            download(wrong_size, tmp_path / "cache")
        assert list((tmp_path / "cache" / "downloads").iterdir()) == []
        download(good, tmp_path / "cache")
        (tmp_path / "cache" / "downloads" / "tiny.tgz").write_bytes(b"tampered")
        assert download(good, tmp_path / "cache").read_bytes() == archive  # a changed copy is fetched again
    finally:
        server.close()


def test_offline_is_one_line_naming_the_way_out(tmp_path):
    dataset = Dataset("tiny", "http://127.0.0.1:9/tiny.tgz", 10, "0" * 32, "train", "valid", ("3", "7"))
    with pytest.raises(DownloadError, match=r"^tiny: could not download http://127.0.0.1:9/tiny.tgz \(.*\); "
                                            r"download a copy yourself and pass it with --data /path/to/tiny.tgz$"):
        download(dataset, tmp_path / "cache")


def test_fastai_checks_match_what_the_readme_of_shared_data_says(mnist_sample_tgz):
    """Two independent records of fastai's checks: the table here and ../shared/data/README.md."""
    readme = (mnist_sample_tgz.parent / "README.md").read_text()
    for name in ("mnist_sample", "mnist"):
        dataset = datasets.DATASETS[name]
        archive = dataset.url.rsplit("/", 1)[1]
        found = re.search(rf"{re.escape(archive)}: ([\d,]+) bytes, MD5 of its first MiB ([0-9a-f]{{32}})", readme)
        assert found, f"{archive} not described in {mnist_sample_tgz.parent / 'README.md'}"
        assert (dataset.num_bytes, dataset.md5_first_mib) == (int(found[1].replace(",", "")), found[2])


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
    assert md5_first_mib(mnist_sample_tgz) != datasets.DATASETS["mnist_sample"].md5_first_mib


def test_no_data_flag_means_mnist_sample(tmp_path):
    run = run_job("--ray-address", "local", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
                  env_extra={"MNIST37_URL_BASE": "http://127.0.0.1:9"})
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "error: mnist_sample: could not download http://127.0.0.1:9/mnist_sample.tgz" in run.stderr
