import numpy as np
import pytest
import torch

from mnist37 import classify as classify_module
from mnist37.chunks import chunk_bytes, chunk_table, write_chunk
from mnist37.classify import DeviceError, classify_chunk, classify_images, confusion, distances, resolve_device

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
    """On the CPU each image's distances are sums over its own row: the same, bit for bit,
    in one batch of 1000, in the CPU's batches, and in batches of 7."""
    images, labels, protos = problem(n=1000)
    results = []
    for size in (1000, classify_module.CPU_BATCH_IMAGES, 7):
        monkeypatch.setattr(classify_module, "CPU_BATCH_IMAGES", size)
        done = classify_images(images, labels, protos, ["l1", "l2"], "cpu")
        results.append(({m: d.numpy() for m, d in done.distances.items()}, done.confusions))
    for distances_, confusions in results[1:]:
        for metric in ("l1", "l2"):
            np.testing.assert_array_equal(distances_[metric], results[0][0][metric])
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
    from_file, device, _ = classify_chunk(str(tmp_path / "c.arrow"), protos, ["l1", "l2"], "cpu")
    from_uri, _, _ = classify_chunk((tmp_path / "c.arrow").as_uri(), protos, ["l1", "l2"], "cpu")
    from_bytes, _, _ = classify_chunk(chunk_bytes(str(tmp_path / "c.arrow")), protos, ["l1", "l2"], "cpu")
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


def test_the_all_classes_pass_in_class_groups_is_the_same(monkeypatch):
    images, _, protos = problem(n=200, num_classes=7)
    whole = distances(torch.from_numpy(images), torch.from_numpy(protos), ["l1", "l2"], all_classes=True)
    monkeypatch.setattr(classify_module, "DIFFERENCES_AT_ONCE", 200 * 36 * 3)  # 3 classes per pass
    grouped = distances(torch.from_numpy(images), torch.from_numpy(protos), ["l1", "l2"], all_classes=True)
    for metric in ("l1", "l2"):
        assert grouped[metric].shape == (200, 7)
        torch.testing.assert_close(grouped[metric], whole[metric], rtol=0, atol=0)
