"""Three costs of TorchServe 0.12's worker process on every call, cut from inside the handler.

- Its reads of the frontend's socket: the frontend sends each call the entries of every request in flight
  (id, headers, parameters), and ts/protocol/otf_message_handler.py reads each field with its own `recv`,
  about 30 system calls per request and call (2,000 per call at 64 streams). Each releases the GIL and
  takes it back, from the engine thread that needs it between its kernels. Here one `recv` of up to
  64 KiB fills a buffer and the fields are cut from it. Every read of that socket goes through ts's
  `_retrieve_buffer`, which this replaces, so no read can miss bytes already buffered.
- Its decoding of those entries, again on every call: the frontend re-sends each request in flight (its id
  and headers; the body only with the first call), and ts decodes every field into new objects, then
  ts/service.py turns them into the handler's inputs: 0.45 ms per call at 32 streams, 24-38 ms at 1,024, all
  of it holding the GIL that the engine thread needs. Here an entry whose bytes are those of the same
  request's entry in the previous call is not decoded again: the call gets the objects decoded then
  (`read_inference_msg`, `inputs_for_handler`; about 1 ms per call at 1,024 streams). Only the entries of the
  last call are kept.
- Its "Backend received inference at: <time>" line, logged on every call to the worker's stdout, which
  the frontend reads and logs again. The lines TorchServe's metrics come from (`[METRICS]...`) stay.

With the buffer the calling thread's CPU per streamed event fell to 0.5-0.6x at 32 and 64 streams
(BENCHMARKS.md, "TorchServe's worker I/O"); decoding each request once cut the worker's CPU per token on the
synthetic model to about 0.8x at 64 and 1,024 streams ("Each request decoded once"). TorchServe is pinned at
0.12.0, whose last release this is; `install` checks the functions it replaces are there and otherwise leaves
TorchServe as it is.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import sys
import weakref
from typing import Any

log = logging.getLogger(__name__)

RECV_BYTES = 1 << 16
PER_CALL_LINE = "Backend received inference at: %d"  # ts/protocol/otf_message_handler.py retrieve_msg

_buffers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # socket -> bytes read, not yet taken
_installed = False
_INT = struct.Struct("!i")
_DECODED = "_rnnserve_inputs"  # a decoded entry's key: its handler inputs, once ts/service.py's function made them
# the last call's entries per socket: request id -> (the entry's bytes, the request as ts decodes it)
_entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _buffer(conn) -> bytearray:
    """The bytes read from `conn` and not yet taken."""
    buf = _buffers.get(conn)
    if buf is None:
        buf = _buffers[conn] = bytearray()
    return buf


def _receive(conn, buf: bytearray, wanted: int) -> None:
    """One `recv` of at least RECV_BYTES (more when `wanted` is more) onto `buf`. Like ts's `_retrieve_buffer`,
    the process exits when the frontend has closed the socket (the worker has nothing left to serve)."""
    pkt = conn.recv(max(RECV_BYTES, wanted))
    if not pkt:
        logging.info("Frontend disconnected.")
        sys.exit(0)
    buf += pkt


def read_exactly(conn, length: int) -> bytearray:
    """`length` bytes from `conn`, as ts's `_retrieve_buffer` returns them."""
    buf = _buffer(conn)
    while len(buf) < length:
        _receive(conn, buf, length - len(buf))
    data = buf[:length]
    del buf[:length]
    return data


class _Short(Exception):
    """The buffer ends inside the entry being decoded: read more and decode it again."""


def _field(buf: bytearray, pos: int) -> tuple[bytearray | None, int]:
    """The length-prefixed field at `pos` (None for the -1 that ends a list), and the position after it."""
    if pos + 4 > len(buf):
        raise _Short
    (length,) = _INT.unpack_from(buf, pos)
    pos += 4
    if length < 0:
        return None, pos
    if pos + length > len(buf):
        raise _Short
    return buf[pos:pos + length], pos + length


def _decode_value(value: bytearray, content_type: str, decode: bool) -> Any:
    """A parameter's value as ts's `_retrieve_input_data` decodes it."""
    if decode and content_type == "application/json":
        try:
            return json.loads(value.decode("utf-8"))
        except Exception:
            log.warning("Failed json decoding of input data. Forwarding encoded payload", exc_info=True)
    elif decode and content_type.startswith("text"):
        try:
            return value.decode("utf-8")
        except Exception:
            log.warning("Failed utf-8 decoding of input data. Forwarding encoded payload", exc_info=True)
    return value


