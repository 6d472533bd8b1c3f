"""States a client holds: the handler's state bytes, signed by the gateway so that any replica with the
same key (settings.state_key) accepts them, after a restart too, and nobody can forge or alter one.

A state token is `rs2.<model>.<state bytes>.<HMAC-SHA256>`, each part base64url without padding (decoded
strictly: one spelling per token). The MAC covers the version, the API key the state was issued to (its
digest; "" without keys), the model's name and the bytes, so a state is accepted only from the key that
made it. The handler then checks the bytes themselves (format, size, the weights that made them): they
are parsed as numbers, never unpickled."""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
import secrets

from rnnserve.service.gateway.errors import invalid

log = logging.getLogger(__name__)

PREFIX = "rs2"
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    """Strict: base64url's alphabet only, no padding, and the one canonical spelling of the bytes (a
    lenient decoder skips junk characters and ignores a last character's unused bits)."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(data) != text:
        raise ValueError("not the canonical base64url of its bytes")
    return data


class StateSigner:
    def __init__(self, key: bytes | None) -> None:
        if key is None:
            log.warning("RNNSERVE_STATE_KEY is not set: returned states are signed with a random key and "
                        "valid on this process only (set the same key on every replica)")
            key = secrets.token_bytes(32)
        self._key = key

    def _mac(self, owner: str, model: str, blob: bytes) -> bytes:
        # owner and model are short texts without NUL (a key digest, a model name); the bytes come last
        return hmac.new(self._key, b"\0".join([PREFIX.encode(), owner.encode(), model.encode(), blob]),
                        hashlib.sha256).digest()

    def sign(self, model: str, blob: bytes, owner: str = "") -> str:
        """A token for `blob`, valid for `model` and the API key whose digest is `owner`."""
        return ".".join([PREFIX, _b64(model.encode()), _b64(blob), _b64(self._mac(owner, model, blob))])

    def verify(self, model: str, token: str, owner: str = "") -> bytes:
        """The state bytes of a token issued for `model` to `owner`; a 400 APIError for anything else."""
        parts = token.split(".")
        try:
            if len(parts) != 4 or parts[0] != PREFIX:
                raise ValueError
            issued_for, blob, mac = _unb64(parts[1]).decode("utf-8"), _unb64(parts[2]), _unb64(parts[3])
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise invalid("state is not a state this server issued", "state") from None
        if issued_for != model:
            raise invalid(f"state was issued for model {issued_for[:128]!r}, not {model!r}", "state")
        if not hmac.compare_digest(mac, self._mac(owner, model, blob)):
            raise invalid("state's signature does not match: it was altered, signed with another key, or "
                          "issued to another API key", "state")
        return blob
