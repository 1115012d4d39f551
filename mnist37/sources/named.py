"""Named data sets: fastai's public MNIST archives, downloaded once into the cache and verified.

`--data mnist_sample` (the default), `--data mnist` and `--data mnist_tiny` name the archives
fastai's `URLs` table names. A download is published (`writes.publish`): written to a
temporary, checked against the SHA-256 of the whole archive (and its size, for a plainer line
when a mirror serves another file), flushed to disk, and only then renamed to its final name: a
cut, corrupted or altered download is never trusted by a later run, and a file already in the
cache is checked again at each use.
`$MNIST37_URL_BASE`, when set, replaces the folder of every URL (a mirror, or a test server).
`$MNIST37_SHA256_<NAME>` (`MNIST37_SHA256_MNIST_SAMPLE=<64 hex digits>`) pins another whole-file
digest for that data set: a mirror's own copy, or fastai's file should it ever change; the pin
replaces the table's digest and size, it never loosens the check.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mnist37 import Mnist37Error
from mnist37.storage import partials
from mnist37.storage.locations import cache_home, secret_part
from mnist37.progress import Progress
from mnist37.storage.writes import StorageError, publish, writing

log = logging.getLogger(__name__)


class DownloadError(Mnist37Error, OSError):
    """A named data set that could not be downloaded or did not verify."""


@dataclass(frozen=True)
class Dataset:
    name: str
    url: str
    num_bytes: int  # the archive's size (fastai's own record)
    sha256: str  # SHA-256 of the whole archive, 64 hex digits
    train_split: str  # what each data set brings: its splits ...
    eval_split: str
    classes: tuple[str, ...]  # ... and its classes (("all",): every class folder)


# fastai's URLs.MNIST_SAMPLE, URLs.MNIST, URLs.MNIST_TINY. Sizes: fastai's own checks
# (fastai/data/checks.txt, which holds a size and the MD5 of the first MiB only, too little to
# trust a whole file). SHA-256 of each whole archive: FastAI.jl's DataDeps registrations
# (github.com/FluxML/FastAI.jl, src/datasets/fastaidatasets.jl, DATASETCONFIGS: "mnist_sample",
# "mnist_tiny" under "sample", "mnist_png" under "imageclas"; DataDeps.jl takes a plain hex
# string as the SHA2-256 of the whole downloaded file, src/verification.jl). Not checked here
# against fastai's servers (no network beside package registries where this was written).
DATASETS = {d.name: d for d in [
    Dataset("mnist_sample", "https://s3.amazonaws.com/fast-ai-sample/mnist_sample.tgz", 3_214_948,
            "b373a14f282298aeba0f7dd56b7cdb6c2401063d4f118c39c54982907760bd38", "train", "valid", ("3", "7")),
    Dataset("mnist", "https://s3.amazonaws.com/fast-ai-imageclas/mnist_png.tgz", 15_683_414,
            "9e18edaa3a08b065d8f80a019ca04329e6d9b3e391363414a9bd1ada30563672", "training", "testing", ("all",)),
    Dataset("mnist_tiny", "https://s3.amazonaws.com/fast-ai-sample/mnist_tiny.tgz", 342_207,
            "0d1fedf86243931aa3fc065d2cf4ffab339a972958d8594ae993ee32bd8e15b9", "train", "valid", ("3", "7")),
]}

# What an ImageFolder given by path is read as unless the config says otherwise: fastai's
# MNIST_SAMPLE layout and fastbook's pair of digits.
FOLDER_SPLITS = ("train", "valid")
FOLDER_CLASSES = ("3", "7")


def named(data: str | os.PathLike) -> Dataset | None:
    """The named data set `data` stands for: a name from DATASETS that is not a local path."""
    return DATASETS.get(str(data)) if not Path(data).exists() else None


def splits_and_classes(data: str | os.PathLike) -> tuple[str, str, list[str]]:
    """(train split, eval split, classes) a data set brings when the config leaves them empty."""
    dataset = named(data)
    if dataset is None:
        return *FOLDER_SPLITS, list(FOLDER_CLASSES)
    return dataset.train_split, dataset.eval_split, list(dataset.classes)

_CHUNK = 1 << 16


def url_of(dataset: Dataset) -> str:
    base = os.environ.get("MNIST37_URL_BASE")
    if base and (part := secret_part(base)):
        raise DownloadError(f"MNIST37_URL_BASE: a mirror's URL may not hold a credential (its {part} is refused, "
                            "not shown)")
    return base.rstrip("/") + "/" + dataset.url.rsplit("/", 1)[1] if base else dataset.url


def sha256_of(path: Path) -> str:
    """SHA-256 of the whole file, 64 hex digits."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def pin_variable(dataset: Dataset) -> str:
    """The environment variable that pins `dataset`'s whole-file SHA-256: MNIST37_SHA256_MNIST_SAMPLE."""
    return "MNIST37_SHA256_" + dataset.name.upper()


