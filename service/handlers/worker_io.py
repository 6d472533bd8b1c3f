"""Two costs of TorchServe 0.12's worker process on every call, cut from inside the handler.

- Its reads of the frontend's socket: the frontend sends each call the entries of every request in flight
  (id, headers, parameters), and ts/protocol/otf_message_handler.py reads each field with its own `recv`,
  about 30 system calls per request and call (2,000 per call at 64 streams). Each releases the GIL and
  takes it back, from the engine thread that needs it between its kernels. Here one `recv` of up to
  64 KiB fills a buffer and the fields are cut from it. Every read of that socket goes through ts's
  `_retrieve_buffer`, which this replaces, so no read can miss bytes already buffered.
- Its "Backend received inference at: <time>" line, logged on every call to the worker's stdout, which
  the frontend reads and logs again. The lines TorchServe's metrics come from (`[METRICS]...`) stay.

The calling thread's CPU per streamed event fell to 0.5-0.6x at 32 and 64 streams (BENCHMARKS.md,
"TorchServe's worker I/O"). TorchServe is pinned at 0.12.0, whose last release this is; `install` checks
the function it replaces is there and otherwise leaves TorchServe as it is.
"""
from __future__ import annotations

import logging
import sys
import weakref

log = logging.getLogger(__name__)

RECV_BYTES = 1 << 16
PER_CALL_LINE = "Backend received inference at: %d"  # ts/protocol/otf_message_handler.py retrieve_msg

_buffers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # socket -> bytes read, not yet taken
_installed = False


def read_exactly(conn, length: int) -> bytearray:
    """`length` bytes from `conn`, as ts's `_retrieve_buffer` returns them; like it, the process exits when
    the frontend has closed the socket (the worker has nothing left to serve)."""
    buf = _buffers.get(conn)
    if buf is None:
        buf = _buffers[conn] = bytearray()
    while len(buf) < length:
        pkt = conn.recv(max(RECV_BYTES, length - len(buf)))
        if not pkt:
            logging.info("Frontend disconnected.")
            sys.exit(0)
        buf += pkt
    data = buf[:length]
    del buf[:length]
    return data


def not_per_call_line(record: logging.LogRecord) -> bool:
    """A filter of the root logger: False for the line the worker logs on every call."""
    return record.msg != PER_CALL_LINE


def install() -> None:
    """Buffer the worker's reads and drop its per-call line (once per process)."""
    global _installed
    if _installed:
        return
    try:
        from ts.protocol import otf_message_handler
    except ImportError:  # not inside a TorchServe worker (unit tests of the handlers)
        return
    if not callable(getattr(otf_message_handler, "_retrieve_buffer", None)):
        log.warning("TorchServe's worker has no _retrieve_buffer: its socket reads are left unbuffered")
        return
    otf_message_handler._retrieve_buffer = read_exactly
    logging.getLogger().addFilter(not_per_call_line)
    _installed = True
