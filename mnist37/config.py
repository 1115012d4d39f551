"""Typed job configuration: defaults here, overrides from a TOML file, then the command line.

The defaults are the package's own (no file is read unless --config names one), so an installed
mnist37 runs without this repository; configs/*.toml are short commented examples.

Every field of `Config` is a config-file key (`shard_size`) and a command-line flag
(`--shard-size`); its metadata holds its command line (group, one line of help, the values it
allows), from which `build_parser` makes each entry point's flags and --help. Unknown keys and
bad values raise `ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mnist37 import Mnist37Error, sources
from mnist37.storage.locations import secret_part

METRICS = ("l1", "l2")
DEVICES = ("auto", "cpu", "cuda")
ON_BAD_FILE = ("error", "skip")
CHUNK_TRANSPORTS = ("auto", "filesystem", "object_store")
NON_GRAYSCALE = ("reject", "convert")
CHANNELS = ("auto", "gray", "rgb")
RESIZE_FILTERS = ("bilinear", "nearest", "bicubic", "lanczos", "box")


class _FormatChoices(Sequence):
    """The format key's choices: "auto" and the sources table's formats, read at each use, so a
    format added to the table (mnist37.sources.FORMATS) is a choice without a change here."""

    def __getitem__(self, i):
        return ("auto", *sources.FORMATS)[i]

    def __len__(self) -> int:
        return 1 + len(sources.FORMATS)


FORMATS = _FormatChoices()
PREDICTIONS = ("none", "brief", "full")
# top_k = -1 (auto): top-DEFAULT_TOP_K accuracy with at least TOP_K_MIN_CLASSES classes, else none
# (ImageNet's top-5 among 1,000 classes; among 2 or 3 it says little). docs/output.md says why.
DEFAULT_TOP_K = 5
TOP_K_MIN_CLASSES = 10
# The keys that name a location (a path or a URI): none may carry a credential.
LOCATIONS = ("data", "out", "chunk_dir", "cache_dir")


# The groups --help lists the flags in, in this order; each field names its group.
DATA, DECODING, CLASSIFY, RAY, OUTPUT = "data", "decoding", "classify", "Ray", "output"
GROUPS = {
    DATA: "what is read, and which part of it",
    DECODING: "how images become Arrow chunks",
    CLASSIFY: "the distance classifier",
    RAY: "the cluster and its tasks",
    OUTPUT: "what is written",
}


class ConfigError(Mnist37Error, ValueError):
    """A config key is unknown or has a value outside what it allows."""


def _flag(group: str, help: str, *, choices: tuple[str, ...] = (), metavar: str | None = None,
          empty: str | None = None) -> dict:
    """A field's command line, kept in its metadata: its --help group, one line of help, the
    values it allows (checked by `validate`, shown by --help), the name of its value, and
    what an empty default means."""
    return {"group": group, "help": help, "choices": choices, "metavar": metavar, "empty": empty}


def _list_flag(group: str, help: str, *, metavar: str, empty: str) -> list:
    """A list field, empty by default (what that means: `empty`), with its command line."""
    return field(default_factory=list, metadata=_flag(group, help, metavar=metavar, empty=empty))


@dataclass
class Config:
    # A data set in ImageFolder layout, <root>/<split>/<class>/*.png: a folder, a .tgz/.tar.gz,
    # or a name (mnist_sample, mnist, mnist_tiny) downloaded from fastai's archives; or a
    # folder of Parquet files, WebDataset tar shards or IDX files (see `format`).
    data: str = field(default="mnist_sample", metadata=_flag(
        DATA, "a folder, .tgz, URI, or data set name: mnist_sample, mnist, mnist_tiny"))
    # Output folder: results.json, prototype PNGs, the accuracy table.
    out: str = field(default="runs/latest", metadata=_flag(
        OUTPUT, "folder (or URI) for results.json, prototype PNGs, the accuracy table", metavar="DIR"))
    # What `data` holds: "folder" (ImageFolder PNGs), "parquet" (Hugging Face datasets layout),
    # "webdataset" (tar shards of <key>.png + <key>.cls), "idx" (MNIST's own files); "auto"
    # tells them apart by the files there (README: Formats).
    format: str = field(default="auto", metadata=_flag(
        DATA, "what --data holds; auto tells the formats apart by its files", choices=FORMATS))
    # Parquet columns: encoded image bytes (a struct with a `bytes` field, or binary) and the
    # integer label.
    image_column: str = field(default="image", metadata=_flag(
        DATA, "Parquet column of encoded image bytes", metavar="COLUMN"))
    label_column: str = field(default="label", metadata=_flag(
        DATA, "Parquet column of integer labels", metavar="COLUMN"))
    # Where Arrow tensor chunks are kept: a path or a pyarrow filesystem URI (file://, s3://,
    # gs://, hdfs://); empty means <cache_dir>/chunks/<data root name>-<hash>, shared by every
    # run over the same data root.
    chunk_dir: str = field(default="", metadata=_flag(
        DECODING, "where Arrow chunks are kept: a path or URI (file://, s3://, gs://, hdfs://)",
        metavar="DIR", empty="<cache_dir>/chunks/<data root name>-<hash>"))
    # How chunks reach classify tasks: "filesystem" (chunk_dir, which every node must reach:
    # one machine, a shared mount, or a URI), "object_store" (Ray carries each evaluation
    # chunk's bytes; for nodes that share no disk), "auto" (object_store on a multi-node
    # cluster unless chunk_dir is a URI, else filesystem).
    chunk_transport: str = field(default="auto", metadata=_flag(
        RAY, "how chunks reach classify tasks; auto: object_store on a multi-node cluster "
        "unless --chunk-dir is a URI", choices=CHUNK_TRANSPORTS))
    # Reuse a shard's chunk when its files (paths, sizes, modification times) are unchanged,
    # and a class folder's listing while the folder is (both kept in a local chunk_dir).
    reuse_chunks: bool = field(default=True, metadata=_flag(
        DECODING, "reuse a shard's chunk and a folder's listing while their files are unchanged"))
    # Check every chunk against its checksum when it is used (a damaged one is decoded again).
    # false skips the hashing, for measuring what it costs (~1-2% of a warm run): a damaged
    # chunk is then trusted silently.
    verify_chunks: bool = field(default=True, metadata=_flag(
        DECODING, "check every chunk against its checksum when it is used"))
    # Where archives are extracted; empty means $MNIST37_CACHE, else $XDG_CACHE_HOME/mnist37,
    # else ~/.cache/mnist37.
    cache_dir: str = field(default="", metadata=_flag(
        DATA, "where archives are extracted", metavar="DIR",
        empty="$MNIST37_CACHE, else $XDG_CACHE_HOME/mnist37, else ~/.cache/mnist37"))
    # Split whose images are averaged into prototypes, and split that is classified. Empty: a
    # named data set's own (mnist: training / testing), else train / valid.
    train_split: str = field(default="", metadata=_flag(
        DATA, "split averaged into prototypes", metavar="SPLIT",
        empty="training for mnist, else train"))
    eval_split: str = field(default="", metadata=_flag(
        DATA, "split that is classified", metavar="SPLIT",
        empty="testing for mnist, else valid"))
    # Class folder names, in the order used for indices and confusion rows; ["all"] takes every
    # class folder of the training split, sorted. Empty: a named data set's own (mnist: all),
    # else ["3", "7"], fastbook's pair.
    classes: list[str] = _list_flag(
        DATA, "class folder names, in confusion-row order; all: every class of the training split",
        metavar="CLASS", empty="all for mnist, else 3 7")
    # What a file that cannot be used does to the job: "error" stops it before any accuracy
    # is computed and lists every such file; "skip" leaves them out and lists them in
    # results.json. Either way files found = images used + files rejected.
    on_bad_file: str = field(default="error", metadata=_flag(
        DECODING, "a file that cannot be used: stop the job listing every one, or leave them out",
        choices=ON_BAD_FILE))
    # PNGs that are not 8-bit grayscale (RGB, RGBA, palette, 16-bit, 1-bit): "reject" them as
    # bad files, or "convert" them as Pillow's "L" mode does (luma for color, alpha dropped,
    # 16-bit values clipped at 255).
    non_grayscale: str = field(default="reject", metadata=_flag(
        DECODING, "in a gray data set (channels auto), images that are not 8-bit grayscale: reject as bad "
        "files, or convert as Pillow's L mode", choices=NON_GRAYSCALE))
    # Channels every image is converted to, as Pillow's convert("L") / convert("RGB") (CMYK,
    # palette, alpha and 16-bit included; alpha dropped); converted images are used and counted
    # per kind. auto: gray when most of the first training images are gray (the others then
    # follow `non_grayscale`), else rgb.
    channels: str = field(default="auto", metadata=_flag(
        DECODING, "channels every image is converted to; auto: as most of the first training images",
        choices=CHANNELS))
    # [H, W] every image must have, others rejected; empty takes the first training image's.
    image_shape: list[int] = _list_flag(
        DECODING, "H W every image must have (others rejected; see --image-size to resize)", metavar="N",
        empty="the first training image's")
    # [H, W] every image is resized to, after conversion, with Image.resize((W, H), filter);
    # exclusive with image_shape (which rejects other sizes instead).
    image_size: list[int] = _list_flag(
        DECODING, "H W (or HxW) every image is resized to, after conversion (Pillow's Image.resize)",
        metavar="N", empty="no resizing")
    resize_filter: str = field(default="bilinear", metadata=_flag(
        DECODING, "the filter --image-size resizes with", choices=RESIZE_FILTERS))
    # With image_size: decode each JPEG for its target size through libjpeg-turbo's DCT
    # scaling (Pillow's draft, at 1/2, 1/4 or 1/8 while still at least image_size), then
    # resize; several times faster on photos much larger than image_size, and not the same
    # pixels as the full decode (false, the default): see docs/formats.md.
    jpeg_draft: bool = field(default=False, metadata=_flag(
        DECODING, "with --image-size, decode JPEGs for their target size first (Pillow's draft: faster, "
        "other pixels)"))
    # Names of the classes of label-only formats (IDX, WebDataset .cls without classes.txt,
    # numbered class folders), in label order: a list, or "@file" with one name per line.
    # Tables, report.html and results.json show them.
    class_names: list[str] = _list_flag(
        CLASSIFY, "names of label values 0, 1, ...: a comma list, or @FILE with one a line",
        metavar="NAME", empty="the class names the data set has")
    # Images per shard, i.e. per Ray task and per Arrow chunk. 8192 MNIST images are ~100 ms
    # of decode, so Ray's few ms per task stay ~2-4% and the last task ends soon after the
    # rest. Measured when it was chosen (commit a4e781f, before chunk reuse by listing and
    # checksums), at 1.44M images on 2 cores (cold / warm whole-job s): 2048: 20.2 / 10.8,
    # 4096: 21.1 / 9.7, 8192: 20.0 / 10.4, 16384: 18.2 / 8.9; larger shards leave a big
    # cluster's cores idle on mid-size data sets. Fixed, not derived from the data size, so
    # adding files does not move every shard boundary (and re-decode everything).
    # 0 (auto): 8192, or fewer where --image-size or --image-shape says 8192 images would
    # decode to more than SHARD_BYTES (the largest power of two that fits: 1,024 at 64x64
    # color, 64 at 224x224): a task's memory and time follow its pixels, not its image count
    # (mnist37.plan.images_per_shard). Derived from the configuration alone, never from the
    # data or the cluster, so a rerun finds its chunks under the same names.
    shard_size: int = field(default=0, metadata=_flag(
        DECODING, "images per shard: per decode task and per Arrow chunk; 0: 8192, fewer where --image-size "
                  "or --image-shape makes them over 16 MiB decoded", metavar="IMAGES"))
    # Distance metrics to report: l1 = mean absolute difference (fastbook's), l2 = RMS difference.
    metrics: list[str] = field(default_factory=lambda: list(METRICS), metadata=_flag(
        CLASSIFY, "distances to report: l1 mean absolute difference, l2 RMS difference", choices=METRICS))
    # Misclassified images per class and metric shown in report.html, closest to the decision
    # boundary and farthest from it.
    report_examples: int = field(default=4, metadata=_flag(
        OUTPUT, "misclassified images per class and metric shown in report.html", metavar="N"))
    # Per-image predictions under <out>/predictions/, one Parquet file per evaluation chunk:
    # "brief" (path, split, true class, per metric the predicted class, the distance to the
    # true prototype and the margin), "full" (also the distances to every prototype and, with
    # top_k, whether the true class was among the k nearest), "none". docs/output.md.
    predictions: str = field(default="brief", metadata=_flag(
        OUTPUT, "per-image predictions under <out>/predictions/: brief, full (distances to every prototype), none",
        choices=PREDICTIONS))
    # Top-k accuracy beside top-1, per metric: -1 = 5 with at least 10 classes, else none; 0 = none.
    top_k: int = field(default=-1, metadata=_flag(
        CLASSIFY, "K of the top-K accuracy reported beside top-1; 0: none; -1: 5 with at least 10 classes, "
                  "else none", metavar="K"))
    # Where distances are computed: auto = CUDA when the task sees a CUDA device.
    device: str = field(default="auto", metadata=_flag(
        CLASSIFY, "where distances are computed; auto: CUDA where the task sees one", choices=DEVICES))
    # GPU fraction each classification task asks Ray for, when the cluster has GPUs.
    gpus_per_task: float = field(default=0.25, metadata=_flag(
        CLASSIFY, "GPU fraction each classify task asks Ray for, on a cluster with GPUs", metavar="FRACTION"))
    # Most Ray tasks submitted and not yet finished; 0 = twice the cluster's CPUs.
    max_in_flight: int = field(default=0, metadata=_flag(
        RAY, "most Ray tasks submitted and not yet finished; 0: twice the cluster's CPUs", metavar="TASKS"))
    # Start Ray's dashboard (on 127.0.0.1) when the job starts its own local Ray; off, a
    # local start is ~0.8 s faster. A cluster's dashboard is the cluster's business.
    ray_dashboard: bool = field(default=False, metadata=_flag(
        RAY, "start Ray's dashboard (on 127.0.0.1) when the job starts its own local Ray"))
    # Ray cluster to join; empty lets ray.init() decide (RAY_ADDRESS, a running local
    # cluster, else a new local Ray); "local" always starts a new local Ray.
    ray_address: str = field(default="", metadata=_flag(
        RAY, "Ray cluster to join; local: always a new local Ray", metavar="ADDRESS",
        empty="RAY_ADDRESS, else a cluster `ray start` left on this machine, else a new local Ray"))

    # Seconds the job waits on Ray with nothing finishing (no task done, Ray not answering,
    # Ray not started or joined yet) before it stops with one line naming what never finished
    # and the likely cause; while it waits it says what is outstanding every 30 s. A slow job
    # that still finishes tasks is never stopped by it.
    stall_timeout_s: float = field(default=300.0, metadata=_flag(
        RAY, "seconds with no task finishing (or Ray not yet started or joined) before the job stops, naming what "
             "it waited for", metavar="SECONDS"))
    # Seconds an object store may take to accept a connection or to answer a request
    # (silence, not transfer time) before the request is tried again; pyarrow tries each
    # request 3 times, so a store that never answers ends the job in about 3x this.
    store_timeout_s: float = field(default=12.0, metadata=_flag(
        DATA, "seconds an object store may stay silent on a request before it is tried again (3 tries)",
        metavar="SECONDS"))

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(Config)}


def _field_type(name: str) -> type:
    return typing.get_type_hints(Config)[name]


def _names_file(path: str) -> list[str]:
    """class_names from a file: one name a line, in label order (blank lines skipped)."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"class_names: cannot read @{path} ({e.strerror or e})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _coerce(name: str, value: object) -> object:
    """Convert `value` (from TOML or the command line) to the type of field `name`."""
    kind = _field_type(name)
    if typing.get_origin(kind) is list:
        if name == "class_names" and isinstance(value, str) and value.startswith("@"):
            return _names_file(value[1:])
        if name == "class_names" and isinstance(value, str) and "," in value:  # names may hold spaces
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
            if name == "image_size" and len(value) == 1 and "x" in value[0].lower():  # HxW
                value = value[0].lower().split("x")
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
    for key in LOCATIONS:
        if part := secret_part(getattr(cfg, key)):
            raise ConfigError(f"{key}: a location may not hold a credential (its {part} is refused, not shown); "
                              "give credentials through the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                              "~/.aws) instead")
    if cfg.shard_size < 0:
        raise ConfigError(f"shard_size: expected a positive number of images or 0 (auto), got {cfg.shard_size}")
    if cfg.report_examples < 0:
        raise ConfigError(f"report_examples: expected 0 or more images, got {cfg.report_examples}")
    if cfg.max_in_flight < 0:
        raise ConfigError(f"max_in_flight: expected 0 (auto) or a positive count, got {cfg.max_in_flight}")
    if cfg.stall_timeout_s <= 0:
        raise ConfigError(f"stall_timeout_s: expected a positive number of seconds, got {cfg.stall_timeout_s}")
    if cfg.store_timeout_s <= 0:
        raise ConfigError(f"store_timeout_s: expected a positive number of seconds, got {cfg.store_timeout_s}")
    if not 0 < cfg.gpus_per_task <= 1:
        raise ConfigError(f"gpus_per_task: expected a fraction in (0, 1], got {cfg.gpus_per_task}")
    if cfg.top_k < -1:
        raise ConfigError(f"top_k: expected a positive k, 0 (none) or -1 (auto), got {cfg.top_k}")
    # A key of a fixed set of values (its flag's choices), and what its error calls the value.
    for key, kind in (("chunk_transport", "transport"), ("format", "format"), ("on_bad_file", "policy"),
                      ("non_grayscale", "policy"), ("channels", "channels"), ("resize_filter", "filter"),
                      ("device", "device"), ("predictions", "choice")):
        allowed, value = _fields()[key].metadata["choices"], getattr(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}: unknown {kind} {value!r}; expected one of {', '.join(allowed)}")
    if cfg.image_shape and (len(cfg.image_shape) != 2 or min(cfg.image_shape) <= 0):
        raise ConfigError(f"image_shape: expected two positive sizes [H, W] (or none), got {cfg.image_shape}")
    if cfg.image_size and (len(cfg.image_size) != 2 or min(cfg.image_size) <= 0):
        raise ConfigError(f"image_size: expected two positive sizes H W or HxW (or none), got {cfg.image_size}")
    if cfg.image_size and cfg.image_shape:
        raise ConfigError("image_size: give image_size (resize every image to it) or image_shape (reject other "
                          "sizes), not both")
    if cfg.jpeg_draft and not cfg.image_size:
        raise ConfigError("jpeg_draft: decodes JPEGs for the size they are resized to; give image_size too")
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


