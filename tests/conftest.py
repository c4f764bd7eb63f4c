"""Shared fixtures: small synthetic CelebA folders and shards, built once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def celeba_root(tmp_path_factory) -> Path:
    """A 48-image synthetic CelebA root in the official layout."""
    from ddpdiff import synthetic

    return synthetic.make(tmp_path_factory.mktemp("celeba"), num=48, seed=0, workers=1, progress=False)
