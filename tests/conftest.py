"""Shared fixtures."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import aioresponses.core as aioresponses_core
import pytest
from aioresponses import aioresponses
from hypothesis import settings
from yarl import URL

# `make mutate` selects this profile (pyproject [tool.mutmut]): every mutant meets the same examples and none
# are saved between runs, so a mutant's verdict never depends on chance or on another mutant's run.
settings.register_profile("mutation", derandomize=True, database=None)


class _UploadedWriter:
    """Stands in for the request's stream writer: the mocked upload is already complete."""

    output_size = 0


class _MockedResponse(aiohttp.ClientResponse):
    """ClientResponse as aioresponses 0.7.9 builds it, plus the ``stream_writer`` aiohttp 3.14 requires."""

    def __init__(self, method: str, url: URL, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", _UploadedWriter())
        super().__init__(method, url, **kwargs)


@pytest.fixture
def mocked(monkeypatch: pytest.MonkeyPatch) -> Iterator[aioresponses]:
    """Patch aiohttp with aioresponses for narrow client tests."""
    # aioresponses 0.7.9 predates aiohttp 3.14's required ClientResponse(stream_writer=...)
    # (pnuckowski/aioresponses#289, unreleased fix #288); drop this shim once a release has it.
    monkeypatch.setattr(aioresponses_core, "ClientResponse", _MockedResponse)
    with aioresponses() as m:
        yield m


@pytest.fixture
def tokyo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Set the machine's local time zone to Asia/Tokyo (UTC+9, no DST) for one test."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        assert time.timezone == -9 * 3600, "Asia/Tokyo unknown here (tzdata missing?)"
        yield
    finally:
        monkeypatch.undo()
        time.tzset()
