"""Shared fixtures: real local servers (Tansu, InfluxDB 1.x), started once per test session.

A server that cannot start skips the tests that need it on a developer machine, but fails them in CI
(CI=true), where a silent skip would hide a broken setup.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterator

import pytest

from connectors.localstack import InfluxD, ServerStartError, Tansu
from tests.servers import unavailable

TEST_DATABASE = "iotad_test"


@pytest.fixture(scope="session")
def tansu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tansu]:
    """A running Tansu broker (in-memory); use unique topic names per test."""
    server = Tansu(tmp_path_factory.mktemp("tansu"))
    try:
        server.start()
    except ServerStartError as exc:
        unavailable("Tansu", exc)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def influxd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxD]:
    """A running InfluxDB 1.x with the database TEST_DATABASE created."""
    server = InfluxD(tmp_path_factory.mktemp("influxd"))
    try:
        server.start()
        server.create_database(TEST_DATABASE)
    except ServerStartError as exc:
        server.stop()
        unavailable("InfluxDB", exc)
    try:
        yield server
    finally:
        server.stop()


_counter = itertools.count()


@pytest.fixture
def unique_name() -> Callable[[str], str]:
    """unique_name("readings") -> "readings-3-1a2b3c4d": topic, group and measurement names never collide."""

    def make(prefix: str) -> str:
        return f"{prefix}-{next(_counter)}-{uuid.uuid4().hex[:8]}"

    return make
