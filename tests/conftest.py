"""Fixtures shared by every test: an isolated cache per test and the real datasets, if present."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def llamarec_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point ``LLAMAREC_CACHE`` at a fresh directory so no test sees another's cache (or ~)."""
    cache = tmp_path_factory.mktemp("llamarec-cache")
    monkeypatch.setenv("LLAMAREC_CACHE", str(cache))
    monkeypatch.delenv("LLAMAREC_DEBUG", raising=False)
    return cache


@pytest.fixture
def shared_data() -> Path:
    """The read-only real datasets next to the repository (``../shared/data``); skip without them."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not available at {SHARED_DATA}")
    return SHARED_DATA
