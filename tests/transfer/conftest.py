"""Fixtures for the converter tests (layouts are written by :mod:`tests.transfer.checkpoint_layouts`)."""

from __future__ import annotations

import pytest

from tests.transfer.checkpoint_layouts import write_layout


@pytest.fixture
def layout_factory(tmp_path):
    """``make(layout, arch="resnet18", seed=0) -> (path, expected trunk)`` in a fresh directory."""

    def make(layout: str, arch: str = "resnet18", seed: int = 0):
        return write_layout(tmp_path, layout, arch, seed)

    return make


@pytest.fixture(scope="session")
def toy_pretrained_checkpoint(toy_world, tmp_path_factory):
    """A ResNet-18 trained with labels on the toy world for a few seconds (suite format, 32 px): the
    "pretrained" backbone the linear-evaluation tests compare with random init."""
    from tests.transfer.linear_support import train_toy_supervised

    return train_toy_supervised(toy_world, tmp_path_factory.mktemp("toy_pretrained") / "supervised_r18.pth")
