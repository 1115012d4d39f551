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
from dataclasses import dataclass, field
from pathlib import Path

from mnist37 import DatasetError
from mnist37.config import Config, ConfigError
from mnist37.locate import Located
from mnist37.storage.locations import cache_home, is_uri
from mnist37.shards import clean_partials
from mnist37.sources import format_module, plan_containers
from mnist37.sources.archive import ArchiveObject, on_node
from mnist37.images import Decoding, FirstImages
from mnist37.sources.base import ContainerShard, FormatError
from mnist37.storage.files import Root
from mnist37.sources.folder import FolderMap, Listing, Shard, first_images, header_sizes, list_splits, make_shards

log = logging.getLogger(__name__)

# Training files tried, in order, for the image shape when the config does not give it.
SHAPE_PROBES = 100
# Training images that decode looked at to tell a gray data set from a color one (channels = auto).
CHANNEL_PROBES = 8
CHANNELS = {"auto": 0, "gray": 1, "rgb": 3}
# Files of each split whose headers are read, spread over its class folders, when no
# image_size is given: images of several sizes are then said to be so before any is decoded.
SIZE_PROBES = 12
# Subfolder of a local chunk folder that keeps class folder listings for the next run.
LISTINGS = ".listings"


@dataclass(eq=False)
class Plan:
    """What to decode and where: everything the job needs before Ray is involved."""

    cfg: Config
    root: Root  # a local folder, or a URI (s3://bucket/prefix)
    classes: list[str]
    listings: dict[str, Listing]  # per split, train first; container formats list no files ({})
    decoding: Decoding  # how every shard is decoded: size, channels, conversion, reuse
    shards: list[Shard] | list[ContainerShard]
    chunk_dir: str  # a local path or a pyarrow filesystem URI
    scan_s: float
    format: str = "folder"  # a name in mnist37.sources.FORMATS
    archive: ArchiveObject | None = None  # extracted on each node before a task reads the root there
    names: list[str] = field(default_factory=list)  # the classes as tables and reports show them

    def __post_init__(self) -> None:
        self.names = self.names or display_names(self.cfg, self.classes)

    @property
    def shape(self) -> tuple[int, ...]:
        """One image's array: (H, W), or (3, H, W) for color."""
        return self.decoding.array_shape


def default_chunk_dir(cfg: Config, root: Root) -> Path:
    """One chunk folder per data root, in the cache, so every run over that root reuses it."""
    tag = hashlib.blake2b(str(root).encode(), digest_size=6).hexdigest()
    return cache_home(cfg.cache_dir) / "chunks" / f"{str(root).rstrip('/').rpartition('/')[2]}-{tag}"


def display_names(cfg: Config, classes: list[str]) -> list[str]:
    """The classes as tables, report.html and results.json show them: `class_names` names the
    label values of label-only data (IDX, WebDataset without classes.txt, numbered folders);
    without it, the classes as they are."""
    if not cfg.class_names:
        return list(classes)
    names = []
    for c in classes:
        if not c.isdigit():
            raise ConfigError(f"class_names: names label values 0, 1, ... of data whose classes are numbers; "
                              f"class {c!r} already has a name")
        if int(c) >= len(cfg.class_names):
            raise ConfigError(f"class_names: {len(cfg.class_names)} names, but class {c} needs at least {int(c) + 1}")
        names.append(cfg.class_names[int(c)])
    if len(set(names)) != len(names):
        raise ConfigError(f"class_names: the classes would share names: {names}")
    return names


def probes_wanted(cfg: Config) -> int:
    """How many of the first training images to look at: none when the config fixes the size
    and the channels, one for the size alone, CHANNEL_PROBES to tell gray from color."""
    if cfg.channels == "auto":
        return CHANNEL_PROBES
    return 0 if cfg.image_size or cfg.image_shape else 1


def decoding_for(cfg: Config, first: FirstImages | None) -> Decoding:
    """How every image of the run is decoded: its size (`image_size`, resized to; else
    `image_shape`, else the first training image's, others rejected), its channels (`channels`,
    or for auto the first training images' kind) and whether another mode is converted (always
    to reach the channels asked for, or to color; for a gray data set found by auto, as
    `non_grayscale` says)."""
    channels = CHANNELS[cfg.channels] or (3 if first is not None and first.color else 1)
    shape = tuple(cfg.image_size) or tuple(cfg.image_shape) or first.shape
    convert = cfg.channels != "auto" or channels == 3 or cfg.non_grayscale == "convert"
    return Decoding(shape, convert, cfg.reuse_chunks, cfg.verify_chunks, channels, bool(cfg.image_size),
                    cfg.resize_filter, cfg.jpeg_draft)


