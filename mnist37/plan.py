"""The plan: what a run decodes and where.

`plan(located, map_tasks)` asks the data set's format for its plan (protocol.Source.plan: the
classes, the shards of both splits, what the first training images say), then fixes how every
image is decoded. The job lists a folder data set with Ray tasks, so the driver holds a few
numbers per class folder and per shard whatever the number of files; without Ray
(jobs/gpu_check.py, the converter) the listing is made here.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from mnist37.config import Config, ConfigError
from mnist37.locate import Located
from mnist37.storage.locations import cache_home, is_uri
from mnist37.shards import clean_partials
from mnist37.sources import format_module
from mnist37.sources.archive import ArchiveObject, on_node
from mnist37.images import Decoding, FirstImages
from mnist37.sources.base import FormatError
from mnist37.sources.protocol import Listed, PlanRequest, Shard, TaskMap
from mnist37.storage.files import Root

log = logging.getLogger(__name__)

# Training images that decode looked at to tell a gray data set from a color one (channels = auto).
CHANNEL_PROBES = 8
CHANNELS = {"auto": 0, "gray": 1, "rgb": 3}
# Subfolder of a local chunk folder that keeps class folder listings for the next run.
LISTINGS = ".listings"


@dataclass(eq=False)
class Plan:
    """What to decode and where: everything the job needs before Ray is involved."""

    cfg: Config
    root: Root  # a local folder, or a URI (s3://bucket/prefix)
    classes: list[str]
    decoding: Decoding  # how every shard is decoded: size, channels, conversion, reuse
    shards: list[Shard]  # both splits, the training split's first
    chunk_dir: str  # a local path or a pyarrow filesystem URI
    scan_s: float
    format: str  # a name in mnist37.sources.FORMATS
    # Per split, what a listing counted before any decode (protocol.Listed; {} for formats that
    # learn their counts by reading), and how many listings an earlier run kept.
    listed: dict[str, Listed] = field(default_factory=dict)
    listings_reused: int = 0
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


# shard_size = 0 (auto): at most this many images a shard, and at most SHARD_BYTES of their
# decoded pixels where the configuration fixes their size. 8,192 MNIST images are 6.4 MB; 8,192
# ImageNet-like images at 64x64 color would be 100 MB a chunk, one decode task of ~18 s and one
# classify task of ~16 s at 1,000 classes (1.2 GB and minutes at 224x224): too coarse for a task.
DEFAULT_SHARD_IMAGES = 8192
SHARD_BYTES = 16 << 20


def images_per_shard(cfg: Config) -> int:
    """The shard size of a run: `shard_size` when it is set; for 0 (auto), DEFAULT_SHARD_IMAGES,
    or where `image_size` or `image_shape` fixes the images' size, the largest power of two
    whose images fit SHARD_BYTES (counted as color unless `channels` is gray; at least 1).
    From the configuration alone, so that a rerun names its chunks as the last one did; a data
    set at its native sizes (no image_size or image_shape) keeps DEFAULT_SHARD_IMAGES."""
    if cfg.shard_size:
        return cfg.shard_size
    size = cfg.image_size or cfg.image_shape
    if not size:
        return DEFAULT_SHARD_IMAGES
    fit = SHARD_BYTES // (size[0] * size[1] * (1 if cfg.channels == "gray" else 3))
    return min(DEFAULT_SHARD_IMAGES, 1 << max(0, fit.bit_length() - 1))


# Images of a split per CPU below which its fewer shards than CPUs are not worth a note.
IDLE_NOTE_IMAGES_PER_CPU = 512


def idle_cpus_note(planned: Plan, cpus: int) -> str | None:
    """A line for splits listed into fewer shards than the cluster has CPUs, where they are
    large enough for that to matter: a decode or classify task takes one shard, so the other
    CPUs wait (10,000 JPEGs at 1,000 classes on 2 CPUs: 42 s at 8,192 images a shard, 26 s at
    1,000; benchmarks/many_classes). The size it names gives each CPU two shards
    of the smaller such split. None where no split is short, and for formats that learn their
    counts by reading."""
    short = []  # (split, images, shards)
    for split in (planned.cfg.train_split, planned.cfg.eval_split):
        if (listed := planned.listed.get(split)) is None:
            continue
        images, shards = int(listed.found.sum()), sum(s.split == split for s in planned.shards)
        if shards < cpus and images >= IDLE_NOTE_IMAGES_PER_CPU * cpus:
            short.append((split, images, shards))
    if not short:
        return None
    size = max(1, min(-(-images // (2 * cpus)) for _, images, _ in short))
    what = ", ".join(f"{split}/ {images:,} images in {shards} shard{'s' if shards > 1 else ''}"
                     for split, images, shards in short)
    return (f"note: {what} (--shard-size {planned.cfg.shard_size:,}), for {cpus} CPUs: a decode or classify "
            f"task takes one shard, so CPUs wait; --shard-size {size} gives each CPU two (chunks of another "
            f"shard size are decoded again, once)")


def plan(located: Located, map_tasks: TaskMap | None = None) -> Plan:
    """The plan of the located data set's format (protocol.Source.plan); how images are decoded
    (size, channels); what writers killed in earlier runs left in the chunk folder, cleared.
    A folder data set's class folders (or prefixes) of both splits are listed by one
    `map_tasks` call: the job passes one that runs a Ray task per folder and leaves the file
    names in Ray's object store (on_ray.tasks.map_listings), so the driver keeps per-folder and
    per-shard records only; without it, here, one after another (jobs/gpu_check.py and the
    converter, which have no Ray)."""
    clock = time.perf_counter()
    cfg, root = dataclasses.replace(located.cfg, shard_size=images_per_shard(located.cfg)), located.root
    if is_uri(cfg.chunk_dir):
        chunk_dir = cfg.chunk_dir
    else:
        chunk_dir = str(Path(cfg.chunk_dir).resolve() if cfg.chunk_dir else default_chunk_dir(cfg, root))
        clean_partials(Path(chunk_dir))
    if located.archive is not None and map_tasks is not None:  # listing tasks extract it on their node first
        tasks = map_tasks
        map_tasks = lambda function, arguments, threads: tasks(  # noqa: E731
            functools.partial(on_node, located.archive, function), arguments, threads)
    # Listings are kept beside local chunks, so emptying the chunk folder (or reuse_chunks =
    # false) also means listing every folder afresh.
    keep_dir = Path(chunk_dir) / LISTINGS if cfg.reuse_chunks and not is_uri(chunk_dir) else None
    request = PlanRequest(root, (cfg.train_split, cfg.eval_split), tuple(located.classes), cfg.shard_size,
                          shape=tuple(cfg.image_shape) or None, image_column=cfg.image_column,
                          label_column=cfg.label_column, wanted=probes_wanted(cfg),
                          sizes_unknown=not cfg.image_size and not cfg.image_shape, keep_dir=keep_dir,
                          map_tasks=map_tasks)
    planned = format_module(located.format).plan(request)
    log.info("%s: %s, %s, %d shards", root, located.format, planned.summary, len(planned.shards))
    decoding = decoding_for(cfg, planned.first)
    if planned.as_stored and (decoding.channels != 1 or decoding.resize):
        raise FormatError(f"{root}: {planned.as_stored}: channels = rgb and image_size do not apply")
    return Plan(cfg, root, planned.classes, decoding, planned.shards, chunk_dir, time.perf_counter() - clock,
                located.format, planned.listed, planned.listings_reused, located.archive)
