from fractions import Fraction

import numpy as np
import pytest
import torch

from mnist37 import classify as classify_module
from mnist37 import distances as distances_module
from mnist37.chunks import chunk_bytes, chunk_table, write_chunk
from mnist37.classify import DeviceError, classify_chunk, classify_images, confusion, resolve_device
from mnist37.distances import distances, nearest

def classify(images, labels, prototypes, metrics, device):
    """Confusion matrices per metric, as a classify task computes them."""
    return classify_images(images, labels, prototypes, metrics, device).confusions


needs_cuda = pytest.mark.cuda  # skipped where no CUDA device is visible (tests/conftest.py), CI included


def problem(n=300, num_classes=3, shape=(6, 6), seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    protos = rng.random((num_classes, *shape), dtype=np.float32)
    return images, labels, protos


def reference_distances(images, protos):
    """Straight from the definitions, in float64."""
    x = images.astype(np.float64)[:, None] / 255 - protos.astype(np.float64)[None]
    return {"l1": np.abs(x).mean(axis=(-1, -2)), "l2": np.sqrt((x ** 2).mean(axis=(-1, -2)))}


def test_distances_match_definitions_and_fastbook():
    images, _, protos = problem()
    got = distances(torch.from_numpy(images), torch.from_numpy(protos), ["l1", "l2"])
    expected = reference_distances(images, protos)
    for metric in ("l1", "l2"):
        assert got[metric].dtype == torch.float32 and got[metric].shape == (300, 3)
        np.testing.assert_allclose(got[metric].numpy(), expected[metric], rtol=1e-5)
    # fastbook: mnist_distance(a, b) = (a - b).abs().mean((-1, -2)), on images scaled by 1/255
    fastbook = (torch.from_numpy(images).float()[:, None] / 255 - torch.from_numpy(protos)).abs().mean((-1, -2))
    torch.testing.assert_close(got["l1"], fastbook)


def test_only_the_asked_metrics_are_computed():
    images, _, protos = problem()
    assert set(distances(torch.from_numpy(images), torch.from_numpy(protos), ["l2"])) == {"l2"}


def test_confusion_counts_true_rows_predicted_columns():
    true = torch.tensor([0, 0, 1, 2, 2, 2])
    pred = torch.tensor([0, 1, 1, 2, 0, 2])
    assert confusion(true, pred, 3).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_classify_predicts_the_nearest_prototype():
    images, labels, protos = problem()
    expected = reference_distances(images, protos)
    got = classify(images, labels, protos, ["l1", "l2"], "cpu")
    for metric in ("l1", "l2"):
        predicted = expected[metric].argmin(axis=1)
        manual = np.zeros((3, 3), dtype=np.int64)
        np.add.at(manual, (labels, predicted), 1)
        assert got[metric].dtype == np.int64
        np.testing.assert_array_equal(got[metric], manual)


def test_batches_do_not_change_the_result(monkeypatch):
    """Predictions are the exact argmin, so the same in one batch of 1000, in the CPU's batches
    and in batches of 7; the distances (a matrix product's blocking depends on the batch)
    agree within float32 rounding."""
    images, labels, protos = problem(n=1000)
    results = []
    for size in (1000, classify_module.CPU_BATCH_IMAGES, 7):
        monkeypatch.setattr(classify_module, "CPU_BATCH_IMAGES", size)
        done = classify_images(images, labels, protos, ["l1", "l2"], "cpu")
        results.append(({m: d.numpy() for m, d in done.distances.items()}, done.confusions))
    for distances_, confusions in results[1:]:
        for metric in ("l1", "l2"):
            np.testing.assert_allclose(distances_[metric], results[0][0][metric], rtol=1e-5)
            np.testing.assert_array_equal(confusions[metric], results[0][1][metric])


def test_ties_go_to_the_earlier_class():
    images, labels, protos = problem(num_classes=2)
    protos[1] = protos[0]
    got = classify(images, labels, protos, ["l1", "l2"], "cpu")
    for matrix in got.values():
        assert matrix[:, 1].sum() == 0 and matrix.sum() == len(images)


def test_classify_chunk_reads_the_arrow_file(tmp_path):
    images, labels, protos = problem()
    write_chunk(tmp_path / "c.arrow", chunk_table(images, labels, [str(i) for i in range(300)], "abc", "valid"))
    from_file, device, *_ = classify_chunk(str(tmp_path / "c.arrow"), protos, ["l1", "l2"], "cpu")
    from_uri, *_ = classify_chunk((tmp_path / "c.arrow").as_uri(), protos, ["l1", "l2"], "cpu")
    from_bytes, *_ = classify_chunk(chunk_bytes(str(tmp_path / "c.arrow")), protos, ["l1", "l2"], "cpu")
    in_memory = classify(images, labels, protos, ["l1", "l2"], "cpu")
    assert device == torch.device("cpu")
    for metric in in_memory:
        for got in (from_file, from_uri, from_bytes):
            np.testing.assert_array_equal(got[metric], in_memory[metric])


@pytest.mark.no_cuda
def test_devices_without_cuda():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"device: 'cuda' was asked for but no CUDA device is visible"):
        resolve_device("cuda")


