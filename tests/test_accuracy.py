import numpy as np
import pytest

from mnist37.accuracy import accuracy_report, most_confused, per_class_accuracy, ranked


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


def test_the_matrix_is_left_out_when_asked_and_the_most_confused_pairs_stay():
    confusion = np.array([[5, 3, 1], [0, 4, 3], [2, 0, 0]])
    report = accuracy_report(confusion, ["a", "b", "c"], inline_confusion=False)
    assert "confusion" not in report
    assert report["most_confused"] == [{"true": 0, "predicted": 1, "count": 3}, {"true": 1, "predicted": 2, "count": 3},
                                       {"true": 2, "predicted": 0, "count": 2}, {"true": 0, "predicted": 2, "count": 1}]


def test_most_confused_breaks_ties_by_class_and_stops_at_n():
    confusion = np.ones((40, 40), dtype=np.int64)  # 1,560 pairs confused once each
    pairs = most_confused(confusion, 5)
    assert pairs == [(0, 1, 1), (0, 2, 1), (0, 3, 1), (0, 4, 1), (0, 5, 1)]
    assert most_confused(np.eye(3, dtype=np.int64) * 7, 5) == []


def test_classes_ranked_worst_first_without_those_that_have_no_images():
    confusion = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 2, 0], [0, 1, 0, 1]])
    accuracies = per_class_accuracy(confusion)
    assert np.isnan(accuracies[1]) and accuracies[[0, 2, 3]].tolist() == [0.5, 1.0, 0.5]
    assert ranked(accuracies).tolist() == [0, 3, 2]
    assert ranked([0.5, None, 1.0, 0.5]).tolist() == [0, 3, 2]