class HelpFormatter(argparse.HelpFormatter):
    """--help with each flag's default at the end of its line, where it has one and its help
    does not say it already: `(default: 8192)`, a list as `3 7`."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if ("%(default)" in help or "(default:" in help or action.required or action.nargs == 0
                or action.default in (None, argparse.SUPPRESS) or action.default == []):
            return help
        return f"{help} (default: {_shown(action.default).replace('%', '%%')})"


def _shown(value: object) -> str:
    """A value as it is typed on the command line or read in a config file."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return " ".join(_shown(v) for v in value)
    return str(value)


def _flag_help(name: str, default: object = None, help: str | None = None) -> str:
    """Field `name`'s line of --help: what it is (the field's words unless `help` is given)
    and its default (the field's own unless `default` is given)."""
    meta = _fields()[name].metadata
    if default is None:
        default = getattr(Config(), name)
    shown = _shown(default) if default not in ("", []) else meta["empty"]
    return f"{help or meta['help']} (default: {shown})"


def _metavar(name: str) -> str:
    meta, kind = _fields()[name].metadata, _field_type(name)
    if meta["choices"]:
        return "{" + ",".join(meta["choices"]) + "}"
    if kind is bool:
        return "{true,false}"
    return meta["metavar"] or name.upper()


def build_parser(description: str | None = None, groups: Iterable[str] = tuple(GROUPS),
                 hidden: Iterable[str] = (), defaults: dict | None = None,
                 helps: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """A parser with --config plus one --key-name flag per Config field (default: not given),
    listed by --help under their groups. Fields outside `groups`, and those in `hidden`, are
    still accepted (every key is a flag wherever a config is read) but not listed: an entry
    point shows the flags it uses. `defaults` are the entry point's own defaults, as --help
    shows them (pass the same to `from_args`); `helps`, its own words for a flag."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter,
                                     epilog="Every flag is also a key of a --config file (--shard-size: "
                                            "shard_size). Lists take spaces or commas.")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="TOML file of config keys, read before the flags (default: none: every key keeps "
                             "its default unless set)")
    groups, hidden, defaults, helps = list(groups), set(hidden), defaults or {}, helps or {}
    sections = {group: parser.add_argument_group(group, GROUPS[group]) for group in GROUPS if group in groups}
    # Group by group, so that the usage line lists the flags in --help's order.
    for name, f in sorted(_fields().items(), key=lambda item: list(GROUPS).index(item[1].metadata["group"])):
        shown = f.metadata["group"] in sections and name not in hidden
        where = sections[f.metadata["group"]] if shown else parser
        help = _flag_help(name, defaults.get(name), helps.get(name)).replace("%", "%%") if shown else argparse.SUPPRESS
        nargs = "+" if typing.get_origin(_field_type(name)) is list else None
        where.add_argument("--" + name.replace("_", "-"), dest=name, nargs=nargs, default=None,
                           metavar=_metavar(name), help=help)
    return parser


def from_args(args: argparse.Namespace, defaults: dict | None = None) -> Config:
    """Defaults (Config's, then `defaults`, an entry point's own), then the config file, then
    command-line flags: the last one given wins."""
    values = {name: _coerce(name, value) for name, value in (defaults or {}).items()}
    values.update(load_file(args.config) if args.config else {})
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
