"""Ericsson et al.'s logistic-regression protocol: metric, C selection, refit (hand-computed cases)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression

from transfer.logreg import make_classifier, mean_per_class_accuracy, select_best, sweep_and_refit, wd_grid


def test_mean_per_class_accuracy_hand_computed():
    # class 0: 2 of 3 right, class 1: 1 of 1 -> (66.67 + 100) / 2; plain accuracy would be 75
    assert mean_per_class_accuracy([0, 0, 0, 1], [0, 0, 1, 1]) == pytest.approx(250 / 3)
    # a rare class counts as much as a frequent one: class 0 all right (9), class 1 all wrong (1) -> 50
    assert mean_per_class_accuracy([0] * 9 + [1], [0] * 10) == pytest.approx(50.0)
    # a class that is predicted but never true has no accuracy to average (classes of y_true only)
    assert mean_per_class_accuracy([0, 0, 1, 1], [2, 0, 1, 1]) == pytest.approx(75.0)
    assert mean_per_class_accuracy([3, 3], [3, 3]) == 100.0
    with pytest.raises(ValueError):
        mean_per_class_accuracy([0, 1], [0])


@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=60))
def test_mean_per_class_accuracy_is_mean_of_recalls(pairs):
    y_true, y_pred = (np.array(v) for v in zip(*pairs))
    recalls = [np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]
    value = mean_per_class_accuracy(y_true, y_pred)
    assert 0.0 <= value <= 100.0
    assert value == pytest.approx(100 * np.mean(recalls))
    if len(np.unique(y_true)) == 1 or np.all(y_true == y_pred):
        assert value == pytest.approx(100 * np.mean(y_true == y_pred))


def test_select_best_ties_go_to_the_smallest_weight_decay():
    assert select_best([10.0, 30.0, 30.0, 20.0]) == 1  # Ericsson's loop keeps the first strict improvement
    assert select_best([5.0, 5.0, 5.0]) == 0
    assert select_best([float("nan"), 1.0, 0.5]) == 1
    with pytest.raises(ValueError):
        select_best([])


def test_wd_grid_is_ericssons_logspace():
    grid = wd_grid()
    assert len(grid) == 45
    assert grid[0] == pytest.approx(1e-6) and grid[-1] == pytest.approx(1e5)
    ratios = grid[1:] / grid[:-1]
    assert np.allclose(ratios, ratios[0]) and ratios[0] == pytest.approx(10 ** (11 / 44))
    with pytest.raises(ValueError):
        wd_grid(1.0, 0.1, 3)


def test_make_classifier_is_lbfgs_with_warm_start():
    clf = make_classifier(100)
    assert clf.solver == "lbfgs" and clf.warm_start and clf.max_iter == 100
    assert clf.get_params().get("multi_class", "multinomial") in ("multinomial", "deprecated")


def _anti_informative():
    """1-d features. Train: class 0 (3 samples) at x=+1, class 1 (2 samples) at x=-1. Val: one class-0 sample
    at x=-1. Weak regularization follows the feature and calls it class 1 (val score 0); a huge weight decay
    flattens w to ~0 and the unpenalized intercept picks the majority class 0 (val score 100)."""
    x_train = np.array([[1.0], [1.0], [1.0], [-1.0], [-1.0]])
    y_train = np.array([0, 0, 0, 1, 1])
    return (x_train, y_train), (np.array([[-1.0]]), np.array([0])), (np.array([[1.0], [-1.0]]), np.array([0, 1]))


def test_strong_regularization_is_chosen_when_validation_asks_for_it():
    train, val, test = _anti_informative()
    result = sweep_and_refit(train, val, test, grid=[1e-6, 1e5], progress=False)
    assert result.val_scores == [0.0, 100.0]
    assert result.best_wd == 1e5 and result.best_c == pytest.approx(1e-5)  # C = 1 / wd, not scaled by n
    # refit on train + val with C = 1e-5: w ~ 0, the intercept favours class 0 (4 of 6) -> every test image is
    # class 0: class 0 right (100), class 1 wrong (0) -> mean per-class accuracy 50
    assert result.test_score == pytest.approx(50.0)


def test_weak_regularization_is_chosen_when_the_feature_is_informative():
    x_train = np.array([[1.0], [1.1], [0.9], [-1.0], [-1.2]])
    y_train = np.array([0, 0, 0, 1, 1])
    val = (np.array([[0.8], [-0.9]]), np.array([0, 1]))
    test = (np.array([[2.0], [-2.0], [0.5]]), np.array([0, 1, 0]))
    result = sweep_and_refit((x_train, y_train), val, test, grid=[1e-6, 1.0, 1e5], progress=False)
    assert result.val_scores[:2] == [100.0, 100.0] and result.val_scores[2] == 50.0  # 1e5: all class 0
    assert result.best_wd == 1e-6  # tie between 1e-6 and 1: the first (smallest wd) wins
    assert result.test_score == 100.0


def test_refit_equals_a_fresh_fit_on_train_plus_val():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 6))  # overlapping classes: a well-conditioned optimum for every C

    def draw(n):
        labels = np.repeat(np.arange(4), n)
        return centers[labels] + rng.normal(size=(len(labels), 6)), labels
    train, val, test = draw(6), draw(3), draw(10)
    result = sweep_and_refit(train, val, test, grid=wd_grid(1e-1, 1e2, 6), progress=False)
    fresh = LogisticRegression(solver="lbfgs", C=result.best_c, max_iter=1000, tol=1e-10)
    fresh.fit(np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]]))
    expected = mean_per_class_accuracy(test[1], fresh.predict(test[0]))
    assert result.refit_iterations < 100  # converged, so the warm start cannot matter
    assert result.test_score == pytest.approx(expected)
    assert result.best_wd in result.grid and result.val_scores[result.grid.index(result.best_wd)] == max(result.val_scores)


def test_sweep_refuses_unusable_inputs():
    train, val, test = _anti_informative()
    with pytest.raises(ValueError, match="increasing"):
        sweep_and_refit(train, val, test, grid=[1.0, 1e-3], progress=False)
    with pytest.raises(ValueError, match="not in train"):
        sweep_and_refit(train, (np.array([[0.0]]), np.array([7])), test, grid=[1.0], progress=False)


def test_blas_thread_setting_does_not_change_the_result():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 5))
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0).astype(int)
    splits = ((x[:24], y[:24]), (x[24:32], y[24:32]), (x[32:], y[32:]))
    one = sweep_and_refit(*splits, grid=wd_grid(1e-2, 1e2, 5), blas_threads=1, progress=False)
    every = sweep_and_refit(*splits, grid=wd_grid(1e-2, 1e2, 5), blas_threads=None, progress=False)
    assert one.val_scores == every.val_scores and one.test_score == every.test_score
