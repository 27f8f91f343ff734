"""Dataset reading: clear layout errors, unreadable images skipped and reported, resumable order."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from pretrain.data import DataError, ImageFolderDataset, ResumableSampler, collate_samples, find_images
from tests.pretrain.engine_helpers import make_image_folder


def _identity(image):
    return torch.tensor(list(image.getpixel((0, 0))))


def test_missing_directory_split_and_empty_class_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="data directory not found.*data.root"):
        find_images(tmp_path / "nowhere", "train")
    make_image_folder(tmp_path, {"a": 2, "b": 2}, splits=("train",))
    with pytest.raises(DataError, match="split directory not found.*val"):
        find_images(tmp_path, "val")
    (tmp_path / "train" / "c").mkdir()
    with pytest.raises(DataError, match=r"class folder .*train/c holds no images"):
        find_images(tmp_path, "train")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders"):
        find_images(tmp_path / "empty", "train")


def test_unreadable_image_is_replaced_by_the_next_and_reported(tmp_path):
    make_image_folder(tmp_path, {"a": 3}, splits=("train",))
    broken = tmp_path / "train" / "a" / "img_1.png"
    broken.write_bytes(b"this is not a png")
    dataset = ImageFolderDataset(tmp_path, "train", _identity)
    sample = dataset[1]
    assert sample.skipped == [str(broken)]
    assert torch.equal(sample.views, dataset[2].views)  # the next readable image stands in
    batch = collate_samples([dataset[0], dataset[1], dataset[2]])
    assert batch["skipped"] == [str(broken)] and batch["views"].shape == (3, 3)


def test_image_whose_header_claims_a_huge_size_is_skipped_like_a_corrupt_one(tmp_path, monkeypatch):
    make_image_folder(tmp_path, {"a": 3}, size=40, splits=("train",))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40 // 3)  # 40x40 is now over PIL's bomb limit
    Image.new("RGB", (20, 20)).save(tmp_path / "train" / "a" / "img_0.png")  # small enough to read
    Image.new("RGB", (20, 20)).save(tmp_path / "train" / "a" / "img_2.png")
    dataset = ImageFolderDataset(tmp_path, "train", _identity)
    assert dataset[1].skipped == [str(tmp_path / "train" / "a" / "img_1.png")]


def test_views_depend_on_seed_epoch_and_index_only(tmp_path):
    make_image_folder(tmp_path, {"a": 2}, splits=("train",))
    dataset = ImageFolderDataset(tmp_path, "train", lambda image: torch.rand(4), seed=3)
    torch.manual_seed(0)
    first = dataset[(1, 0)].views
    torch.manual_seed(123)  # the global RNG (e.g. of another worker) does not matter
    assert torch.equal(dataset[(1, 0)].views, first)
    assert not torch.equal(dataset[(2, 0)].views, first)
    assert not torch.equal(ImageFolderDataset(tmp_path, "train", lambda image: torch.rand(4), seed=4)[(1, 0)].views,
                           first)


def test_sampler_resumes_mid_epoch_and_partitions_processes():
    full = ResumableSampler(20, batch_size=3, seed=1)
    full.set_epoch(4)
    order = list(full)
    assert len(order) == 18 and all(epoch == 4 for epoch, _ in order)  # 6 whole batches (drop last)
    resumed = ResumableSampler(20, batch_size=3, seed=1)
    resumed.set_epoch(4, start_batch=2)
    assert list(resumed) == order[6:] and len(resumed) == 12
    ranks = [ResumableSampler(20, batch_size=3, rank=r, world_size=2, seed=1) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(4)
    seen = [index for sampler in ranks for _, index in sampler]
    assert len(seen) == len(set(seen)) == 18
    with pytest.raises(DataError, match="fewer than one global batch"):
        ResumableSampler(5, batch_size=3, world_size=2)


def test_data_root_or_split_that_is_a_file_is_named_as_a_file_not_as_missing(tmp_path):
    (tmp_path / "root_file").write_text("x")
    with pytest.raises(DataError, match=r"data.root=.*root_file is a file, not a directory") as caught:
        find_images(tmp_path / "root_file", "train")
    assert "not found" not in str(caught.value)  # the path is there: "not found" would send the user looking
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train").write_text("x")
    with pytest.raises(DataError, match=r"data/train is a file, not a split directory"):
        find_images(tmp_path / "data", "train")


def test_a_data_error_raised_in_a_loader_worker_keeps_its_one_line_message(tmp_path):
    from torch.utils.data import DataLoader

    from pretrain.data import without_worker_traceback

    (tmp_path / "train" / "a").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "train" / "a" / f"img_{i}.jpg").write_text("not an image")
    dataset = ImageFolderDataset(tmp_path, "train", _identity)
    with pytest.raises(DataError) as direct:
        dataset[0]
    loader = DataLoader(dataset, batch_size=2, num_workers=1, collate_fn=collate_samples)
    with pytest.raises(DataError) as from_worker:
        next(iter(loader))
    assert "Traceback" in str(from_worker.value)  # what DataLoader does: the worker's traceback in the message
    assert without_worker_traceback(from_worker.value) == str(direct.value)
    assert without_worker_traceback(direct.value) == str(direct.value)  # other messages are left alone
