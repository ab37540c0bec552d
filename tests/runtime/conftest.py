"""One tiny export (shared with the other suites through make_export) and a server over it."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from gemma4_compile.runtime import open_runner


@pytest.fixture(scope="session")
def export_dir(make_export):
    return make_export("tiny-e2b")


@pytest.fixture(scope="session")
def runner(export_dir):
    return open_runner(export_dir, threads=1)


@contextlib.contextmanager
def served(export_dir, max_batch: int = 8):
    """(base_url, service) of a server over `export_dir` on 127.0.0.1 in a thread, stopped on exit."""
    from gemma4_compile.runtime.server import bind, make_server
    from gemma4_compile.runtime.service import Service

    service = Service.open(export_dir, max_batch=max_batch, threads=1)
    sock = bind("127.0.0.1", 0)
    srv = make_server(service)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started, "the server did not start in 10 s"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", service
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        service.close()


@pytest.fixture(scope="session")
def server(export_dir):
    """(base_url, service) of a server over the tiny export; stopped at the end of the session."""
    with served(export_dir) as pair:
        yield pair
