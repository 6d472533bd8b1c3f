"""Plain sockets for tests of how the gateway treats clients that read or send slowly, or not at all."""
from __future__ import annotations

import socket

HANG_S = 60.0  # a bound that only a hang reaches


def connect(url: str, rcvbuf: int | None = None) -> socket.socket:
    """A connection to `url` (http://host:port); a small `rcvbuf` makes a client that stops reading fill up fast."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect((host, int(port)))
    s.settimeout(HANG_S)
    return s


def read_to_end(s: socket.socket) -> bytes:
    """What arrives until the server closes the connection (EOF, or a reset when it dropped it)."""
    data = b""
    try:
        while chunk := s.recv(1 << 20):
            data += chunk
    except ConnectionResetError:
        pass
    return data
