"""Typed job configuration: defaults here, overrides from a TOML file, then the command line.

The defaults are the package's own (no file is read unless --config names one), so an installed
mnist37 runs without this repository; configs/*.toml are short commented examples.

Every field of `Config` is a config-file key (`shard_size`) and a command-line flag
(`--shard-size`). Unknown keys and bad values raise `ConfigError` naming the key and
what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from mnist37 import Mnist37Error, sources

METRICS = ("l1", "l2")
DEVICES = ("auto", "cpu", "cuda")
ON_BAD_FILE = ("error", "skip")
CHUNK_TRANSPORTS = ("auto", "filesystem", "object_store")
NON_GRAYSCALE = ("reject", "convert")
FORMATS = ("auto", *sources.FORMATS)


class ConfigError(Mnist37Error, ValueError):
    """A config key is unknown or has a value outside what it allows."""


@dataclass
class Config:
    # A data set in ImageFolder layout, <root>/<split>/<class>/*.png: a folder, a .tgz/.tar.gz,
    # or a name (mnist_sample, mnist, mnist_tiny) downloaded from fastai's archives; or a
    # folder of Parquet files, WebDataset tar shards or IDX files (see `format`).
    data: str = "mnist_sample"
    # Output folder: results.json, prototype PNGs, the accuracy table.
    out: str = "runs/latest"
    # What `data` holds: "folder" (ImageFolder PNGs), "parquet" (Hugging Face datasets layout),
    # "webdataset" (tar shards of <key>.png + <key>.cls), "idx" (MNIST's own files); "auto"
    # tells them apart by the files there (README: Formats).
    format: str = "auto"
    # Parquet columns: encoded image bytes (a struct with a `bytes` field, or binary) and the
    # integer label.
    image_column: str = "image"
    label_column: str = "label"
    # Where Arrow tensor chunks are kept: a path or a pyarrow filesystem URI (file://, s3://,
    # gs://, hdfs://); empty means <cache_dir>/chunks/<data root name>-<hash>, shared by every
    # run over the same data root.
    chunk_dir: str = ""
    # How chunks reach classify tasks: "filesystem" (chunk_dir, which every node must reach:
    # one machine, a shared mount, or a URI), "object_store" (Ray carries each evaluation
    # chunk's bytes; for nodes that share no disk), "auto" (object_store on a multi-node
    # cluster unless chunk_dir is a URI, else filesystem).
    chunk_transport: str = "auto"
    # Reuse a shard's chunk when its files (paths, sizes, modification times) are unchanged,
    # and a class folder's listing while the folder is (both kept in a local chunk_dir).
    reuse_chunks: bool = True
    # Check every chunk against its checksum when it is used (a damaged one is decoded again).
    # false skips the hashing, for measuring what it costs (~1-2% of a warm run): a damaged
    # chunk is then trusted silently.
    verify_chunks: bool = True
    # Where archives are extracted; empty means $MNIST37_CACHE, else $XDG_CACHE_HOME/mnist37,
    # else ~/.cache/mnist37.
    cache_dir: str = ""
    # Split whose images are averaged into prototypes, and split that is classified. Empty: a
    # named data set's own (mnist: training / testing), else train / valid.
    train_split: str = ""
    eval_split: str = ""
    # Class folder names, in the order used for indices and confusion rows; ["all"] takes every
    # class folder of the training split, sorted. Empty: a named data set's own (mnist: all),
    # else ["3", "7"], fastbook's pair.
    classes: list[str] = field(default_factory=list)
    # What a file that cannot be used does to the job: "error" stops it before any accuracy
    # is computed and lists every such file; "skip" leaves them out and lists them in
    # results.json. Either way files found = images used + files rejected.
    on_bad_file: str = "error"
    # PNGs that are not 8-bit grayscale (RGB, RGBA, palette, 16-bit, 1-bit): "reject" them as
    # bad files, or "convert" them as Pillow's "L" mode does (luma for color, alpha dropped,
    # 16-bit values clipped at 255).
    non_grayscale: str = "reject"
    # [H, W] every image must have; empty takes the first training image that decodes.
    image_shape: list[int] = field(default_factory=list)
    # Images per shard, i.e. per Ray task and per Arrow chunk. 8192 MNIST images are ~100 ms
    # of decode, so Ray's few ms per task stay ~2-4% and the last task ends soon after the
    # rest. Measured when it was chosen (commit a4e781f, before chunk reuse by listing and
    # checksums), at 1.44M images on 2 cores (cold / warm whole-job s): 2048: 20.2 / 10.8,
    # 4096: 21.1 / 9.7, 8192: 20.0 / 10.4, 16384: 18.2 / 8.9; larger shards leave a big
    # cluster's cores idle on mid-size data sets. Fixed, not derived from the data size, so
    # adding files does not move every shard boundary (and re-decode everything).
    shard_size: int = 8192
    # Distance metrics to report: l1 = mean absolute difference (fastbook's), l2 = RMS difference.
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    # Misclassified images per class and metric shown in report.html, closest to the decision
    # boundary and farthest from it.
    report_examples: int = 4
    # Where distances are computed: auto = CUDA when the task sees a CUDA device.
    device: str = "auto"
    # GPU fraction each classification task asks Ray for, when the cluster has GPUs.
    gpus_per_task: float = 0.25
    # Most Ray tasks submitted and not yet finished; 0 = twice the cluster's CPUs.
    max_in_flight: int = 0
    # Start Ray's dashboard (on 127.0.0.1) when the job starts its own local Ray; off, a
    # local start is ~0.8 s faster. A cluster's dashboard is the cluster's business.
    ray_dashboard: bool = False
    # Ray cluster to join; empty lets ray.init() decide (RAY_ADDRESS, a running local
    # cluster, else a new local Ray); "local" always starts a new local Ray.
    ray_address: str = ""

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(Config)}


def _field_type(name: str) -> type:
    return typing.get_type_hints(Config)[name]


def _coerce(name: str, value: object) -> object:
    """Convert `value` (from TOML or the command line) to the type of field `name`."""
    kind = _field_type(name)
    if typing.get_origin(kind) is list:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if typing.get_args(kind)[0] is int:
            try:
                if not isinstance(value, list) or any(isinstance(v, (bool, float)) for v in value):
                    raise ValueError
                return [int(v) for v in value]
            except ValueError:
                raise ConfigError(f"{name}: expected a list of integers, got {value!r}") from None
        if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
            raise ConfigError(f"{name}: expected a list of names, got {value!r}")
        return [str(v) for v in value]
    if kind is bool:
        if isinstance(value, str) and value.lower() in _BOOLEANS:
            return _BOOLEANS[value.lower()]
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if kind in (int, float):
        expected = "an integer" if kind is int else "a number"
        allowed = (int, str) if kind is int else (int, float, str)
        if isinstance(value, bool) or not isinstance(value, allowed):
            raise ConfigError(f"{name}: expected {expected}, got {value!r}")
        try:
            return kind(value)
        except ValueError:
            raise ConfigError(f"{name}: expected {expected}, got {value!r}") from None
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    return value


def validate(cfg: Config) -> None:
    """Raise ConfigError for the first value outside what its key allows."""
    if cfg.shard_size <= 0:
        raise ConfigError(f"shard_size: expected a positive number of images, got {cfg.shard_size}")
    if cfg.report_examples < 0:
        raise ConfigError(f"report_examples: expected 0 or more images, got {cfg.report_examples}")
    if cfg.max_in_flight < 0:
        raise ConfigError(f"max_in_flight: expected 0 (auto) or a positive count, got {cfg.max_in_flight}")
    if not 0 < cfg.gpus_per_task <= 1:
        raise ConfigError(f"gpus_per_task: expected a fraction in (0, 1], got {cfg.gpus_per_task}")
    if cfg.chunk_transport not in CHUNK_TRANSPORTS:
        raise ConfigError(f"chunk_transport: unknown transport {cfg.chunk_transport!r}; "
                          f"expected one of {', '.join(CHUNK_TRANSPORTS)}")
    if cfg.format not in FORMATS:
        raise ConfigError(f"format: unknown format {cfg.format!r}; expected one of {', '.join(FORMATS)}")
    if cfg.on_bad_file not in ON_BAD_FILE:
        raise ConfigError(f"on_bad_file: unknown policy {cfg.on_bad_file!r}; expected one of {', '.join(ON_BAD_FILE)}")
    if cfg.non_grayscale not in NON_GRAYSCALE:
        raise ConfigError(f"non_grayscale: unknown policy {cfg.non_grayscale!r}; "
                          f"expected one of {', '.join(NON_GRAYSCALE)}")
    if cfg.image_shape and (len(cfg.image_shape) != 2 or min(cfg.image_shape) <= 0):
        raise ConfigError(f"image_shape: expected two positive sizes [H, W] (or none), got {cfg.image_shape}")
    if cfg.device not in DEVICES:
        raise ConfigError(f"device: unknown device {cfg.device!r}; expected one of {', '.join(DEVICES)}")
    if not cfg.metrics:
        raise ConfigError(f"metrics: expected at least one of {', '.join(METRICS)}")
    for metric in cfg.metrics:
        if metric not in METRICS:
            raise ConfigError(f"metrics: unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    if len(set(cfg.metrics)) != len(cfg.metrics):
        raise ConfigError(f"metrics: each metric at most once, got {cfg.metrics}")
    if cfg.classes and len(cfg.classes) < 2 and cfg.classes != ["all"]:
        raise ConfigError(f"classes: expected at least two class names or all, got {cfg.classes}")
    if len(set(cfg.classes)) != len(cfg.classes):
        raise ConfigError(f"classes: each class at most once, got {cfg.classes}")
    if cfg.train_split and cfg.train_split == cfg.eval_split:
        raise ConfigError(f"eval_split: must differ from train_split ({cfg.train_split!r})")


def load_file(path: str | Path) -> dict:
    """Read a TOML config file into a {key: value} dict, rejecting unknown keys."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config: file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {path} is not valid TOML: {e}") from None
    known = _fields()
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown key {key!r}; expected one of {', '.join(known)}")
        values[key] = _coerce(key, value)
    return values


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """A parser with --config plus one --key-name flag per Config field (default: not given)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None,
                        help="TOML config file (default: none; every key keeps its default unless set)")
    for name in _fields():
        kind = _field_type(name)
        flag = "--" + name.replace("_", "-")
        if typing.get_origin(kind) is list:
            parser.add_argument(flag, dest=name, nargs="+", default=None, metavar=name.upper(),
                                help=f"{name} (space- or comma-separated)")
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=name)
    return parser


def from_args(args: argparse.Namespace) -> Config:
    """Defaults, then the config file, then command-line flags: the last one given wins."""
    values = load_file(args.config) if args.config else {}
    for name in _fields():
        given = getattr(args, name, None)
        if given is not None:
            if isinstance(given, list):
                given = " ".join(given)
            values[name] = _coerce(name, given)
    return Config(**values)


def load(path: str | Path | None = None, **overrides) -> Config:
    """Config from a file (default: none, the defaults above) with keyword overrides."""
    values = load_file(path) if path else {}
    for name, value in overrides.items():
        if name not in _fields():
            raise ConfigError(f"unknown key {name!r}; expected one of {', '.join(_fields())}")
        values[name] = _coerce(name, value)
    return Config(**values)
