import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from sdlora.data import Scenario, make_scenario, peer_class_order


@pytest.mark.parametrize(
    ("seed", "n", "head"),
    [
        (1993, 200, [168, 136, 51, 9, 183]),
        (1995, 200, [146, 198, 169, 126, 142]),
        (1994, 100, [72, 6, 33, 96, 60]),
        (1993, 100, [68, 56, 78, 8, 23]),
    ],
)
def test_peer_class_orders(seed, n, head):
    s = make_scenario(n, 20, 20, seed=seed)
    assert s.class_order[:5] == head
    assert sorted(s.class_order) == list(range(n))


def test_order_equals_global_seed_recipe_and_keeps_global_state():
    state = np.random.get_state()
    np.random.seed(1993)
    expected = np.random.permutation(100).tolist()
    np.random.set_state(state)

    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    s = make_scenario(100, 10, 10, seed=1993)
    after = np.random.get_state()[1]
    assert s.class_order == expected
    assert np.array_equal(before, after)  # global numpy state untouched


def test_deterministic_and_seed_dependent():
    assert peer_class_order(50, 7) == peer_class_order(50, 7)
    assert peer_class_order(50, 7) != peer_class_order(50, 8)


def test_tasks_ranges_and_label_map():
    s = make_scenario(10, 4, 2, seed=0, shuffle=False)
    assert s.class_order == list(range(10))
    assert s.tasks == [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9]]
    assert s.num_tasks == 4 and s.num_classes == 10
    assert [s.classes_up_to(t) for t in range(4)] == [4, 6, 8, 10]
    assert [s.task_range(t) for t in range(4)] == [(0, 4), (4, 6), (6, 8), (8, 10)]
    assert s.label_map.tolist() == list(range(10))
    with pytest.raises(IndexError):
        s.classes_up_to(4)


def test_explicit_order_and_label_map_inverse():
    order = [3, 1, 0, 2]
    s = make_scenario(4, 2, 1, seed=0, class_order=order)
    assert s.tasks == [[3, 1], [0], [2]]
    assert [s.label_map[c] for c in order] == [0, 1, 2, 3]
    assert s.task_of_position(2) == 1


def test_num_tasks_truncates():
    s = make_scenario(10, 2, 2, seed=1, num_tasks=3)
    assert s.num_tasks == 3 and s.num_classes == 6
    assert len(s.class_order) == 10
    assert s.tasks == [s.class_order[0:2], s.class_order[2:4], s.class_order[4:6]]


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((10, 3, 2), {}, "not divisible"),
        ((10, 12, 2), {}, "larger than the number of classes"),
        ((10, 0, 2), {}, "init_cls"),
        ((10, 2, 0), {}, "increment"),
        ((10, 2, -1), {}, "increment"),
        ((10, 2, 2), {"num_tasks": 6}, "num_tasks=6"),
        ((10, 2, 2), {"num_tasks": 0}, "num_tasks"),
        ((4, 2, 2), {"class_order": [0, 1, 2, 2]}, "permutation"),
        ((4, 2, 2), {"class_order": [0, 1, 2]}, "permutation"),
        ((0, 1, 1), {}, "num_classes"),
    ],
)
def test_scenario_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_scenario(*args, seed=0, **kwargs)


class _Labelled(Dataset):
    def __init__(self, targets):
        self.targets = np.asarray(targets)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.tensor([float(i)]), int(self.targets[i])


def test_subset_maps_to_positions():
    targets = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    s = make_scenario(4, 2, 2, seed=0, class_order=[2, 0, 3, 1])
    assert isinstance(s, Scenario)
    ds = _Labelled(targets)
    sub0 = s.subset(ds, targets, [0])  # classes 2 and 0 -> positions 0 and 1
    assert sub0.indices.tolist() == [0, 2, 4, 6]
    assert [sub0[i][1] for i in range(len(sub0))] == [1, 0, 1, 0]
    assert sub0.targets.tolist() == [1, 0, 1, 0]
    both = s.subset(ds, targets, [0, 1])
    assert len(both) == 8 and sorted(set(both.targets.tolist())) == [0, 1, 2, 3]
    x, y = both[1]
    assert x.item() == 1.0 and y == 3  # sample 1 has class 1 at position 3
    with pytest.raises(ValueError, match="targets"):
        s.subset(ds, targets[:3], [0])
