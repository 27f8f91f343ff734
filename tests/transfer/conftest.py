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
