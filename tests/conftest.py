"""Fixtures shared by the tests of Kalshi REST and of the backfill: the loopback fake and one client session."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.fake_kalshi_rest import FakeKalshiRest


@pytest.fixture
async def fake() -> AsyncIterator[FakeKalshiRest]:
    async with FakeKalshiRest() as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client
