"""SIGTERM / Ctrl-C during training: the step in progress is checkpointed, then the run stops; nothing lost."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from pretrain.checkpoint import load_checkpoint
from pretrain.config import load_config
from pretrain.data import worker_init
from pretrain.engine import train
from pretrain.stop_request import STOP, Terminated, leave_signals_to_the_trainer
from tests.pretrain.engine_helpers import TOY_CONFIGS, tiny_overrides

CONFIG = {p.stem: p for p in TOY_CONFIGS}
# 2 epochs of 4 steps, no time- or step-based checkpoints: only the epoch ends and a stop request save
EXTRA = {"train.epochs": 2, "data.limit_train_images": 32, "train.deterministic": True}


@pytest.fixture(scope="module")
def toy_root(toy_world):
    return toy_world / "imagenet100"


def _cfg(data_root, out_dir):
    return load_config(CONFIG["mocov2_blur"], tiny_overrides(data_root, out_dir, "mocov2", **EXTRA))


def _signal_at(global_step: int, signum: int, times: int = 1):
    """Send the signal(s) from the step hook, which runs after a step's save point: the next step sees it."""
    def hook(trainer):
        if trainer.runner.global_step == global_step:
            for _ in range(times):
                os.kill(os.getpid(), signum)
    return hook


def test_sigterm_mid_epoch_checkpoints_that_step_and_the_rerun_ends_where_an_unbroken_run_does(
        toy_root, tmp_path, capsys):
    reference = train(_cfg(toy_root, tmp_path / "a"))
    with STOP.installed(), pytest.raises(Terminated):
        train(_cfg(toy_root, tmp_path / "b"), step_hook=_signal_at(5, signal.SIGTERM))
    assert "SIGTERM: stopping after the current step" in capsys.readouterr().err
    meta = load_checkpoint(tmp_path / "b" / "checkpoint_last.pth")["meta"]
    # seen after step 6 = epoch 2, step 2 of 4: without the request the last checkpoint would be the end of epoch 1
    assert (meta["epoch"], meta["step_in_epoch"], meta["finished"]) == (1, 2, False)
    assert "stopped on request at epoch 2, step 2/4" in (tmp_path / "b" / "log.txt").read_text()
    resumed = train(_cfg(toy_root, tmp_path / "b"))
    a, b = load_checkpoint(reference)["backbone"], load_checkpoint(resumed)["backbone"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_mid_epoch_also_checkpoints_that_step(toy_root, tmp_path, capsys):
    with STOP.installed(), pytest.raises(KeyboardInterrupt) as stopped:
        train(_cfg(toy_root, tmp_path / "run"), step_hook=_signal_at(1, signal.SIGINT))
    assert not isinstance(stopped.value, Terminated)  # python -m pretrain: exit status 130, not 143
    assert "Ctrl-C: stopping after the current step" in capsys.readouterr().err
    meta = load_checkpoint(tmp_path / "run" / "checkpoint_last.pth")["meta"]
    assert (meta["epoch"], meta["step_in_epoch"]) == (0, 2)


def test_a_signal_on_an_epochs_last_step_stops_after_that_epoch_with_its_metrics(toy_root, tmp_path):
    with STOP.installed(), pytest.raises(Terminated):
        train(_cfg(toy_root, tmp_path / "run"), step_hook=_signal_at(4, signal.SIGTERM))
    meta = load_checkpoint(tmp_path / "run" / "checkpoint_last.pth")["meta"]
    assert (meta["epoch"], meta["step_in_epoch"]) == (1, 0)
    assert "stopped on request after epoch 1" in (tmp_path / "run" / "log.txt").read_text()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2  # epochs 0 and 1


def test_a_second_signal_stops_at_once_and_keeps_the_previous_checkpoint(toy_root, tmp_path):
    with STOP.installed(), pytest.raises(Terminated):
        train(_cfg(toy_root, tmp_path / "run"), step_hook=_signal_at(6, signal.SIGTERM, times=2))
    meta = load_checkpoint(tmp_path / "run" / "checkpoint_last.pth")["meta"]
    assert (meta["epoch"], meta["step_in_epoch"]) == (1, 0)  # the end of epoch 1, not step 6
    assert "stopped on request" not in (tmp_path / "run" / "log.txt").read_text()


def _raise_terminated(signum, frame):
    raise Terminated()


def test_without_the_handlers_a_signal_is_not_swallowed(toy_root, tmp_path):
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with pytest.raises(Terminated):  # train() called from Python: arming is a no-op
            train(_cfg(toy_root, tmp_path / "run"), step_hook=_signal_at(2, signal.SIGTERM))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not STOP.requested


def test_handlers_are_restored_after_the_command():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with STOP.installed():
        assert signal.getsignal(signal.SIGTERM) != before[0]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


class _WorkerSignals(Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> list[bool]:
        return [signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGTERM, signal.SIGINT)]


def test_data_workers_leave_sigterm_and_ctrl_c_to_the_trainer():
    """A scheduler signals every process: a worker killed by it would break the step being saved."""
    loader = DataLoader(_WorkerSignals(), batch_size=None, num_workers=1, worker_init_fn=worker_init)
    assert next(iter(loader)) == [True, True]



class _SignalledWorker(Dataset):
    """A worker that receives the terminal's Ctrl-C (sent to the whole process group)."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> tuple[bool, int]:
        os.kill(os.getpid(), signal.SIGINT)  # the handler is inherited through fork: must neither raise nor record
        return STOP.requested, os.getpid()


def test_a_forked_worker_that_inherits_the_handlers_leaves_ctrl_c_to_the_trainer(capfd):
    with STOP.installed(), STOP.armed():
        loader = DataLoader(_SignalledWorker(), batch_size=None, num_workers=1, multiprocessing_context="fork")
        requested_in_worker, worker_pid = next(iter(loader))
        assert worker_pid != os.getpid() and not requested_in_worker
        assert not STOP.requested  # the worker's signal is not the trainer's
        assert "stopping after the current step" not in capfd.readouterr().err
        os.kill(os.getpid(), signal.SIGINT)
        assert STOP.requested  # the trainer's own signal still is


_INITIALISED: list[int] = []


class _WorkerState(Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> list:
        return [signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGTERM, signal.SIGINT)] + [list(_INITIALISED)]


def _library_worker_init(worker_id: int) -> None:  # stands for detectron2's worker_init_reset_seed
    _INITIALISED.append(worker_id)


def test_a_loader_built_by_a_library_gets_workers_that_ignore_the_signals_after_its_own_init():
    loader = DataLoader(_WorkerState(), batch_size=None, num_workers=1, worker_init_fn=_library_worker_init,
                        multiprocessing_context="fork")
    assert next(iter(loader)) == [False, False, [0]]  # torch alone: the workers die on the job's SIGTERM
    assert leave_signals_to_the_trainer(loader) is loader
    assert next(iter(loader)) == [True, True, [0]]
    wrapped = DataLoader(_WorkerState(), batch_size=None, num_workers=1, multiprocessing_context="fork")

    class Grouping:  # like detectron2's AspectRatioGroupedDataset: the DataLoader is its .dataset
        def __init__(self, dataset):
            self.dataset = dataset

    leave_signals_to_the_trainer(Grouping(wrapped))
    assert next(iter(wrapped))[:2] == [True, True]
    single = DataLoader(_WorkerState(), batch_size=None, num_workers=0)
    assert leave_signals_to_the_trainer(single).worker_init_fn is None  # no workers: nothing to change
