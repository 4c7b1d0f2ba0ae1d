"""Fixtures of the model-adapter tests."""

from __future__ import annotations

import pytest

from stafinetune.models import get_flavor


@pytest.fixture(params=["wan_tiny", "hunyuan_tiny"])
def flavor(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def full_window(flavor: str) -> list[int]:
    """A window covering the whole (5, 8, 8) canvas with tile (1, 2, 2): 5 x 4 x 4 tiles."""
    assert get_flavor(flavor).config["num_attention_heads"] == 4
    return [5, 4, 4]
