"""A server in a thread over an export, for the server tests (imported by name: pytest puts this folder on
sys.path)."""

from __future__ import annotations

import contextlib
import threading
import time


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
