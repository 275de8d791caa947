"""Fixtures for the data tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from imgdata import make_image_folder


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny images gain nothing from intra-op threads; on a busy 2-core machine they only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def image_folder(tmp_path):
    """A factory: ``image_folder(layout, seed=0, name="tree")`` -> the tree's root."""

    def make(layout: dict[str, dict[str, int]], seed: int = 0, name: str = "tree") -> Path:
        return make_image_folder(tmp_path / name, layout, seed)

    return make