def check_sizes(root: Root, split: str, sizes: list[tuple[int, int]], expected: tuple[int, int]) -> None:
    """DatasetError, naming the sizes found and --image-size, when the images looked at in
    `split` (their (H, W) `sizes`) show a data set of several sizes: without image_size every
    image must have the `expected` size, so most would be rejected after the whole decode.
    A stray file of another size (at most one of those looked at, or under a quarter of them)
    is left to the decode, which rejects and counts it."""
    other = [size for size in sizes if size != expected]
    if len(other) < 2 or 4 * len(other) < len(sizes):
        return
    found = list(dict.fromkeys(sizes))
    shown = ", ".join(f"{h}x{w}" for h, w in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    what = f"images of different sizes ({shown}" if len(found) > 1 else f"images of {shown} (all"
    raise DatasetError(f"{split}/ in {root}: {what} of {len(sizes)} looked at), where every image must have the "
                       f"first training image's size ({expected[0]}x{expected[1]}) unless --image-size is given; "
                       f"pass --image-size HxW (e.g. --image-size 64x64) to resize them all to one size")


def plan(located: Located, map_folders: FolderMap | None = None) -> Plan:
    """List every split (sorted), fix how images are decoded (size, channels), cut the shards;
    clear what writers killed in earlier runs left in the chunk folder. Every class folder (or
    prefix) of both splits is listed by one `map_folders` call: the job passes one that runs a
    Ray task per folder and leaves the file names in Ray's object store
    (on_ray.tasks.map_listings), so the driver keeps per-folder and per-shard records only;
    without it, here, one after another (jobs/gpu_check.py and the converter, which have no Ray)."""
    clock = time.perf_counter()
    cfg, root, classes = located.cfg, located.root, located.classes
    if is_uri(cfg.chunk_dir):
        chunk_dir = cfg.chunk_dir
    else:
        chunk_dir = str(Path(cfg.chunk_dir).resolve() if cfg.chunk_dir else default_chunk_dir(cfg, root))
        clean_partials(Path(chunk_dir))
    if located.format != "folder":
        planned = plan_containers(root, located.format, cfg.train_split, cfg.eval_split, list(cfg.classes),
                                  cfg.shard_size, tuple(cfg.image_shape) or None, cfg.image_column, cfg.label_column,
                                  probes_wanted(cfg))
        log.info("%s: %s, %s, %d shards", root, located.format, ", ".join(
            f"{split} {len(files)} files" for split, files in planned.splits.items()), len(planned.shards))
        decoding = decoding_for(cfg, planned.first)
        check = getattr(format_module(located.format), "check_decoding", None)
        if check is not None and (why := check(decoding)) is not None:
            raise FormatError(f"{root}: {why}")
        return Plan(cfg, root, planned.classes, {}, decoding, planned.shards, chunk_dir,
                    time.perf_counter() - clock, located.format, located.archive)
    # Folder listings are kept beside local chunks, so emptying the chunk folder (or
    # reuse_chunks = false) also means listing every folder afresh.
    reuse_dir = Path(chunk_dir) / LISTINGS if cfg.reuse_chunks and not is_uri(chunk_dir) else None
    if located.archive is not None and map_folders is not None:  # listing tasks extract it on their node first
        tasks = map_folders
        map_folders = lambda function, arguments: tasks(functools.partial(on_node, located.archive, function),  # noqa: E731
                                                        arguments)
    listings = list_splits(root, (cfg.train_split, cfg.eval_split), classes, reuse_dir, map_folders)
    wanted = probes_wanted(cfg)
    first = first_images(root, listings[cfg.train_split].head_paths(SHAPE_PROBES), wanted) if wanted else None
    if not cfg.image_size and not cfg.image_shape:
        for listing in listings.values():
            check_sizes(root, listing.split, header_sizes(root, listing.spread_paths(SIZE_PROBES)), first.shape)
    shards = [shard for listing in listings.values() for shard in make_shards(listing, cfg.shard_size)]
    log.info("%s: %s, %d shards of up to %d images", root, ", ".join(
        f"{split} {len(listing)} images" for split, listing in listings.items()), len(shards), cfg.shard_size)
    return Plan(cfg, root, classes, listings, decoding_for(cfg, first), shards, chunk_dir,
                time.perf_counter() - clock, archive=located.archive)
