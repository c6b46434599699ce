import math

import numpy as np
import pytest

from sdlora.metrics import accuracy_matrix, compute_metrics

# 3 tasks, 100 test samples each. R (percent) = correct here:
#   after task 0: [90]
#   after task 1: [80, 70]
#   after task 2: [60, 75, 50]
CORRECT_3 = [[90], [80, 70], [60, 75, 50]]
TOTAL_3 = [100, 100, 100]


def test_accuracy_matrix_values_and_nan_above_diagonal():
    R = accuracy_matrix([[45], [40, 35]], [50, 70])
    assert R.shape == (2, 2) and R.dtype == np.float64
    assert R[0, 0] == 90.0
    assert R[1, 0] == 80.0
    assert R[1, 1] == 50.0
    assert math.isnan(R[0, 1])


def test_hand_computed_3x3():
    m = compute_metrics(CORRECT_3, TOTAL_3)
    assert m["accuracy_matrix"] == [[90.0, None, None], [80.0, 70.0, None], [60.0, 75.0, 50.0]]
    # acc after task: 90/100, (80+70)/200 = 75, (60+75+50)/300 = 185/300
    assert m["acc_after_task"] == pytest.approx([90.0, 75.0, 61.666666666666667])
    assert m["acc"] == pytest.approx(61.666666666666667)
    # AAA = (90 + 75 + 61.6667) / 3 = 226.6667 / 3
    assert m["aaa"] == pytest.approx(75.555555555555556)
    assert m["mean_task_acc"] == pytest.approx(61.666666666666667)
    # forgetting: task 0: max(90, 80) - 60 = 30; task 1: max(70) - 75 = -5; mean = 12.5
    assert m["forgetting"] == pytest.approx(12.5)
    # BWT: task 0: 60 - 90 = -30; task 1: 75 - 70 = +5; mean = -12.5
    assert m["bwt"] == pytest.approx(-12.5)
    assert m["test_samples_per_task"] == [100, 100, 100]


def test_forgetting_uses_max_not_first_value():
    # task 0 improves after learning task 1 (50 -> 80), then drops to 60: forgetting counts from the peak 80
    m = compute_metrics([[50], [80, 90], [60, 90, 70]], [100, 100, 100])
    # task 0: max(50, 80) - 60 = 20; task 1: 90 - 90 = 0 -> 10; BWT: (60 - 50 + 90 - 90) / 2 = 5
    assert m["forgetting"] == pytest.approx(10.0)
    assert m["bwt"] == pytest.approx(5.0)


def test_unbalanced_totals_weighted_vs_mean():
    # task 0: 200 test samples, task 1: 50
    m = compute_metrics([[180], [100, 45]], [200, 50])
    # R after task 1: 100/200 = 50 %, 45/50 = 90 %
    assert m["acc_after_task"] == pytest.approx([90.0, 58.0])  # (100 + 45) / 250
    assert m["acc"] == pytest.approx(58.0)
    assert m["mean_task_acc"] == pytest.approx(70.0)  # (50 + 90) / 2 differs from the weighted 58
    assert m["aaa"] == pytest.approx(74.0)
    assert m["forgetting"] == pytest.approx(40.0)
    assert m["bwt"] == pytest.approx(-40.0)


def test_single_task():
    m = compute_metrics([[7]], [10])
    assert m["acc"] == pytest.approx(70.0)
    assert m["aaa"] == pytest.approx(70.0)
    assert m["mean_task_acc"] == pytest.approx(70.0)
    assert m["forgetting"] is None
    assert m["bwt"] is None
    assert m["accuracy_matrix"] == [[70.0]]


def test_partial_run_and_square_input_with_junk_above_diagonal():
    # 2 of 5 planned tasks done; totals for all 5 given; a square numpy array with NaN above the diagonal is fine
    correct = np.array([[9.0, np.nan], [8.0, 6.0]])
    m = compute_metrics(correct, [10, 10, 10, 10, 10])
    assert m["acc_after_task"] == pytest.approx([90.0, 70.0])
    assert m["test_samples_per_task"] == [10, 10]
    assert len(m["accuracy_matrix"]) == 2
    assert m["forgetting"] == pytest.approx(10.0)


def test_outputs_are_plain_python_types():
    m = compute_metrics(np.array([[9, 0], [8, 6]], dtype=np.int64), np.array([10, 10]))
    assert type(m["acc"]) is float
    assert all(type(v) is float for v in m["acc_after_task"])
    assert all(type(v) is int for v in m["test_samples_per_task"])
    assert m["accuracy_matrix"][0][1] is None


