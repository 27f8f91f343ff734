"""Online weighted kNN monitor (InstDisc / MoCo style): a health check of the representation each epoch.

Memory bank: L2-normalized backbone features of the training split (deterministic eval view:
Resize + CenterCrop, the model's input filter applied); queries: the held-out split. Each query takes
its ``k`` most cosine-similar bank entries, weights them by ``exp(sim / T)`` and votes for their labels;
top-1 is the share of queries whose vote is right (Wu et al. 2018, k = 200, T = 0.1 in MoCo's demo).

Feature extraction is split over the processes and gathered, so it scales with torchrun.

``python -m pretrain.knn CONFIG.yaml [--weights CKPT | --random] [key=value ...]`` evaluates a checkpoint
or a random initialization exactly as the monitor does (the baseline every run is compared to).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from pretrain import distributed
from pretrain.augment import EvalTransform, normalize
from pretrain.data import (
    DataError,
    ImageFolderDataset,
    balanced_subset,
    collate_samples,
    without_worker_traceback,
    worker_init,
)

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def weighted_knn_predict(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                         k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Class scores (Q, num_classes) of L2-normalized ``query`` features against the ``bank``."""
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, query.shape[0], chunk):
        similarity = query[start:start + chunk] @ bank.t()
        top_sim, top_index = similarity.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(similarity.shape[0], num_classes, device=query.device, dtype=weights.dtype)
        votes.scatter_add_(1, bank_labels[top_index], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(query: torch.Tensor, query_labels: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
                 num_classes: int, k: int = 200, temperature: float = 0.1) -> dict[str, float]:
    scores = weighted_knn_predict(query, bank, bank_labels, num_classes, k, temperature)
    ranked = scores.argsort(dim=1, descending=True)
    top1 = (ranked[:, 0] == query_labels).float().mean().item() * 100
    result = {"knn_top1": top1}
    if num_classes > 5:
        result["knn_top5"] = (ranked[:, :5] == query_labels[:, None]).any(1).float().mean().item() * 100
    return result


class KnnMonitor:
    """Bank/query datasets built once; :meth:`evaluate` extracts features and scores them."""

    def __init__(self, cfg: Any, world: distributed.World):
        self.cfg, self.world = cfg, world
        transform = EvalTransform(cfg.augment)
        bank = ImageFolderDataset(cfg.data.root, cfg.data.train_split, transform, seed=int(cfg.seed))
        queries = ImageFolderDataset(cfg.data.root, cfg.data.val_split, transform, seed=int(cfg.seed))
        if bank.classes != queries.classes:
            # name the folders, not just "differ": with 100 classes the user cannot spot them otherwise
            train, val = cfg.data.train_split, cfg.data.val_split
            only_train = sorted(set(bank.classes) - set(queries.classes))
            only_val = sorted(set(queries.classes) - set(bank.classes))
            raise DataError(f"the class folders of {train} and {val} differ (only in {train}: "
                            f"{only_train[:5] or 'none'}; only in {val}: {only_val[:5] or 'none'}): the kNN "
                            "monitor needs the same class folders in both splits; fix the folders, or pass "
                            "knn.enabled=false")
        if cfg.knn.bank_per_class:
            bank.samples = balanced_subset(bank.samples, int(cfg.knn.bank_per_class) * len(bank.classes),
                                           int(cfg.seed))
        if cfg.knn.max_queries and len(queries) > int(cfg.knn.max_queries):
            queries.samples = balanced_subset(queries.samples, int(cfg.knn.max_queries), int(cfg.seed))
        self.bank, self.queries = bank, queries
        self.num_classes = len(bank.classes)
        self.skipped: set[str] = set()

    def _features(self, dataset: ImageFolderDataset, feature_fn: FeatureFn) -> tuple[torch.Tensor, torch.Tensor]:
        world, device = self.world, self.world.device
        per_rank = -(-len(dataset) // world.world_size)
        indices = [min(i, len(dataset) - 1) for i in range(world.rank * per_rank, (world.rank + 1) * per_rank)]
        loader = DataLoader(Subset(dataset, indices), batch_size=int(self.cfg.knn.batch_size), shuffle=False,
                            num_workers=min(int(self.cfg.data.num_workers), 4), collate_fn=collate_samples,
                            worker_init_fn=worker_init)
        features, labels = [], []
        for raw in loader:
            self.skipped.update(raw["skipped"])
            images = normalize(raw["views"]["image"].to(device, non_blocking=True))
            features.append(F.normalize(feature_fn(images).float(), dim=1))
            labels.append(raw["labels"].to(device))
        feats, labs = torch.cat(features), torch.cat(labels)
        feats, labs = distributed.gather_no_grad(feats), distributed.gather_no_grad(labs)
        return feats[:len(dataset)], labs[:len(dataset)]

    @torch.no_grad()
    def evaluate(self, feature_fn: FeatureFn) -> dict[str, float]:
        bank, bank_labels = self._features(self.bank, feature_fn)
        query, query_labels = self._features(self.queries, feature_fn)
        return knn_accuracy(query, query_labels, bank, bank_labels, self.num_classes,
                            int(self.cfg.knn.k), float(self.cfg.knn.temperature))


def main(argv: list[str] | None = None) -> int:
    from pretrain.backbones import build_resnet
    from pretrain.checkpoint import CheckpointError, load_checkpoint
    from pretrain.config import ConfigError, load_config
    from pretrain.filters import InputFilter
    from pretrain.guided_masking import input_filter_spec

    parser = argparse.ArgumentParser(prog="python -m pretrain.knn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="pretraining config (data, image size, kNN settings)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--weights", help="a suite checkpoint (e.g. RUN/final.pth)")
    which.add_argument("--random", action="store_true",
                       help="a randomly initialised backbone (seed from config), seen through the config's input "
                            "filter as the monitor's epoch 0 is (the high-pass filter for hp and MSCN configs)")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        world = distributed.World()
        if args.random:
            torch.manual_seed(int(cfg.seed))
            trunk, filter_spec = build_resnet(cfg.model.arch), input_filter_spec(cfg)
        else:
            checkpoint = load_checkpoint(args.weights)
            trunk = build_resnet(checkpoint["meta"]["arch"])
            trunk.load_state_dict(checkpoint["backbone"])
            filter_spec = checkpoint["meta"].get("input_filter")
        trunk.eval()
        input_filter = InputFilter(filter_spec)
        monitor = KnnMonitor(cfg, world)
        result = monitor.evaluate(lambda x: trunk(input_filter(x)))
    except (ConfigError, CheckpointError, ValueError, OSError) as err:
        print(f"error: {without_worker_traceback(err)}", file=sys.stderr)  # a worker's error: its message
        return 2
    for name in sorted(monitor.skipped):
        print(f"warning: unreadable image skipped (replaced by the next readable one): {name}", file=sys.stderr)
    print(" ".join(f"{k}={v:.2f}" for k, v in result.items()) + f" skipped_images={len(monitor.skipped)}"
          f" input_filter={input_filter.spec['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
