"""One rule for a server a test needs that cannot start: a skip on a developer machine, a failure in CI."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def unavailable(what: str, exc: Exception) -> NoReturn:
    if os.environ.get("CI") == "true":
        raise exc  # in CI a server that cannot start is a failure, never a skip
    pytest.skip(f"{what} unavailable: {exc}")
