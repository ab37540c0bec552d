"""One tiny export (shared with the other suites through make_export) and a server over it."""

from __future__ import annotations

import pytest
from serving import served

from gemma4_compile.runtime import open_runner


@pytest.fixture(scope="session")
def export_dir(make_export):
    return make_export("tiny-e2b")


@pytest.fixture(scope="session")
def runner(export_dir):
    return open_runner(export_dir, threads=1)


@pytest.fixture(scope="session")
def server(export_dir):
    """(base_url, service) of a server over the tiny export; stopped at the end of the session."""
    with served(export_dir) as pair:
        yield pair