@needs_cuda
def test_cuda_agrees_with_cpu():
    images, labels, protos = problem(n=5000)
    assert resolve_device("auto") == torch.device("cuda")
    cpu = classify(images, labels, protos, ["l1", "l2"], "cpu")
    cuda = classify(images, labels, protos, ["l1", "l2"], "cuda")
    for metric in cpu:
        np.testing.assert_array_equal(cuda[metric], cpu[metric])


def exact_reference(images, protos, metric):
    """Exact sums as Fractions (x = u / 255, p the float32 value): the ground truth at ties."""
    x = [[Fraction(int(v), 255) for v in row] for row in images.reshape(len(images), -1)]
    p = [[Fraction(float(v)) for v in row] for row in protos.reshape(len(protos), -1)]
    power = 1 if metric == "l1" else 2
    return [[sum(abs(a - b) ** power for a, b in zip(xi, pc)) for pc in p] for xi in x]


def first_argmin(rows):
    return np.array([min(range(len(r)), key=lambda c: (r[c], c)) for r in rows])


def near_ties(rng, shape, far_classes, per_kind=4):
    """Images with, among `far_classes` random prototypes, two that tie or nearly tie:
    per image (a) B = A with one pixel moved one float32 ulp toward the image (B exactly nearer,
    by far less than a float32 ulp of the distance), placed after A and before A, and (b) B = A
    with the values of two pixels where the image is 0 swapped (an exact tie: the earlier wins).
    Returns images, prototypes and, per image, where A and B sit and which of them must win."""
    cases = []
    for kind in ("ulp after", "ulp before", "swap") * per_kind:
        image = rng.integers(0, 256, shape, dtype=np.uint8).reshape(-1)
        image[:4] = 0
        # A near the image, so that the random prototypes are all farther than A and B
        a = np.clip(image / 255 + rng.uniform(-0.05, 0.05, image.shape), 0, 1).astype(np.float32)
        b = a.copy()
        if kind == "swap":
            b[[0, 1]] = a[[1, 0]]
        else:
            i = 5 + int(rng.integers(0, image.size - 5))
            x = np.float32(image[i] / 255)
            b[i] = np.nextafter(a[i], x)  # one ulp toward the image: B is strictly nearer
        pair = [a, b] if kind != "ulp before" else [b, a]
        cases.append((image, pair, {"ulp after": 1, "ulp before": 0, "swap": 0}[kind]))
    images = np.stack([c[0] for c in cases]).reshape(len(cases), *shape)
    protos = rng.random((far_classes + 2 * len(cases), int(np.prod(shape))), dtype=np.float32)
    where = []
    for k, (_, pair, winner) in enumerate(cases):
        slot = k * (len(protos) // len(cases))  # spread among the random ones
        protos[[slot, slot + 1]] = pair
        where.append(slot + winner)
    return images, protos.reshape(len(protos), *shape), np.array(where)


@pytest.mark.parametrize("num_classes,shape", [(2, (6, 6)), (10, (28, 28)), (1000, (4, 4, 3))])
def test_predictions_are_the_float64_ones(num_classes, shape):
    images, labels, protos = problem(n=400, num_classes=num_classes, shape=shape, seed=num_classes)
    done = classify_images(images, labels, protos, ["l1", "l2"], "cpu")
    x = images.reshape(len(images), -1).astype(np.float64)[:, None] / 255 - \
        protos.reshape(num_classes, -1).astype(np.float64)[None]
    for metric, sums in (("l1", np.abs(x).sum(-1)), ("l2", (x ** 2).sum(-1))):
        np.testing.assert_array_equal(done.predicted[metric].numpy(), sums.argmin(axis=1))


@pytest.mark.parametrize("far_classes,shape", [(0, (6, 6)), (8, (28, 28)), (994, (4, 4, 3))])
@pytest.mark.parametrize("metric,l1_kernel_from", [("l1", None), ("l1", 0), ("l2", None)])
def test_near_ties_and_exact_ties_go_where_the_exact_distances_say(far_classes, shape, metric, l1_kernel_from,
                                                                    monkeypatch):
    """One ulp of one prototype pixel decides the class, and an exact tie goes to the earlier
    class, as the exact (Fraction) and float64 computations say; float32 sums cannot see it.
    l1 twice: at these sizes through cdist's slabs, and through the CPU's kernel (its
    threshold at 0)."""
    if l1_kernel_from is not None:
        monkeypatch.setattr(distances_module, "L1_KERNEL_MIN_VALUES", l1_kernel_from)
    rng = np.random.default_rng(far_classes)
    images, protos, winners = near_ties(rng, shape, far_classes)
    exact = first_argmin(exact_reference(images, protos, metric))
    np.testing.assert_array_equal(exact, winners)
    x = images.reshape(len(images), -1).astype(np.float64)[:, None] / 255 - \
        protos.reshape(len(protos), -1).astype(np.float64)[None]
    float64 = (np.abs(x) if metric == "l1" else x ** 2).sum(-1).argmin(axis=1)
    np.testing.assert_array_equal(float64, winners)
    predicted, _ = nearest(torch.from_numpy(images), torch.from_numpy(protos), metric)
    np.testing.assert_array_equal(predicted.numpy(), winners)
    done = classify_images(images, winners, protos, [metric], "cpu")
    assert done.confusions[metric].trace() == len(images)


def test_a_misclassified_images_distances_to_both_classes_are_float64_rechecks():
    images, labels, protos = problem(n=200, num_classes=10, shape=(28, 28))
    done = classify_images(images, labels, protos, ["l1", "l2"], "cpu")
    reference = reference_distances(images, protos)
    for metric in ("l1", "l2"):
        wrong = done.misclassified[metric]
        assert len(wrong) > 100
        for classes in (wrong.predicted, wrong.true):
            # float64 values rounded once to float32
            rows = np.arange(len(wrong))
            np.testing.assert_array_equal(wrong.distances[rows, classes],
                                          reference[metric][wrong.rows, classes].astype(np.float32))
        np.testing.assert_array_equal(wrong.margins, (reference[metric][wrong.rows, wrong.true].astype(np.float32)
                                                      - reference[metric][wrong.rows, wrong.predicted].astype(np.float32)))
        assert (wrong.margins >= 0).all()


@needs_cuda
@pytest.mark.parametrize("metric", ["l1", "l2"])
def test_cuda_predictions_are_the_cpu_ones_at_1000_classes(metric):
    """What jobs/gpu_check.py's 1,000-class case checks: CUDA and CPU predictions, image by
    image, equal (both are the exact argmin), near ties included."""
    images, labels, protos = problem(n=2048, num_classes=1000, shape=(16, 16, 3), seed=1)
    tied, tied_protos, _ = near_ties(np.random.default_rng(2), (16, 16, 3), 994)
    for imgs, ps in ((images, protos), (tied, tied_protos)):
        cpu = classify_images(imgs, np.zeros(len(imgs), dtype=np.int64), ps, [metric], "cpu")
        cuda = classify_images(imgs, np.zeros(len(imgs), dtype=np.int64), ps, [metric], "cuda")
        np.testing.assert_array_equal(cuda.predicted[metric].cpu().numpy(), cpu.predicted[metric].numpy())


def test_an_unknown_metric_is_named():
    images, _, protos = problem()
    with pytest.raises(ValueError, match=r"Unknown metric 'l3'; expected one of l1, l2"):
        nearest(torch.from_numpy(images), torch.from_numpy(protos), "l3")


def test_float32_bounds_end_where_gamma_does():
    assert distances_module.gamma(12288, torch.float32) == pytest.approx(12288 * 2.0 ** -24, rel=1e-3)
    with pytest.raises(ValueError, match=r"gamma\(16777216\) does not exist for torch.float32: 16777216 values "
                                         r"are too many to bound"):
        distances_module.gamma(2 ** 24, torch.float32)


@pytest.mark.parametrize("n,c,p", [(1, 1, 1), (5, 3, 36), (7, 11, 4096 + 37), (4, 1000, 12)])
def test_the_cpu_l1_kernel_and_cdist_are_both_within_the_bound(n, c, p):
    """mnist37.l1_kernel (the CPU's l1 sums: four images a pass, slabs of 4,096 values) and
    torch.cdist on slabs sum the same float32 terms in other orders: each within l1_sums' bound
    of the float64 sums, and close to each other; images not a multiple of four, rows not a
    multiple of a slab."""
    rng = np.random.default_rng(p)
    images = torch.from_numpy(rng.integers(0, 256, (n, p), dtype=np.uint8))
    protos = torch.from_numpy(rng.random((c, p), dtype=np.float32))
    exact = (images.double()[:, None, :] / 255 - protos.double()[None]).abs().sum(-1)
    kernel = distances_module.l1_sums(images, protos, via="kernel")
    cdist = distances_module.l1_sums(images, protos, via="cdist")
    for sums in (kernel, cdist):
        assert sums.value.shape == (n, c)
        assert bool(((sums.value - exact).abs() <= sums.bound).all())
    torch.testing.assert_close(kernel.value, cdist.value, rtol=1e-5, atol=1e-5)
