"""An ImageNet-shaped set of JPEGs, made here with NumPy and Pillow: deterministic, any size.

    python benchmarks/many_classes/imagenet_like.py --work /dev/shm/many-classes \
        --classes 1000 --train 8 --val 2

ImageNet-1k's layout and names: <work>/imagenet-like/train/<wnid>/<wnid>_<i>.JPEG and
val/<wnid>/ILSVRC2012_val_<n>.JPEG, class folders named like WordNet ids (n01440764). Sizes
vary per image, each side in [--min-side, --max-side] around a mean of --mean-width x
--mean-height (ImageNet's train images average about 400x350); quality-90 4:2:0 JPEGs, a few
gray (--gray, a fraction) and a few CMYK (--cmyk), as in ImageNet. Each class has a pattern of
its own (a coarse colour field near a shared one), each image that pattern perturbed, upscaled
and noised, so the nearest-mean classifier is well above chance but not perfect. A marker file records
the arguments: a second call with the same ones returns at once.
"""

from __future__ import annotations

import argparse
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

NAME = "imagenet-like"
PATTERN = 2  # the version of render(): a set made by another is made again


@dataclass(frozen=True)
class Spec:
    classes: int = 1000
    train: int = 8  # images per class in train/
    val: int = 2  # images per class in val/
    min_side: int = 120
    max_side: int = 500
    mean_width: int = 400
    mean_height: int = 350
    gray: float = 0.02  # fraction of images saved as 8-bit gray JPEGs
    cmyk: float = 0.01  # fraction saved as CMYK JPEGs
    seed: int = 37

    @property
    def stamp(self) -> str:
        return " ".join(f"{k}={v}" for k, v in asdict(self).items()) + f" pattern={PATTERN}\n"


def wnids(spec: Spec) -> list[str]:
    """Class folder names like ImageNet's: sorted, distinct, n + 8 digits."""
    rng = np.random.default_rng(spec.seed)
    return [f"n{x:08d}" for x in sorted(rng.choice(np.arange(1_440_764, 15_075_141), spec.classes, replace=False))]


def plan_files(spec: Spec) -> list[tuple[str, int, int, int, int, str]]:
    """(relative path, class index, width, height, image seed, mode) of every file."""
    rng = np.random.default_rng(spec.seed + 1)
    names, files, val_number = wnids(spec), [], 0
    for split, per_class in (("train", spec.train), ("val", spec.val)):
        for c, wnid in enumerate(names):
            for i in range(per_class):
                if split == "train":
                    name = f"{wnid}_{i + 1}.JPEG"
                else:
                    val_number += 1
                    name = f"ILSVRC2012_val_{val_number:08d}.JPEG"
                w = int(np.clip(round(rng.normal(spec.mean_width, 90)), spec.min_side, spec.max_side))
                h = int(np.clip(round(rng.normal(spec.mean_height, 90)), spec.min_side, spec.max_side))
                roll = rng.random()
                mode = "L" if roll < spec.gray else "CMYK" if roll < spec.gray + spec.cmyk else "RGB"
                files.append((f"{split}/{wnid}/{name}", c, w, h, int(rng.integers(1 << 31)), mode))
    return files


def class_pattern(spec: Spec, c: int) -> np.ndarray:
    """float64 [6, 6, 3]: class c's coarse colour field, one shared field plus the class's own
    departure from it (so that classes are alike, as photos are: at 1,000 classes the nearest
    mean is right for about 85 % of val images, not all)."""
    shared = np.random.default_rng(spec.seed).uniform(60, 200, (6, 6, 3))
    return shared + np.random.default_rng((spec.seed, c)).normal(0, 30, (6, 6, 3))


def render(spec: Spec, c: int, width: int, height: int, seed: int) -> np.ndarray:
    """uint8 [height, width, 3]: class c's pattern, perturbed, upscaled (bicubic) and noised."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = np.clip(class_pattern(spec, c) + rng.normal(0, 50, (6, 6, 3)), 0, 255).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BICUBIC),
                       dtype=np.float32)
    noise = rng.normal(0, 14, (height, width, 3)).astype(np.float32)
    return np.clip(field + noise, 0, 255).astype(np.uint8)


def _write(args: tuple) -> int:
    spec, root, files = args
    from PIL import Image

    written = 0
    for path, c, w, h, seed, mode in files:
        image = Image.fromarray(render(spec, c, w, h, seed), "RGB")
        if mode != "RGB":
            image = image.convert(mode)
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target, format="JPEG", quality=90)
        written += target.stat().st_size
    return written


def make(work: Path, spec: Spec, workers: int | None = None) -> Path:
    """The set under work/imagenet-like (made once per spec); its root."""
    root = work / NAME
    marker = root / ".spec"
    if marker.is_file() and marker.read_text() == spec.stamp:
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    files = plan_files(spec)
    workers = workers or min(4, os.cpu_count() or 1)
    pieces = [(spec, root, files[i::workers * 8]) for i in range(workers * 8)]
    with ProcessPoolExecutor(workers) as pool:
        total = sum(pool.map(_write, pieces))
    marker.write_text(spec.stamp)
    (root / ".bytes").write_text(f"{total}\n")
    return root


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Spec()
    parser.add_argument("--classes", type=int, default=defaults.classes, help="class folders")
    parser.add_argument("--train", type=int, default=defaults.train, help="train images per class")
    parser.add_argument("--val", type=int, default=defaults.val, help="val images per class")
    parser.add_argument("--min-side", type=int, default=defaults.min_side, help="smallest side, pixels")
    parser.add_argument("--max-side", type=int, default=defaults.max_side, help="largest side, pixels")
    parser.add_argument("--mean-width", type=int, default=defaults.mean_width, help="mean width, pixels")
    parser.add_argument("--mean-height", type=int, default=defaults.mean_height, help="mean height, pixels")
    parser.add_argument("--gray", type=float, default=defaults.gray, help="fraction of gray JPEGs")
    parser.add_argument("--cmyk", type=float, default=defaults.cmyk, help="fraction of CMYK JPEGs")
    parser.add_argument("--seed", type=int, default=defaults.seed)


def spec_from(args: argparse.Namespace) -> Spec:
    return Spec(args.classes, args.train, args.val, args.min_side, args.max_side, args.mean_width, args.mean_height,
                args.gray, args.cmyk, args.seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--work", type=Path, default=Path("/dev/shm/many-classes"))
    args = parser.parse_args()
    spec = spec_from(args)
    root = make(args.work, spec)
    files = plan_files(spec)
    sizes = np.array([(w, h) for _, _, w, h, _, _ in files])
    modes = {m: sum(1 for f in files if f[5] == m) for m in ("RGB", "L", "CMYK")}
    print(f"{root}: {len(files):,} JPEGs in {spec.classes} classes ({spec.train} train + {spec.val} val each), "
          f"mean {sizes[:, 0].mean():.0f}x{sizes[:, 1].mean():.0f} (WxH), {modes}, "
          f"{int((root / '.bytes').read_text()) / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
