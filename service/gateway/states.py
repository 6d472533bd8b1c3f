"""States a client holds: the handler's state bytes, signed by the gateway so that any replica with the
same key (settings.state_key) accepts them, after a restart too, and nobody can forge or alter one.

A state token is `rs1.<model>.<state bytes>.<HMAC-SHA256>`, each part base64url without padding; the
MAC covers the version, the model's name and the bytes. The handler then checks the bytes themselves
(format, size, the weights that made them): they are parsed as numbers, never unpickled."""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets

from rnnserve.service.gateway.errors import invalid

log = logging.getLogger(__name__)

PREFIX = "rs1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class StateSigner:
    def __init__(self, key: bytes | None) -> None:
        if key is None:
            log.warning("RNNSERVE_STATE_KEY is not set: returned states are signed with a random key and "
                        "valid on this process only (set the same key on every replica)")
            key = secrets.token_bytes(32)
        self._key = key

    def _mac(self, model: str, blob: bytes) -> bytes:
        return hmac.new(self._key, b"\0".join([PREFIX.encode(), model.encode(), blob]), hashlib.sha256).digest()

    def sign(self, model: str, blob: bytes) -> str:
        return ".".join([PREFIX, _b64(model.encode()), _b64(blob), _b64(self._mac(model, blob))])

    def verify(self, model: str, token: str) -> bytes:
        """The state bytes of a token issued for `model`; a 400 APIError for anything else."""
        parts = token.split(".")
        try:
            if len(parts) != 4 or parts[0] != PREFIX:
                raise ValueError
            owner, blob, mac = _unb64(parts[1]).decode("utf-8"), _unb64(parts[2]), _unb64(parts[3])
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise invalid("state is not a state this server issued", "state") from None
        if owner != model:
            raise invalid(f"state was issued for model {owner[:128]!r}, not {model!r}", "state")
        if not hmac.compare_digest(mac, self._mac(model, blob)):
            raise invalid("state's signature does not match: it was altered, or signed with another key", "state")
        return blob
