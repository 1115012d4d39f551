"""Dirty data through the real job (jobs/evaluate.py, a real local Ray) in both policies.

The corpus is built here, at test time: a clean ImageFolder plus one file for each way a
file can be bad, files that are not images at all, and names that must simply work.
"""

import io
import json
import os
import shutil
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

import mnist37
from mnist37.config import load
from mnist37.plan import plan
from mnist37 import DatasetError
from mnist37.locate import locate
from mnist37.job import parse_args
from tests.conftest import make_image_folder, write_png
from tests.test_evaluate_job import run_job

ROOT = os.geteuid() == 0


def png(array, mode=None, fmt="PNG"):
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buffer, format=fmt)
    return buffer.getvalue()


def bomb():
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


def build_corpus(root):
    """Returns {relative path: reason} of every file the job must reject."""
    make_image_folder(root, {"train": {"3": 20, "7": 20}, "valid": {"3": 8, "7": 8}})
    img = np.random.default_rng(5).integers(0, 256, (8, 8), dtype=np.uint8)
    good = png(img)
    bad = {
        "train/3/truncated.png": (good[:-30], "truncated PNG"),
        "train/3/empty.png": (b"", "empty file (0 bytes)"),
        "train/3/random.png": (os.urandom(256), "not an image"),
        "train/3/anim.png": (png(img, mode="P", fmt="GIF"), "expected 8-bit grayscale, found palette"),
        "train/7/rgb.png": (png(img, "RGB"), "expected 8-bit grayscale, found RGB"),
        "train/7/rgba.png": (png(img, "RGBA"), "expected 8-bit grayscale, found RGBA"),
        "train/7/palette.png": (png(img, "P"), "expected 8-bit grayscale, found palette"),
        "train/7/deep.png": (png(img.astype(np.uint16) * 257, "I;16"), "expected 8-bit grayscale, found 16-bit grayscale"),
        "valid/3/big.png": (png(np.zeros((12, 10), dtype=np.uint8)), "expected 8x8, found 12x10"),
        "valid/3/bomb.png": (bomb(), "expected 8x8, found 100000x100000"),
        "valid/7/also bad ü.png": (good[:40], "truncated PNG"),
    }
    for path, (data, _) in bad.items():
        (root / path).write_bytes(data)
    reasons = {path: reason for path, (_, reason) in bad.items()}
    os.symlink("loop.png", root / "valid/7/loop.png")
    reasons["valid/7/loop.png"] = "cannot read file (Too many levels of symbolic links)"
    os.mkdir(root / "valid/7/notes.png")  # a folder with an image's name is not a file: ignored
    if not ROOT:  # root reads a chmod 000 file anyway; tests/test_decode.py covers it as nobody
        write_png(root / "valid/7/secret.png", img)
        os.chmod(root / "valid/7/secret.png", 0)
        reasons["valid/7/secret.png"] = "cannot read file (Permission denied)"
    for junk in ("labels.csv", ".DS_Store", "Thumbs.db"):
        (root / "train/3" / junk).write_bytes(b"not an image")
    write_png(root / "train/7/with space é.png", img)  # good names that must simply work
    write_png(root / "valid/3/日本 3.png", img)
    # A gray JPEG named .png: decoded by its bytes, used, and listed as what it is.
    (root / "train/3/photo.png").write_bytes(png(img, fmt="JPEG"))
    return reasons


def clean_copy(root, target, reasons):
    shutil.copytree(root, target, symlinks=True)
    for path in [*reasons, "valid/7/loop.png"]:
        if os.path.lexists(target / path):
            os.unlink(target / path)
    return target


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("dirty") / "data"
    return root, build_corpus(root)


@pytest.fixture(scope="module")
def skipped(corpus, tmp_path_factory):
    root, _ = corpus
    out = tmp_path_factory.mktemp("skip")
    run = run_job("--data", str(root), "--out", str(out), "--on-bad-file", "skip", "--chunk-dir", str(out / "chunks"))
    return run, json.loads((out / "results.json").read_text()) if run.returncode == 0 else None


