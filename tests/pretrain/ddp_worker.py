"""Run by test_distributed.py under torchrun (2 CPU processes, gloo): one MoCo v2 and one SimCLR run."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from pretrain import distributed
from pretrain.config import load_config
from pretrain.engine import train
from tests.pretrain.engine_helpers import REPO, tiny_overrides

if __name__ == "__main__":
    data_root, out_root = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    distributed.setup("cpu")
    for name in ("mocov2_hp", "simclr_mean"):
        method = name.split("_")[0]
        extra = {"knn.enabled": True, "knn.k": 3, "data.limit_train_images": 16}
        cfg = load_config(REPO / "configs" / "pretrain" / "toy" / f"{name}.yaml",
                          tiny_overrides(data_root, out_root / name, method, **extra))
        train(cfg)
        # Every process must hold the same weights after the synchronized steps.
        state = torch.cat([p.detach().flatten() for p in torch.load(out_root / name / "final.pth",
                                                                     weights_only=True)["backbone"].values()])
        gathered = distributed.gather_no_grad(state[None])
        assert torch.equal(gathered[0], gathered[1])
    distributed.teardown()
