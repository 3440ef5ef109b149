"""Tiny pipelines saved to disk, and a prompts file, for the command-line tests."""

from pathlib import Path

import pytest

from diffquant.models.tiny_pipelines import TINY_PIPELINES

# the tiny pipelines make 16×16 images; PixArt's T5 prompt is 8 tokens, its resolution binning is off
SD_RUN = ["--steps", "2", "--height", "16", "--width", "16"]
PIXART_RUN = [*SD_RUN, "--pipe-arg", "max_sequence_length=8", "--pipe-arg", "use_resolution_binning=false"]


@pytest.fixture(scope="session")
def saved_pipeline(tmp_path_factory):
    """``saved_pipeline(name) -> Path``: the tiny ``name`` pipeline ("sd", "pixart") saved with
    ``save_pretrained`` (built on first use, shared by the session; tests must not modify it)."""
    saved: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in saved:
            path = tmp_path_factory.mktemp(f"cli-{name}")
            TINY_PIPELINES[name]().save_pretrained(path)
            saved[name] = path
        return saved[name]

    return get


@pytest.fixture
def prompts(tmp_path) -> Path:
    """A prompts file: two prompts, a comment and a blank line."""
    file = tmp_path / "prompts.txt"
    file.write_text("# calibration prompts\na cat\n\na red car\n", encoding="utf-8")
    return file


README = Path(__file__).parents[2] / "README.md"
README_SECTION = "## Calibrate and quantize a pipeline from the command line"


def readme_command(program: str, paths: dict[str, object]) -> list[str]:
    """The arguments of the README command line starting with ``program`` (in the command-line section):
    after ``diffquant`` (for ``main``) or after ``python SCRIPT`` (for the script's ``main``), with its
    placeholder paths replaced by ``paths`` (every ``path/to/...`` must be replaced)."""
    import shlex

    section = README.read_text(encoding="utf-8").split(README_SECTION, 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith(program + " ")]
    assert len(lines) == 1, f"expected one README line starting with {program!r}, found {lines}"
    argv = [
        str(paths.get(token, token))
        for token in shlex.split(lines[0])[2 if program.startswith("python ") else 1 :]
    ]
    assert not [a for a in argv if a.startswith("path/to/")], f"unreplaced placeholder in {argv}"
    return argv
