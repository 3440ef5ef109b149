"""The ``case`` fixture: each tiny denoiser of :mod:`tiny_cases` in turn."""

import pytest
from tiny_cases import CASES, Case, make_case


@pytest.fixture(params=CASES)
def case(request) -> Case:
    return make_case(request.param)
