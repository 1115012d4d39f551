"""Named data sets: fastai's public MNIST archives, downloaded once into the cache and verified.

`--data mnist_sample` (the default), `--data mnist` and `--data mnist_tiny` name the archives
fastai's `URLs` table names. A download goes to `.<name>.<pid>.partial`, is checked the way fastai
records its archives (size in bytes, and MD5 of the first MiB), and only then renamed to its
final name: a cut or corrupted download is never trusted by a later run.
`$MNIST37_URL_BASE`, when set, replaces the folder of every URL (a mirror, or a test server).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mnist37 import Mnist37Error, partials
from mnist37.paths import cache_home
from mnist37.progress import Progress
from mnist37.storage import StorageError, writing

log = logging.getLogger(__name__)


class DownloadError(Mnist37Error, OSError):
    """A named data set that could not be downloaded or did not verify."""


@dataclass(frozen=True)
class Dataset:
    name: str
    url: str
    num_bytes: int  # fastai's checks: the archive's size ...
    md5_first_mib: str  # ... and the MD5 of its first MiB
    train_split: str  # what each data set brings: its splits ...
    eval_split: str
    classes: tuple[str, ...]  # ... and its classes (("all",): every class folder)


# fastai's URLs.MNIST_SAMPLE, URLs.MNIST, URLs.MNIST_TINY, with the checks fastai records.
DATASETS = {d.name: d for d in [
    Dataset("mnist_sample", "https://s3.amazonaws.com/fast-ai-sample/mnist_sample.tgz",
            3_214_948, "2dbc7ec6f9259b583af0072c55816a88", "train", "valid", ("3", "7")),
    Dataset("mnist", "https://s3.amazonaws.com/fast-ai-imageclas/mnist_png.tgz",
            15_683_414, "03639f83c4e3d19e0a3a53a8a997c487", "training", "testing", ("all",)),
    Dataset("mnist_tiny", "https://s3.amazonaws.com/fast-ai-sample/mnist_tiny.tgz",
            342_207, "56143e8f24db90d925d82a5a74141875", "train", "valid", ("3", "7")),
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
    return base.rstrip("/") + "/" + dataset.url.rsplit("/", 1)[1] if base else dataset.url


def md5_first_mib(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.md5(f.read(1 << 20)).hexdigest()


def verify(path: Path, dataset: Dataset) -> None:
    """Raise DownloadError unless `path` has the archive's size and first-MiB MD5."""
    size = path.stat().st_size
    if size != dataset.num_bytes:
        raise DownloadError(f"{dataset.name}: downloaded {size:,} bytes, expected {dataset.num_bytes:,}")
    digest = md5_first_mib(path)
    if digest != dataset.md5_first_mib:
        raise DownloadError(f"{dataset.name}: checksum mismatch (MD5 of first MiB {digest}, "
                            f"expected {dataset.md5_first_mib})")


def download(dataset: Dataset, cache_dir: str | Path | None = None, timeout_s: float = 30) -> Path:
    """The verified archive of `dataset` in `<cache>/downloads/`, downloading it if needed."""
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
    partial = final.with_name(partials.partial_name(final.name))
    url = url_of(dataset)
    hint = f"download a copy yourself and pass it with --data /path/to/{final.name}"
    # Only the writes are in `writing`: a network error (ECONNRESET) has an errno too.
    saving = functools.partial(writing, "cache", cache, f"downloading {final.relative_to(cache)}")
    try:
        with saving():
            folder.mkdir(parents=True, exist_ok=True)
            partials.clean(folder)  # downloads killed part way
        with partials.claimed(partial):  # under a lock until renamed: partials.clean leaves it alone
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                with saving():
                    out = partial.open("wb", buffering=0)  # unbuffered: a full disk fails the write, not close()
                with out:
                    progress = Progress(f"downloading {final.name}", dataset.num_bytes, " bytes")
                    while block := response.read(_CHUNK):
                        with saving():
                            out.write(block)
                        progress.update(len(block))
            verify(partial, dataset)
            with saving():
                os.replace(partial, final)
    except StorageError:
        with contextlib.suppress(OSError):  # never made, or a read-only folder
            partial.unlink()
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        partial.unlink(missing_ok=True)
        if isinstance(e, DownloadError):
            raise DownloadError(f"{e}; {hint}") from None
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"{dataset.name}: could not download {url} ({reason}); {hint}") from None
    log.info("downloaded %s (%s bytes, verified)", final, f"{dataset.num_bytes:,}")
    return final
