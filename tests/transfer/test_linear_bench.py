"""The linear benchmark's verdict: every checkpoint must beat random init on every task."""

from __future__ import annotations

from transfer.linear_bench import beats_random, markdown


def _row(name, dataset, metric, value, random_init=False):
    return {"name": name, "dataset": dataset, "random_init": random_init, "metrics": {metric: value},
            "wall_s": 2.0, "cpu_s": 1.5}


def test_beats_random_names_every_task_that_does_not():
    rows = [_row("random", "caltech101", "caltech101_acc", 20.0, random_init=True),
            _row("random", "flowers102", "flowers102_acc", 15.0, random_init=True),
            _row("mocov2", "caltech101", "caltech101_acc", 35.0), _row("mocov2", "flowers102", "flowers102_acc", 15.0)]
    problems = beats_random(rows)
    assert problems == ["mocov2 on flowers102: 15.00 <= random 15.00"]  # a tie is not a win
    assert beats_random(rows[:3]) == []
    table = markdown(rows)
    assert "| mocov2 | logreg_caltech101 | caltech101_acc 35.00 | 2.0 | 1.5 |" in table
    assert "all tasks of mocov2: 4.0 s wall, 3.0 s CPU" in table