@pytest.mark.ray
def test_error_policy_lists_every_bad_file_and_stops(corpus, tmp_path):
    root, reasons = corpus
    run = run_job("--data", str(root), "--out", str(tmp_path), "--chunk-dir", str(tmp_path / "chunks"))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert not (tmp_path / "results.json").exists()  # no accuracy computed
    found = 20 + 20 + 8 + 8 + len(reasons) + 3  # + the two good oddly named files and the JPEG named .png
    assert f"error: {len(reasons)} of {found} image files cannot be used (on_bad_file = error" in run.stderr
    listed = [line.strip() for line in run.stderr.splitlines() if line.startswith("  ")]
    assert listed == [f"{path}: {reason}" for path, reason in sorted(reasons.items())]


@pytest.mark.ray
def test_error_policy_caps_the_list(corpus, tmp_path):
    root, reasons = corpus
    many = tmp_path / "many"
    shutil.copytree(root, many, symlinks=True)
    for i in range(30):
        (many / "train/3" / f"junk{i:02d}.png").write_bytes(b"junk")
    run = run_job("--data", str(many), "--out", str(tmp_path / "out"), "--chunk-dir", str(tmp_path / "chunks"))
    listed = [line for line in run.stderr.splitlines() if line.startswith("  ")]
    assert run.returncode == 1 and len(listed) == 21
    assert listed[-1] == f"  ... and {len(reasons) + 30 - 20} more"


@pytest.mark.ray
def test_skip_policy_lists_rejections_with_reasons(skipped, corpus):
    run, results = skipped
    _, reasons = corpus
    assert run.returncode == 0, run.stderr
    assert {r["path"]: r["reason"] for r in results["rejected"]} == reasons
    assert [r["path"] for r in results["rejected"]] == sorted(reasons)
    assert results["formats_by_content"] == [{"path": "train/3/anim.png", "found": "GIF data named .png"},
                                             {"path": "train/3/photo.png", "found": "JPEG data named .png"}]


@pytest.mark.ray
def test_files_found_equal_used_plus_rejected_per_split_and_class(skipped, corpus):
    run, results = skipped
    _, reasons = corpus
    per_class = {}
    for path in reasons:
        split, name = path.split("/")[:2]
        per_class[(split, name)] = per_class.get((split, name), 0) + 1
    for split, classes in results["files"].items():
        for name, a in classes.items():
            assert a["found"] == a["used"] + a["rejected"]
            assert a["rejected"] == per_class.get((split, name), 0)
            assert a["used"] == results["counts"][split][name]
            line = next(line for line in run.stdout.splitlines() if line.startswith(f"{split}/{name} "))
            assert line.split()[1:] == [str(a["found"]), str(a["used"]), str(a["rejected"]), str(a["ignored"])]
    assert results["files"]["train"]["3"]["ignored"] == 3  # labels.csv, .DS_Store, Thumbs.db
    assert results["files"]["valid"]["7"]["ignored"] == 1  # the folder named notes.png
    assert results["counts"] == {"train": {"3": 21, "7": 21}, "valid": {"3": 9, "7": 8}}
    assert f"= {sum(sum(c.values()) for c in results['counts'].values())} used + {len(reasons)} rejected" in run.stdout


@pytest.mark.ray
def test_results_on_good_files_equal_a_clean_copy(skipped, corpus, ray_local, tmp_path):
    _, results = skipped
    root, reasons = corpus
    clean = clean_copy(root, tmp_path / "clean", reasons)
    # in this process on the session's Ray (mnist37.evaluate runs the job's main)
    cleaned = mnist37.evaluate(clean, out=tmp_path / "out", chunk_dir=str(tmp_path / "chunks")).results
    assert cleaned["rejected"] == []
    assert cleaned["metrics"] == results["metrics"] and cleaned["counts"] == results["counts"]
    assert cleaned["prototypes_sha256"] == results["prototypes_sha256"]


