"""The outputs at 1,000 classes, synthesized as classify and evaluation build them (no job):
files of bounded size, the large arrays beside results.json, named by it and equal to what was
computed; and up to report.INLINE_CLASSES classes, everything inline and whole as before."""

import io
import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mnist37.examples import SIDES
from mnist37.report import EXAMPLE_CLASSES, INLINE_CLASSES, RANKED_CLASSES, confusion_image, write_outputs
from tests.many_classes import synthesize

MB = 1 << 20


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    outcome = synthesize(1000)
    out = tmp_path_factory.mktemp("many")
    printed = write_outputs(out, outcome.results, outcome.prototypes, outcome.examples, outcome.confusions)
    return outcome, out, printed


def test_report_and_results_stay_small_at_1000_classes(many):
    outcome, out, _ = many
    sizes = {name: (out / name).stat().st_size for name in ("report.html", "results.json")}
    print(f"1,000 classes: report.html {sizes['report.html'] / MB:.2f} MB, "
          f"results.json {sizes['results.json'] / MB:.2f} MB")
    assert sizes["report.html"] <= 5 * MB and sizes["results.json"] <= 5 * MB
    page = (out / "report.html").read_text()
    assert page.count("<img class=\"confusion\"") == 2 and "<table class='confusion'>" not in page
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)
    with Image.open(io.BytesIO(_data_uri_png(page, "confusion matrix, l1"))) as image:
        assert image.size == (1000, 1000)


def test_results_name_the_files_that_hold_the_arrays_and_they_load_back_equal(many):
    outcome, out, _ = many
    results = json.loads((out / "results.json").read_text())
    assert "examples" not in results
    assert all((out / name).is_file() for name in results["outputs"])
    assert sum(name.startswith("prototype_") for name in results["outputs"]) == 1000
    for metric, report in results["metrics"].items():
        assert "confusion" not in report and len(report["per_class"]) == 1000
        np.testing.assert_array_equal(np.load(out / report["confusion_file"]), outcome.confusions[metric])
        table = pq.read_table(out / report["examples_file"])
        kept = [(c, side, rank, e) for c, sides in sorted(outcome.examples.kept[metric].items())
                for side in SIDES for rank, e in enumerate(sides[side])]
        assert table.num_rows == len(kept) > 1000
        assert table.column("path").to_pylist() == [e.path for *_, e in kept]
        assert table.column("true").to_pylist() == [c for c, *_ in kept]
        assert table.column("side").to_pylist() == [side for _, side, _, _ in kept]
        assert table.column("predicted").to_pylist() == [e.predicted for *_, e in kept]
        assert table.column("margin").to_pylist() == [e.margin for *_, e in kept]
        distances = table.column("distances").to_pylist()
        assert [d is not None for d in distances] == [e.distances is not None for *_, e in kept]
        for d, (*_, e) in zip(distances, kept):
            if d is not None:
                np.testing.assert_array_equal(np.float32(d), e.distances)
    np.testing.assert_array_equal(np.load(out / "prototypes.npy"), outcome.prototypes)


def test_the_driver_keeps_pixels_and_distances_for_a_bounded_number_of_classes(many):
    outcome, _, _ = many
    examples = outcome.examples
    k, metrics = examples.k, list(outcome.confusions)
    assert 0 < len(examples.images()) <= len(metrics) * 2 * EXAMPLE_CLASSES * 2 * k
    for metric in metrics:
        classes = {c for c, sides in examples.kept[metric].items()
                   if any(e.image is not None for side in sides.values() for e in side)}
        assert 0 < len(classes) <= 2 * EXAMPLE_CLASSES
        with_distances = [e for sides in examples.kept[metric].values() for side in sides.values() for e in side
                          if e.distances is not None]
        assert all(e.distances.dtype == np.float32 and e.distances.shape == (1000,) for e in with_distances)


def test_the_printed_table_is_short_and_table_txt_whole(many):
    outcome, out, printed = many
    assert len(printed.splitlines()) <= 2 * RANKED_CLASSES + 12
    assert "the 15 worst of 1000 classes by l1:" in printed and "(every class: table.txt)" in printed
    whole = (out / "table.txt").read_text()
    for name in outcome.results["classes"]:
        assert f"\n{name}  (n=2)" in whole
    worst = printed.splitlines()[2]
    per_class = outcome.results["metrics"]["l1"]["per_class"]
    assert per_class[worst.split()[0]] == min(v for v in per_class.values() if v is not None)


def test_every_prototype_is_a_file_and_no_sheet_of_all_is_made_at_many_classes(many):
    outcome, out, _ = many
    assert not (out / "prototypes.png").exists()
    for c in (0, 999):
        with Image.open(out / f"prototype_{outcome.results['classes'][c]}.png") as image:
            expected = np.clip(np.rint(outcome.prototypes[c] * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
            np.testing.assert_array_equal(np.asarray(image), expected)


def test_the_confusion_image_sums_blocks_of_classes_beyond_its_side():
    confusion = np.diag(np.full(2048, 5))
    confusion[0, 2047] = 5  # half of class 0's images, at the far corner
    image = confusion_image(confusion, max_side=1024)
    assert image.shape == (3, 1024, 1024) and image.dtype == np.uint8
    assert (image[2] == 255).all()  # white to blue
    assert image[0, 0, 0] < image[0, 0, 1023] < 255 and image[0, 5, 0] == 255
    assert np.diag(image[0])[1:].max() == 0  # blocks of two classes, each all its own
    assert image[0, 0, 0] == round(255 * (1 - np.sqrt(10 / 15)))  # block 0: 10 of its 15 images


@pytest.mark.parametrize("num_classes", [2, 10, INLINE_CLASSES])
def test_up_to_the_threshold_every_class_is_shown_and_inline(tmp_path, num_classes):
    outcome = synthesize(num_classes, shape=(3, 16, 16), train=4, valid=5, k=2, accuracy=0.6)
    printed = write_outputs(tmp_path, outcome.results, outcome.prototypes, outcome.examples, outcome.confusions)
    results = json.loads((tmp_path / "results.json").read_text())
    page = (tmp_path / "report.html").read_text()
    assert printed == (tmp_path / "table.txt").read_text().rstrip("\n")
    assert len(printed.split("\n\n")[0].splitlines()) == 1 + num_classes + 2
    assert page.count("<table class='confusion'>") == 2 and page.count("<td style=") == 2 * num_classes ** 2
    assert page.count('alt="prototype ') == num_classes and "<h2>Summary</h2>" not in page
    assert results["examples"] == outcome.examples.report()
    for metric, report in results["metrics"].items():
        assert report["confusion"] == outcome.confusions[metric].tolist()
        np.testing.assert_array_equal(np.load(tmp_path / report["confusion_file"]), outcome.confusions[metric])
        assert pq.read_table(tmp_path / report["examples_file"]).num_rows == sum(
            len(side) for sides in results["examples"][metric].values() for side in sides.values())
    with Image.open(tmp_path / "prototypes.png") as sheet:
        assert sheet.size == (num_classes * 16 * 8, 16 * 8)  # side by side, enlarged 8x


def _data_uri_png(page: str, alt: str) -> bytes:
    import base64

    match = re.search(r'src="data:image/png;base64,([^"]+)"[^>]*alt="' + re.escape(alt) + '"', page)
    assert match, alt
    return base64.b64decode(match.group(1))
