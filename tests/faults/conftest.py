"""Fault tests run the real CLI (in-process through cli.main, or a subprocess where signals or a second
process matter) against the tiny preset."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(make_checkpoint) -> Path:
    return make_checkpoint("tiny-e2b")
