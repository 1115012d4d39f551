import numpy as np
import pytest

from mnist37.accuracy import accuracy_report


def test_accuracies_from_a_confusion_matrix():
    confusion = np.array([[8, 2, 0], [1, 3, 0], [0, 0, 6]])
    report = accuracy_report(confusion, ["a", "b", "c"])
    assert report["per_class"] == {"a": 0.8, "b": 0.75, "c": 1.0}
    assert report["mean_class_accuracy"] == pytest.approx((0.8 + 0.75 + 1.0) / 3)
    assert report["overall_accuracy"] == pytest.approx(17 / 20)
    assert (report["correct"], report["total"]) == (17, 20)
    assert report["confusion"] == confusion.tolist()


def test_mean_of_classes_differs_from_overall_when_classes_are_unbalanced():
    report = accuracy_report(np.array([[90, 10], [0, 10]]), ["big", "small"])
    assert report["mean_class_accuracy"] == pytest.approx(0.95)
    assert report["overall_accuracy"] == pytest.approx(100 / 110)


def test_a_class_with_no_images_has_no_accuracy():
    report = accuracy_report(np.array([[5, 0], [0, 0]]), ["a", "b"])
    assert report["per_class"] == {"a": 1.0, "b": None}
    assert report["mean_class_accuracy"] == 1.0
