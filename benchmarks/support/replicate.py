"""Scaled data sets for the benchmarks: an ImageFolder replicated N times (benchmarks/seed_vs_job,
benchmarks/jpeg_job).

Replica r of `<split>/<class>/<name>` is `<split>/<class>/r<r>-<name>`; files are hard links
where the filesystem allows (no extra disk, no copy time), copies otherwise. Every replica has
the same pixels, so prototypes and accuracies do not change with N.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def replicate(source: Path, target: Path, copies: int, splits: list[str], classes: list[str]) -> dict:
    """Fill `target` with `copies` replicas of `source`'s split/class folders; idempotent.

    Returns {"files": created or already there, "reused": bool} and, when it made them,
    "linked" (hard links, not copies). A finished target carries a marker file naming its
    source and copies, so a rerun with the same arguments is instant.
    """
    if copies < 1:
        raise ValueError(f"copies: expected a positive count, got {copies}")
    marker = target / ".mnist37-replica"
    stamp = f"{source.resolve()}\n{copies}\n{','.join(splits)}\n{','.join(classes)}\n"
    if marker.is_file() and marker.read_text() == stamp:
        return {"files": _count(target, splits, classes), "reused": True}
    if target.exists():
        shutil.rmtree(target)
    linked, files = True, 0
    for split in splits:
        for name in classes:
            src_dir, dst_dir = source / split / name, target / split / name
            dst_dir.mkdir(parents=True)
            originals = sorted(e.name for e in os.scandir(src_dir) if e.is_file())
            for r in range(copies):
                for original in originals:
                    src, dst = src_dir / original, dst_dir / f"r{r:03d}-{original}"
                    if linked:
                        try:
                            os.link(src, dst)
                        except OSError:
                            linked = False
                    if not linked:
                        shutil.copyfile(src, dst)
                    files += 1
    marker.write_text(stamp)
    log.info("replicated %s x%d into %s: %d files (%s)", source, copies, target, files,
             "hard links" if linked else "copies")
    return {"files": files, "reused": False, "linked": linked}


def _count(target: Path, splits: list[str], classes: list[str]) -> int:
    return sum(len(os.listdir(target / split / name)) for split in splits for name in classes)
