"""Standard errors: clustered SE agrees with a direct computation and grows with within-task correlation."""

import math

import pytest

from t2l_framework.eval.stats import clustered_mean_se, mean_se, paired_difference


def test_singleton_clusters_equal_the_plain_se():
    values = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    m1, se1 = mean_se(values)
    m2, se2 = clustered_mean_se(values, list(range(len(values))))
    assert m1 == pytest.approx(m2) and se1 == pytest.approx(se2)


def test_clustered_se_by_hand():
    values = [1, 1, 1, 0, 0, 0, 1, 0]
    tasks = ["a", "a", "a", "b", "b", "b", "c", "c"]
    mean = 0.5
    sums = {"a": 3 * 0.5, "b": -1.5, "c": 0.0}
    expected = math.sqrt(3 / 2 * sum(s * s for s in sums.values()) / 64)
    m, se = clustered_mean_se(values, tasks)
    assert m == mean and se == pytest.approx(expected)
    # Items of a task that agree with each other carry less information: the clustered SE is larger.
    assert se > mean_se(values)[1]


def test_one_cluster_has_no_se_and_lengths_must_match():
    assert math.isnan(clustered_mean_se([1.0, 0.0], ["t", "t"])[1])
    with pytest.raises(ValueError, match="2 values but 1 cluster"):
        clustered_mean_se([1.0, 0.0], ["t"])


def test_paired_difference_removes_shared_item_difficulty():
    a = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3]
    b = [0.8, 0.0, 0.7, 0.1, 0.6, 0.2]
    d, se = paired_difference(a, b)
    assert d == pytest.approx(0.1) and se == pytest.approx(0.0, abs=1e-12)
    d2, se2 = paired_difference(a, b, ["x", "x", "y", "y", "z", "z"])
    assert d2 == pytest.approx(0.1) and se2 == pytest.approx(0.0, abs=1e-12)
