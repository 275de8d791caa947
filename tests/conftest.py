"""Shared fixtures. Tests run from the repository root (`python -m pytest`)."""

from __future__ import annotations

import pytest

from imgcls_core.config import load_config


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    """scikit-learn's digits materialized once per test session (32x32 RGB PNG ImageFolder)."""
    from imgcls_core.data import materialize_digits

    return materialize_digits(tmp_path_factory.mktemp("data") / "digits", seed=0)


@pytest.fixture
def tiny_config(digits_root, tmp_path):
    """A config that trains a tiny network on digits in seconds."""

    def make(*overrides: str):
        return load_config(
            None,
            [
                "data.format=digits",
                f"data.root={digits_root}",
                "data.batch_size=64",
                "model.name=cnn3",
                "model.width=0.5",
                "train.epochs=2",
                "train.log_every=5",
                f"train.output_dir={tmp_path / 'run'}",
                *overrides,
            ],
        )

    return make
