"""A real uvicorn server on a loopback port, in a thread of the test process, for tests of the gateway's
connection handling that need no TorchServe."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

HANG_S = 30.0  # a bound that only a hang reaches


@contextmanager
def serving(config: uvicorn.Config) -> Iterator[None]:
    """Run `config`'s server until the block ends."""
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + HANG_S
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield
    finally:
        srv.should_exit = True
        thread.join(HANG_S)
