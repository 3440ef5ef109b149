"""Shared test set-up: offline hub, one torch thread per test worker, a bitsandbytes compile guard."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

# `make test` runs two pytest-xdist workers on two cores; small models run far faster on one thread
# each than on two contended ones.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)