def expected(dataset: Dataset) -> tuple[str, int | None]:
    """(SHA-256, size or None) a download of `dataset` must have: the user's pin when set
    (any size), else the table's."""
    variable = pin_variable(dataset)
    pinned = os.environ.get(variable, "").strip().lower()
    if not pinned:
        return dataset.sha256, dataset.num_bytes
    if len(pinned) != 64 or any(c not in "0123456789abcdef" for c in pinned):
        raise DownloadError(f"{variable}: expected the SHA-256 of the whole archive (64 hex digits), "
                            f"got {len(pinned)} characters")
    return pinned, None


def verify(path: Path, dataset: Dataset) -> None:
    """Raise DownloadError unless the whole file at `path` has the expected SHA-256 (and, for
    the table's digest, the archive's size)."""
    check(dataset, path.stat().st_size, sha256_of(path))


def check(dataset: Dataset, size: int, found: str) -> None:
    """Raise DownloadError unless a file of `size` bytes and SHA-256 `found` is `dataset`'s."""
    digest, num_bytes = expected(dataset)
    if num_bytes is not None and size != num_bytes:
        raise DownloadError(f"{dataset.name}: downloaded {size:,} bytes, expected {num_bytes:,}")
    if found != digest:
        whose = f"pinned by {pin_variable(dataset)}" if num_bytes is None else "fastai's archive"
        raise DownloadError(f"{dataset.name}: checksum mismatch (SHA-256 of the whole file {found}, "
                            f"expected {digest}, {whose})")


class _Cut(Mnist37Error):
    """The network failed while a download was saved (its cause); not an OSError, so `writing`
    leaves it to `download`."""


def _save(response, dataset: Dataset, name: str, out) -> None:
    """Copy `response` into `out`, then raise DownloadError unless it verifies (`check`)."""
    progress = Progress(f"downloading {name}", response.length or dataset.num_bytes, " bytes")
    digest, size = hashlib.sha256(), 0
    while True:
        try:
            block = response.read(_CHUNK)
        except (http.client.HTTPException, OSError) as e:
            raise _Cut() from e
        if not block:
            break
        out.write(block)
        digest.update(block)
        size += len(block)
        progress.update(len(block))
    check(dataset, size, digest.hexdigest())


def download(dataset: Dataset, cache_dir: str | Path | None = None, timeout_s: float = 30) -> Path:
    """The verified archive of `dataset` in `<cache>/downloads/`, downloading it if needed."""
    expected(dataset)  # a malformed pin, or a mirror's URL with a credential, is refused before anything else
    url = url_of(dataset)
    cache = cache_home(cache_dir)
    folder = cache / "downloads"
    final = folder / dataset.url.rsplit("/", 1)[1]
    if final.is_file():
        try:
            verify(final, dataset)
            return final
        except DownloadError as e:  # changed since it was verified: fetch it again
            log.warning("%s; downloading it again", e)
            final.unlink()
    hint = f"download a copy yourself and pass it with --data /path/to/{final.name}"
    # Only the writes are in `writing`: a network error (ECONNRESET) has an errno too.
    saving = functools.partial(writing, "cache", cache, f"downloading {final.relative_to(cache)}")
    try:
        with saving():
            folder.mkdir(parents=True, exist_ok=True)
            partials.clean(folder)  # downloads killed part way
        with urllib.request.urlopen(url, timeout=timeout_s) as response, saving():
            publish(final, functools.partial(_save, response, dataset, final.name))  # verified before it is renamed
    except StorageError:
        raise
    except (_Cut, urllib.error.URLError, http.client.HTTPException, OSError) as e:
        e = e.__cause__ if isinstance(e, _Cut) else e
        if isinstance(e, DownloadError):
            raise DownloadError(f"{e}; {hint}") from None
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"{dataset.name}: could not download {url} ({reason}); {hint}") from None
    log.info("downloaded %s (%s bytes, SHA-256 of the whole file verified)", final, f"{final.stat().st_size:,}")
    return final
