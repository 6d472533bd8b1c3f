"""TorchServe's worker reading the frontend's messages through worker_io's buffer and decoder: the same messages
and handler inputs as its own code makes, whatever the way the bytes arrive, and a request sent again unchanged
not decoded again."""
import logging
import socket
import struct
import threading

import pytest
from ts.protocol import otf_message_handler as otf
from ts.service import Service

from rnnserve.service.handlers import worker_io

# TorchServe's own functions, taken before any test runs: a handler test's initialize installs worker_io in this
# process (frames.handler_setup), after which the module attributes are worker_io's
TS_READ, TS_DECODE = otf._retrieve_buffer, otf._retrieve_inference_msg
TS_INPUTS = Service.__dict__["retrieve_data_for_inference"].__func__
assert {f.__module__ for f in (TS_READ, TS_DECODE, TS_INPUTS)} == {"ts.protocol.otf_message_handler", "ts.service"}


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
    originals = otf._retrieve_buffer, otf._retrieve_inference_msg
    otf._retrieve_buffer, otf._retrieve_inference_msg = reader, TS_DECODE
    try:
        return [otf.retrieve_msg(ours), otf.retrieve_msg(ours)]
    finally:
        otf._retrieve_buffer, otf._retrieve_inference_msg = originals
        sender.join()
        ours.close()
        theirs.close()


@pytest.mark.parametrize("pieces", [1, 7, 5_000])
def test_the_buffered_reads_decode_the_same_messages_as_torchserves_own(pieces):
    data = FIRST + SECOND
    expected = read_both(data, 1, TS_READ)
    assert [cmd for cmd, _ in expected] == [b"I", b"I"]
    assert [r["requestId"] for r in expected[1][1]] == [b"id-b", b"id-c"]
    assert read_both(data, pieces, worker_io.read_exactly) == expected


def read_with(data: bytes, messages: int, pieces: int, decoder) -> list:
    """The `messages` predict messages of `data`, sent in `pieces` writes, decoded by `decoder`."""
    ours, theirs = socket.socketpair()
    step = max(1, len(data) // pieces)
    sender = threading.Thread(target=lambda: [theirs.sendall(data[i:i + step]) for i in range(0, len(data), step)])
    sender.start()
    try:
        out = []
        for _ in range(messages):
            assert worker_io.read_exactly(ours, 1) == b"I"
            out.append(decoder(ours))
        return out
    finally:
        sender.join()
        ours.close()
        theirs.close()


def torchserves(conn) -> list:
    """ts's own decoder over worker_io's buffered reads (shown equal to its unbuffered reads above)."""
    original = otf._retrieve_buffer
    otf._retrieve_buffer = worker_io.read_exactly
    try:
        return TS_DECODE(conn)
    finally:
        otf._retrieve_buffer = original


# two streams over four calls: A's first carries its body; the frontend then sends A's id and headers again (in
# flight) beside B's first; then both in flight, unchanged; then A with one header changed
A_NEW = (b"id-a", HEADERS, b'{"prompt": "ROMEO:", "max_tokens": 4}')
A_AGAIN = (b"id-a", HEADERS, None)
B_NEW = (b"id-b", {b"Host": b"h"}, b'{"prompt": "' + "é".encode() * 40_000 + b'"}')
B_AGAIN = (b"id-b", {b"Host": b"h"}, None)
A_CHANGED = (b"id-a", {**HEADERS, b"X-Request-Id": b"r-2"}, None)
CALLS = [[A_NEW], [A_AGAIN, B_NEW], [A_AGAIN, B_AGAIN], [A_CHANGED, B_AGAIN]]


def in_flight_message(requests) -> bytes:
    """inference_message, where a request without a body is sent as the frontend sends one in flight."""
    out = b"I"
    for rid, headers, body in requests:
        out += _field(rid) + b"".join(_field(n) + _field(v) for n, v in headers.items()) + struct.pack("!i", -1)
        if body is not None:
            out += _field(b"body") + _field(b"application/json") + _field(body)
        out += struct.pack("!i", -1)
    return out + struct.pack("!i", -1)


@pytest.mark.parametrize("pieces", [1, 9, 5_000])
def test_the_decoder_gives_torchserves_requests_and_decodes_an_unchanged_one_once(pieces):
    data = b"".join(in_flight_message(call) for call in CALLS)
    expected = read_with(data, len(CALLS), 1, torchserves)
    got = read_with(data, len(CALLS), pieces, worker_io.read_inference_msg)
    assert got == expected
    assert [[r["requestId"] for r in call] for call in got] == [[b"id-a"], [b"id-a", b"id-b"], [b"id-a", b"id-b"],
                                                                [b"id-a", b"id-b"]]
    assert got[1][1]["parameters"][0]["value"]["prompt"] == "é" * 40_000 and got[2][1]["parameters"] == []
    # the same bytes as the request's entry in the call before: the same objects; other bytes: decoded anew
    assert got[2][0] is got[1][0] and got[3][1] is got[2][1]
    assert got[1][0] is not got[0][0] and got[2][1] is not got[1][1] and got[3][0] is not got[2][0]


def test_the_handler_inputs_are_torchserves_and_made_once_per_decoded_request():
    batch = read_with(in_flight_message(CALLS[1]), 1, 1, worker_io.read_inference_msg)[0]
    theirs = TS_INPUTS(batch)
    ours = worker_io.inputs_for_handler(batch)
    assert ours[1:] == theirs[1:]  # inputs and ids
    assert ours[1] == [{}, {"body": {"prompt": "é" * 40_000}}] and ours[2] == {0: "id-a", 1: "id-b"}
    assert [p.get_request_properties() for p in ours[0]] == [p.get_request_properties() for p in theirs[0]]
    assert ours[0][1].get_request_properties() == {"body": {"content-type": "application/json"}, "Host": "h"}
    again = worker_io.inputs_for_handler(batch)
    assert all(a is b for a, b in zip(again[0] + again[1], ours[0] + ours[1]))
    with pytest.raises(ValueError, match="Received invalid inputs"):
        worker_io.inputs_for_handler(None)


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
    for obj, name in ((otf, "_retrieve_buffer"), (otf, "_retrieve_inference_msg"),
                      (Service, "retrieve_data_for_inference")):
        monkeypatch.setattr(obj, name, obj.__dict__[name])  # restored after the test
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
        assert otf._retrieve_inference_msg is worker_io.read_inference_msg
        assert Service.retrieve_data_for_inference is worker_io.inputs_for_handler
        logging.info("Backend received inference at: %d", 1764500000)
        logging.info("Frontend disconnected.")
        logging.getLogger("ts.metrics.caching_metric").info("[METRICS]PredictionTime.Milliseconds:3.1|#Level:Model")
    finally:
        root.removeHandler(handler)
        root.removeFilter(worker_io.not_per_call_line)
        root.setLevel(level)
    assert seen == ["TorchServe's worker trimmed: buffered reads, each request in flight decoded once, no per-call "
                    "line", "Frontend disconnected.", "[METRICS]PredictionTime.Milliseconds:3.1|#Level:Model"]
