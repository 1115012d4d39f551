"""The plan: what a run decodes and where.

`plan(located, map_folders)` lists both splits (sorted), fixes the image shape and cuts the
shards. The job lists with Ray tasks, so the driver holds a few numbers per class folder and
per shard whatever the number of files; without Ray (jobs/gpu_check.py, the converter) the
listing is made here.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from mnist37.config import Config
from mnist37.locate import Located
from mnist37.paths import cache_home, is_uri
from mnist37.shards import clean_partials
from mnist37.sources import plan_containers
from mnist37.sources.archive import ArchiveObject, on_node
from mnist37.sources.base import ContainerShard, Decoding
from mnist37.sources.files import Root
from mnist37.sources.folder import FolderMap, Listing, Shard, image_shape, list_splits, make_shards

log = logging.getLogger(__name__)

# Training files tried, in order, for the image shape when the config does not give it.
SHAPE_PROBES = 100
# Subfolder of a local chunk folder that keeps class folder listings for the next run.
LISTINGS = ".listings"


@dataclass(eq=False)
class Plan:
    """What to decode and where: everything the job needs before Ray is involved."""

    cfg: Config
    root: Root  # a local folder, or a URI (s3://bucket/prefix)
    classes: list[str]
    listings: dict[str, Listing]  # per split, train first; container formats list no files ({})
    shape: tuple[int, int]
    shards: list[Shard] | list[ContainerShard]
    chunk_dir: str  # a local path or a pyarrow filesystem URI
    scan_s: float
    format: str = "folder"  # a name in mnist37.sources.FORMATS
    archive: ArchiveObject | None = None  # extracted on each node before a task reads the root there

    @property
    def decoding(self) -> Decoding:
        """How every shard of this run is decoded."""
        return Decoding(self.shape, self.cfg.non_grayscale == "convert", self.cfg.reuse_chunks,
                        self.cfg.verify_chunks)


def default_chunk_dir(cfg: Config, root: Root) -> Path:
    """One chunk folder per data root, in the cache, so every run over that root reuses it."""
    tag = hashlib.blake2b(str(root).encode(), digest_size=6).hexdigest()
    return cache_home(cfg.cache_dir) / "chunks" / f"{str(root).rstrip('/').rpartition('/')[2]}-{tag}"


def plan(located: Located, map_folders: FolderMap | None = None) -> Plan:
    """List every split (sorted), fix the image shape, cut the shards; clear what writers
    killed in earlier runs left in the chunk folder. Every class folder (or prefix) of both
    splits is listed by one `map_folders` call: the job passes one that runs a Ray task per
    folder and leaves the file names in Ray's object store (distributed.map_listings), so the
    driver keeps per-folder and per-shard records only; without it, here, one after another
    (jobs/gpu_check.py and the converter, which have no Ray)."""
    clock = time.perf_counter()
    cfg, root, classes = located.cfg, located.root, located.classes
    if is_uri(cfg.chunk_dir):
        chunk_dir = cfg.chunk_dir
    else:
        chunk_dir = str(Path(cfg.chunk_dir).resolve() if cfg.chunk_dir else default_chunk_dir(cfg, root))
        clean_partials(Path(chunk_dir))
    convert = cfg.non_grayscale == "convert"
    if located.format != "folder":
        planned = plan_containers(root, located.format, cfg.train_split, cfg.eval_split, list(cfg.classes),
                                  cfg.shard_size, tuple(cfg.image_shape) or None, convert,
                                  cfg.image_column, cfg.label_column)
        log.info("%s: %s, %s, %d shards", root, located.format, ", ".join(
            f"{split} {len(files)} files" for split, files in planned.splits.items()), len(planned.shards))
        return Plan(cfg, root, planned.classes, {}, planned.shape, planned.shards, chunk_dir,
                    time.perf_counter() - clock, located.format, located.archive)
    # Folder listings are kept beside local chunks, so emptying the chunk folder (or
    # reuse_chunks = false) also means listing every folder afresh.
    reuse_dir = Path(chunk_dir) / LISTINGS if cfg.reuse_chunks and not is_uri(chunk_dir) else None
    if located.archive is not None and map_folders is not None:  # listing tasks extract it on their node first
        tasks = map_folders
        map_folders = lambda function, arguments: tasks(functools.partial(on_node, located.archive, function),  # noqa: E731
                                                        arguments)
    listings = list_splits(root, (cfg.train_split, cfg.eval_split), classes, reuse_dir, map_folders)
    shape = tuple(cfg.image_shape) or image_shape(root, listings[cfg.train_split].head_paths(SHAPE_PROBES), convert)
    shards = [shard for listing in listings.values() for shard in make_shards(listing, cfg.shard_size)]
    log.info("%s: %s, %d shards of up to %d images", root, ", ".join(
        f"{split} {len(listing)} images" for split, listing in listings.items()), len(shards), cfg.shard_size)
    return Plan(cfg, root, classes, listings, shape, shards, chunk_dir, time.perf_counter() - clock,
                archive=located.archive)
