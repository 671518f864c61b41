"""Shared fixtures: a small synthetic world served on 127.0.0.1, and a real local Ray head."""

from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("NLTK_DATA", os.path.join(REPO, ".cache", "nltk_data"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep every Ray address on loopback
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from pipeline import ray_local, synthetic  # noqa: E402


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> synthetic.World:
    """60 train + 24 val samples, 10% bad rows, seed 0."""
    return synthetic.write_world(str(tmp_path_factory.mktemp("world")), n_train=60, n_val=24, seed=0, bad_fraction=0.1)


@pytest.fixture(scope="session")
def served_world(world):
    """(world, base_url, {split: {format: path}}) while the world is served on 127.0.0.1."""
    with synthetic.serve(world.root) as base_url:
        yield world, base_url, synthetic.render_sources(world, base_url)


@pytest.fixture(scope="session")
def ray_head():
    """A real Ray head (`ray start --head --node-ip-address=127.0.0.1`), shared by the session."""
    head = ray_local.start_head(num_cpus=2)
    yield head
    head.stop()
