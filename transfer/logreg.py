"""Logistic regression on frozen features, as in Ericsson et al. (CVPR 2021), "How Well Do Self-Supervised
Models Transfer?".

Protocol: one ``sklearn.linear_model.LogisticRegression`` (L-BFGS, multinomial, ``max_iter`` 100,
``warm_start``) is fitted on the train features for each of 45 weight decays log-spaced in [1e-6, 1e5],
in increasing order, each fit starting from the previous solution; ``C = 1 / wd``. The wd with the best
validation score wins (the first, i.e. the smallest, on ties); the same classifier is then refitted on
train + val with that C and scored on test. Score: mean per-class accuracy (in percent).

Why ``C = 1 / wd`` and not ``1 / (n * wd)``. sklearn minimises ``C * sum_i loss_i + ||w||^2 / 2``, i.e.
``mean_i loss_i + ||w||^2 / (2 C n)``: the weight decay of the usual mean-loss objective is ``1 / (C n)``,
so a literal translation would scale C by the number of training samples. Ericsson et al.'s released
``linear.py`` does not (``C = 1. / wd.item()``), and the published Caltech/Flowers numbers come from that
code, so we do the same. The grid spans 11 decades, so the selected *regularization* is the same either
way up to the grid shift (about 3 decades for ~3000 samples); what differs is only the label attached
to it. One consequence we keep as they do: the refit on train + val (more samples) with the same C is
slightly less regularized than the fit that was validated.

Threads: the fits are small; multi-threaded BLAS on them mostly spins (16x slower on a busy 2-core
machine), so by default they run single-threaded (``blas_threads``); the result does not depend on it.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from tqdm import tqdm

PAPER_WD_RANGE = (1e-6, 1e5, 45)
_AUTO_SINGLE_THREAD_BELOW = 8_000_000  # features x samples under which one BLAS thread is fastest


def wd_grid(low: float = 1e-6, high: float = 1e5, count: int = 45) -> np.ndarray:
    """``count`` weight decays log-spaced in [low, high] (Ericsson: ``torch.logspace(-6, 5, 45)``)."""
    if not 0 < low <= high or count < 1:
        raise ValueError(f"weight-decay grid needs 0 < low <= high and count >= 1, got ({low}, {high}, {count})")
    return np.logspace(np.log10(low), np.log10(high), int(count))


def mean_per_class_accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Mean over the classes present in ``y_true`` of the fraction of their samples predicted right, in %.

    Classes absent from ``y_true`` have no accuracy to average (Ericsson's confusion-matrix version would
    give NaN for a class that is predicted but never true; with the official splits every class is present).
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"need two equal-length, non-empty label arrays, got {y_true.shape} and {y_pred.shape}")
    classes = np.unique(y_true)
    per_class = [np.mean(y_pred[y_true == c] == c) for c in classes]
    return 100.0 * float(np.mean(per_class))


def select_best(scores: Sequence[float]) -> int:
    """Index of the best validation score; ties go to the first (smallest wd, as ``>`` in Ericsson's loop)."""
    if len(scores) == 0:
        raise ValueError("no validation scores to choose from")
    values = np.asarray(scores, dtype=float)
    if np.isnan(values).all():
        raise ValueError("every validation score is NaN")
    return int(np.nanargmax(values))


def make_classifier(max_iter: int = 100) -> LogisticRegression:
    """L-BFGS multinomial logistic regression with warm start (``multi_class`` is implied where sklearn dropped it)."""
    kwargs = {"solver": "lbfgs", "max_iter": int(max_iter), "warm_start": True}
    if "multi_class" in inspect.signature(LogisticRegression).parameters:  # sklearn < 1.8
        kwargs["multi_class"] = "multinomial"
    return LogisticRegression(**kwargs)


@dataclass
class LogRegResult:
    best_wd: float
    best_c: float
    test_score: float  # mean per-class accuracy on test, %
    val_scores: list[float]  # one per wd of the grid, %
    grid: list[float]  # the weight decays, increasing
    refit_iterations: int
    hit_max_iter: list[bool] = field(default_factory=list)  # per grid point: lbfgs stopped at max_iter

    def summary(self) -> dict:
        return {"best_wd": self.best_wd, "best_C": self.best_c, "val_score_at_best": self.val_scores[self.grid.index(self.best_wd)],
                "val_scores": self.val_scores, "wd_grid": self.grid, "refit_iterations": self.refit_iterations,
                "fits_at_max_iter": int(sum(self.hit_max_iter))}


def _blas_limit(setting: int | str | None, x: np.ndarray) -> int | None:
    if setting == "auto":
        return 1 if x.size < _AUTO_SINGLE_THREAD_BELOW else None
    return None if setting in (None, "all") else int(setting)


def sweep_and_refit(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    grid: Sequence[float] | None = None,
    *,
    max_iter: int = 100,
    blas_threads: int | str | None = "auto",
    progress: bool = True,
    desc: str = "logreg C sweep",
) -> LogRegResult:
    """Choose C on (train, val) over ``grid`` (weight decays), refit on train + val, score on test."""
    grid = [float(wd) for wd in (wd_grid() if grid is None else grid)]
    if sorted(grid) != grid:
        raise ValueError("the weight-decay grid must be increasing (the warm-started sweep goes from weak to strong)")
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = train, val, test
    missing = sorted(set(np.unique(y_val)) - set(np.unique(y_train)))
    if missing:
        raise ValueError(f"classes {missing[:5]} appear in val but not in train; the split is unusable")
    classifier = make_classifier(max_iter)
    scores, at_max = [], []
    with threadpool_limits(limits=_blas_limit(blas_threads, x_train)), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter 100 is the protocol, not a mistake
        for wd in tqdm(grid, desc=desc, unit="C", disable=not progress, leave=False):
            classifier.set_params(C=1.0 / wd)
            classifier.fit(x_train, y_train)
            scores.append(mean_per_class_accuracy(y_val, classifier.predict(x_val)))
            at_max.append(bool(np.max(classifier.n_iter_) >= max_iter))
        best = select_best(scores)
        classifier.set_params(C=1.0 / grid[best])
        classifier.fit(np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val]))
        test_score = mean_per_class_accuracy(y_test, classifier.predict(x_test))
    return LogRegResult(best_wd=grid[best], best_c=1.0 / grid[best], test_score=test_score, val_scores=scores,
                        grid=grid, refit_iterations=int(np.max(classifier.n_iter_)), hit_max_iter=at_max)