def _records(buf: bytearray, pos: int, width: int) -> tuple[list[list[bytearray]], int]:
    """A list of records of `width` fields each, ended by a -1 where a record would begin."""
    records = []
    while True:
        first, pos = _field(buf, pos)
        if first is None:
            return records, pos
        record = [first]
        for _ in range(width - 1):
            value, pos = _field(buf, pos)
            record.append(value)
        records.append(record)


def _decode_entry(buf: bytearray, pos: int, request_id: bytearray, decode: bool) -> tuple[dict, int]:
    """The entry after its id, at `pos`: its headers (name, value) and parameters (name, content type, value), as
    ts's `_retrieve_request` returns them."""
    headers, pos = _records(buf, pos, 2)
    parameters, pos = _records(buf, pos, 3)
    params = []
    for name, content_type, value in parameters:
        ctype = content_type.decode("utf-8")
        params.append({"name": name.decode("utf-8"), "contentType": ctype,
                       "value": _decode_value(value, ctype, decode)})
    return {"requestId": request_id, "headers": [{"name": n, "value": v} for n, v in headers],
            "parameters": params}, pos


def read_inference_msg(conn) -> list[dict]:
    """The requests of a predict message, as ts's `_retrieve_inference_msg` returns them. An entry whose bytes
    are those of the same request's entry in the socket's previous message is that entry's request again (the
    same objects: nothing reads them but ts/service.py, and `inputs_for_handler` only adds its key)."""
    buf = _buffer(conn)
    known = _entries.get(conn) or {}
    entries: dict[bytes, tuple[bytes, dict]] = {}
    decode_env = os.environ.get("TS_DECODE_INPUT_REQUEST")
    decode = decode_env is None or decode_env == "true"
    msg, pos = [], 0
    while True:
        try:
            request_id, end = _field(buf, pos)
            if request_id is None:
                break
            rid = bytes(request_id)
            seen = known.get(rid)
            if seen is not None and buf[pos:pos + len(seen[0])] == seen[0]:
                entries[rid], end = seen, pos + len(seen[0])
            else:
                request, end = _decode_entry(buf, end, request_id, decode)
                entries[rid] = (bytes(buf[pos:end]), request)
            msg.append(entries[rid][1])
            pos = end
        except _Short:  # decode this entry again once more bytes are in (twice as many for a long entry)
            _receive(conn, buf, len(buf))
    del buf[:end]
    _entries[conn] = entries
    return msg


def inputs_for_handler(batch: list[dict] | None) -> tuple[list, list[dict], dict[int, str]]:
    """ts/service.py's `retrieve_data_for_inference`: per request its headers (a RequestProcessor), its inputs
    ({parameter name: value}) and its id. A request decoded by an earlier call keeps what was made for it then."""
    from ts.context import RequestProcessor

    if batch is None:
        raise ValueError("Received invalid inputs")
    processors, inputs, ids = [], [], {}
    for idx, request in enumerate(batch):
        made = request.get(_DECODED)
        if made is None:
            headers: dict = {p["name"]: {"content-type": p["contentType"]} for p in request["parameters"]}
            for h in request.get("headers") or ():
                headers[h["name"].decode("utf-8")] = h["value"].decode("utf-8")
            inputs_of = {p["name"]: p["value"] for p in request["parameters"]}
            made = request[_DECODED] = (RequestProcessor(headers), inputs_of, request["requestId"].decode("utf-8"))
        processors.append(made[0])
        inputs.append(made[1])
        ids[idx] = made[2]
    return processors, inputs, ids


def not_per_call_line(record: logging.LogRecord) -> bool:
    """A filter of the root logger: False for the line the worker logs on every call."""
    return record.msg != PER_CALL_LINE


def install() -> None:
    """Buffer the worker's reads, decode each request once, and drop the per-call line (once per process)."""
    global _installed
    if _installed:
        return
    try:
        from ts import service
        from ts.protocol import otf_message_handler
    except ImportError:  # not inside a TorchServe worker (unit tests of the handlers)
        return
    replaced = [getattr(otf_message_handler, "_retrieve_buffer", None),
                getattr(otf_message_handler, "_retrieve_inference_msg", None),
                getattr(service.Service, "retrieve_data_for_inference", None)]
    if not all(callable(f) for f in replaced):
        log.warning("TorchServe's worker lacks the functions worker_io replaces: its reads are left as they are")
        return
    otf_message_handler._retrieve_buffer = read_exactly
    otf_message_handler._retrieve_inference_msg = read_inference_msg
    service.Service.retrieve_data_for_inference = staticmethod(inputs_for_handler)
    logging.getLogger().addFilter(not_per_call_line)
    _installed = True
    log.info("TorchServe's worker trimmed: buffered reads, each request in flight decoded once, no per-call line")
