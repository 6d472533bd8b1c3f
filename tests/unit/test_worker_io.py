"""TorchServe's worker reading the frontend's messages through worker_io's buffer: the same messages as its own
reads, whatever the way the bytes arrive."""
import logging
import socket
import struct
import threading

import pytest
from ts.protocol import otf_message_handler as otf

from rnnserve.service.handlers import worker_io


def _field(value: bytes) -> bytes:
    return struct.pack("!i", len(value)) + value


def inference_message(requests: list[tuple[bytes, dict[bytes, bytes], bytes]]) -> bytes:
    """A predict message as the frontend encodes it: per request its id, headers and one JSON parameter."""
    out = b"I"
    for rid, headers, body in requests:
        out += _field(rid)
        for name, value in headers.items():
            out += _field(name) + _field(value)
        out += struct.pack("!i", -1)
        out += _field(b"body") + _field(b"application/json") + _field(body)
        out += struct.pack("!i", -1)
    return out + struct.pack("!i", -1)


HEADERS = {b"Host": b"127.0.0.1:8080", b"X-Request-Id": b"r-1", b"Content-Type": b"application/json"}
FIRST = inference_message([(b"id-a", HEADERS, b'{"prompt": "ROMEO:", "max_tokens": 4}'),
                           (b"id-b", HEADERS, b"{}")])
SECOND = inference_message([(b"id-b", HEADERS, b"{}"), (b"id-c", {}, b'{"prompt": "' + b"x" * 100_000 + b'"}')])


def read_both(data: bytes, pieces: int, reader) -> list:
    """The two messages `data` holds, sent in `pieces` writes, as ts's retrieve_msg decodes them with `reader`."""
    ours, theirs = socket.socketpair()
    step = max(1, len(data) // pieces)
    sender = threading.Thread(target=lambda: [theirs.sendall(data[i:i + step]) for i in range(0, len(data), step)])
    sender.start()
    original = otf._retrieve_buffer
    otf._retrieve_buffer = reader
    try:
        return [otf.retrieve_msg(ours), otf.retrieve_msg(ours)]
    finally:
        otf._retrieve_buffer = original
        sender.join()
        ours.close()
        theirs.close()


@pytest.mark.parametrize("pieces", [1, 7, 5_000])
def test_the_buffered_reads_decode_the_same_messages_as_torchserves_own(pieces):
    data = FIRST + SECOND
    expected = read_both(data, 1, otf._retrieve_buffer)
    assert [cmd for cmd, _ in expected] == [b"I", b"I"]
    assert [r["requestId"] for r in expected[1][1]] == [b"id-b", b"id-c"]
    assert read_both(data, pieces, worker_io.read_exactly) == expected


def test_a_closed_frontend_ends_the_worker_as_torchserve_does():
    ours, theirs = socket.socketpair()
    theirs.sendall(FIRST[:10])
    theirs.close()
    assert worker_io.read_exactly(ours, 4) == bytearray(FIRST[:4])
    with pytest.raises(SystemExit):
        worker_io.read_exactly(ours, 100)
    ours.close()


def test_the_per_call_line_is_dropped_and_every_other_line_kept(monkeypatch):
    monkeypatch.setattr(worker_io, "_installed", False)
    monkeypatch.setattr(otf, "_retrieve_buffer", otf._retrieve_buffer)  # restored after the test
    root = logging.getLogger()
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)  # the worker's level (ts/model_service_worker.py)
    try:
        worker_io.install()
        assert otf._retrieve_buffer is worker_io.read_exactly
        logging.info("Backend received inference at: %d", 1764500000)
        logging.info("Frontend disconnected.")
        logging.getLogger("ts.metrics.caching_metric").info("[METRICS]PredictionTime.Milliseconds:3.1|#Level:Model")
    finally:
        root.removeHandler(handler)
        root.removeFilter(worker_io.not_per_call_line)
        root.setLevel(level)
    assert seen == ["Frontend disconnected.", "[METRICS]PredictionTime.Milliseconds:3.1|#Level:Model"]
