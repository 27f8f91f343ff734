"""A real 2-process torchrun run on CPU (gloo): MoCo's cross-process shuffle-BN, SimCLR's global NT-Xent."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pretrain.checkpoint import load_checkpoint
from tests.pretrain.engine_helpers import REPO


@pytest.mark.slow
def test_two_process_torchrun_trains_both_methods(toy_world, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests" / "pretrain" / "ddp_worker.py"), str(toy_world / "imagenet100"), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    moco = load_checkpoint(tmp_path / "mocov2_hp" / "final.pth")["meta"]
    assert (moco["world_size"], moco["shuffle_bn"], moco["finished"]) == (2, "ddp", True)
    assert 0 <= moco["knn_top1"] <= 100
    simclr = load_checkpoint(tmp_path / "simclr_mean" / "final.pth")["meta"]
    assert (simclr["world_size"], simclr["global_batch"], simclr["strategy"]) == (2, 8, "mean")
