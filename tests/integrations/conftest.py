"""Tiny diffusers pipelines saved once per session, so tests run the user's ``from_pretrained`` code."""

from pathlib import Path

import pytest

from diffquant.models.tiny_pipelines import TINY_PIPELINES


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory):
    """``pipeline_dir(name) -> Path``: the tiny ``name`` pipeline ("sd", "pixart", "sd3", "flux") saved
    with ``save_pretrained`` (built on first use, shared by the session)."""
    saved: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in saved:
            path = tmp_path_factory.mktemp(f"tiny-{name}")
            TINY_PIPELINES[name]().save_pretrained(path)
            saved[name] = path
        return saved[name]

    return get