def _string_sorted_forgetting(R: np.ndarray, classes_per_task: int) -> float:
    """Forgetting as the official code computed it: per-step group accuracies keyed by class-range strings,
    columns ordered by sorted() on those strings. Used only to show the test case tells the two orderings apart."""
    n = R.shape[0]
    rows = []
    for i in range(n):
        groups = {f"{j * classes_per_task:02d}-{(j + 1) * classes_per_task - 1:02d}": R[i, j] for j in range(i + 1)}
        rows.append([groups[k] for k in sorted(groups)])
    final = rows[-1]
    per_col = [max(rows[i][k] for i in range(k, n - 1)) - final[k] for k in range(n - 1)]
    return float(np.mean(per_col))


def test_20_tasks_200_classes_integer_ordering():
    # 20 tasks x 10 classes = 200 classes, 100 test samples per task. Every task is at 90 % right after it is
    # learned and then loses exactly j points for good (task j ends at 90 - j). So by hand:
    #   forgetting of task j = 90 - (90 - j) = j   ->  mean over j = 0..18 = 171 / 19 = 9.0
    #   BWT = -9.0;  final per-task mean = (sum_{j<19}(90 - j) + 90) / 20 = (1710 - 171 + 90) / 20 = 81.45
    n = 20
    correct = [[90 if j == i else 90 - j for j in range(i + 1)] for i in range(n)]
    m = compute_metrics(correct, [100] * n)
    assert m["forgetting"] == pytest.approx(9.0)
    assert m["bwt"] == pytest.approx(-9.0)
    assert m["mean_task_acc"] == pytest.approx(81.45)
    assert m["acc"] == pytest.approx(81.45)  # balanced totals: weighted == unweighted
    assert m["accuracy_matrix"][19][2] == 88.0  # column 2 is task 2 (classes 20-29), not the '100-109' group
    # the string-keyed ordering ('100-109' < '20-29') gives a different number on the same data
    R = np.array(accuracy_matrix(correct, [100] * n))
    assert abs(_string_sorted_forgetting(R, 10) - 9.0) > 1.0


@pytest.mark.parametrize(
    ("correct", "total", "message"),
    [
        ([], [10], "empty"),
        ([[5], [5]], [10], "total has 1 entries"),
        ([[5], [5]], [10, 10], r"correct\[1\] has 1 entries"),
        ([[11]], [10], r"correct\[0\]\[0\] = 11 exceeds total\[0\] = 10"),
        ([[-1]], [10], "negative"),
        ([[5]], [0], "at least one test sample"),
        ([[5.5]], [10], "integer count"),
        ([[True]], [10], "integer count"),
        ([[None]], [10], "integer count"),
        ([[5], [5, None]], [10, 10], r"correct\[1\]\[1\] must be an integer"),
        (np.array([1, 2]), [10, 10], "2-D"),
    ],
)
def test_invalid_input(correct, total, message):
    with pytest.raises(ValueError, match=message):
        compute_metrics(correct, total)
    with pytest.raises(ValueError, match=message):
        accuracy_matrix(correct, total)


def test_earlier_tasks_not_evaluated_are_left_out():
    """``None`` below the diagonal: that task's test data was not available for this row (sdlora learn)."""
    correct = [[90], [80, 70], [None, 75, 50]]
    m = compute_metrics(correct, TOTAL_3)
    assert m["accuracy_matrix"][2] == [None, 75.0, 50.0] and m["accuracy_matrix"][1] == [80.0, 70.0, None]
    assert m["acc_after_task"] == pytest.approx([90.0, 75.0, 62.5])  # (75 + 50) / 200 in the last row
    assert m["mean_task_acc"] == pytest.approx(62.5)
    assert m["forgetting"] == pytest.approx(-5.0) and m["bwt"] == pytest.approx(5.0)  # task 1 only
    assert math.isnan(accuracy_matrix(correct, TOTAL_3)[2, 0])
    # the others unchanged by a missing entry in a later row
    full = compute_metrics(CORRECT_3, TOTAL_3)
    assert m["acc_after_task"][:2] == full["acc_after_task"][:2]
    only_new = compute_metrics([[90], [None, 70]], [100, 100])
    assert only_new["forgetting"] is None and only_new["bwt"] is None and only_new["acc"] == 70.0