@pytest.mark.ray
def test_convert_policy_takes_the_color_pngs(corpus, ray_local, tmp_path):
    root, reasons = corpus
    results = mnist37.evaluate(root, out=tmp_path / "out", on_bad_file="skip", non_grayscale="convert",
                               chunk_dir=str(tmp_path / "chunks")).results  # in this process, the session's Ray
    converted = {p for p, r in reasons.items() if r.startswith("expected 8-bit grayscale")}
    assert {r["path"] for r in results["rejected"]} == set(reasons) - converted
    assert results["counts"]["train"]["7"] == 21 + 4


def cfg_for(root, **overrides):
    return load(data=str(root), **overrides)


def test_layout_problems_are_one_line_errors(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train": {"3": 2, "7": 2}, "valid": {"3": 2, "7": 2, "9": 2}})
    (root / "valid" / "5").mkdir()
    (root / "train" / "5").mkdir()
    cases = [
        (cfg_for(root, classes="3 7 9"), r"^Class '9' has no folder under train/; found: 3, 5, 7$"),
        (cfg_for(root, eval_split="test"), r"^Split folder 'test' not found under .*; found: train, valid$"),
        (cfg_for(root, classes="3 5", train_split="valid", eval_split="train"), r"^Class '5' has no images under valid/$"),
    ]
    for cfg, message in cases:
        with pytest.raises(DatasetError, match=message):
            plan(locate(cfg))


@pytest.mark.ray
def test_a_training_class_with_every_file_rejected(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train": {"3": 3, "7": 2}, "valid": {"3": 2, "7": 2}})
    for f in (root / "train" / "7").iterdir():
        f.write_bytes(b"")
    run = run_job("--data", str(root), "--out", str(tmp_path / "out"), "--on-bad-file", "skip")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "error: Class '7' has no usable images under train/ (all 2 rejected)" in run.stderr


def test_missing_split_and_broken_archives_through_the_job(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train": {"3": 2, "7": 2}})
    run = run_job("--ray-address", "local", "--data", str(root), "--out", str(tmp_path / "o1"))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert f"error: Split folder 'valid' not found under {root}; found: train" in run.stderr
    with tarfile.open(tmp_path / "ok.tgz", "w:gz") as tar:
        tar.add(make_image_folder(tmp_path / "e", {"train": {"3": 30, "7": 30}}), arcname="e")
    whole = (tmp_path / "ok.tgz").read_bytes()
    (tmp_path / "cut.tgz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "fake.tgz").write_bytes(b"not an archive")
    for name in ("cut.tgz", "fake.tgz"):
        run = run_job("--ray-address", "local", "--data", str(tmp_path / name), "--out", str(tmp_path / "o2"), "--cache-dir", str(tmp_path / "cache"))
        assert run.returncode == 1 and "Traceback" not in run.stderr
        assert f"error: {tmp_path / name}: not a readable .tgz/.tar archive" in run.stderr
    assert list((tmp_path / "cache" / "extracted").iterdir()) == []  # nothing half-extracted to trust


@pytest.mark.parametrize("argv, message", [
    (["--colour", "red"], "unrecognized arguments: --colour red"),
    (["--shard-size", "-2"], "shard_size: expected a positive number of images or 0 (auto), got -2"),
    (["--shard-size", "many"], "shard_size: expected an integer, got 'many'"),
    (["--metrics", "l3"], "metrics: unknown metric 'l3'; expected one of l1, l2"),
    (["--device", "tpu"], "device: unknown device 'tpu'; expected one of auto, cpu, cuda"),
    (["--on-bad-file", "ignore"], "on_bad_file: unknown policy 'ignore'; expected one of error, skip"),
    (["--non-grayscale", "keep"], "non_grayscale: unknown policy 'keep'; expected one of reject, convert"),
    (["--image-shape", "28"], r"image_shape: expected two positive sizes [H, W] (or none), got [28]"),
    (["--reuse-chunks", "maybe"], "reuse_chunks: expected true or false, got 'maybe'"),
])
def test_bad_flags_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_args(argv)  # what jobs/evaluate.py does first, in-process
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert [line for line in err.splitlines() if "error:" in line] == [err.splitlines()[-1]]  # one line, last
