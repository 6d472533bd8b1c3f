"""Requests that continue a text: a server-held session or a client-held state in, a state out.

`begin` checks what the request continues from (the session's lease, or the signature of the state
the client sent) and adds it to the handler's body; `end` stores the final state in the session and
signs the one the client asked for. A session is released whatever happens in between."""
from __future__ import annotations

import base64
from dataclasses import dataclass

from fastapi import Request

from rnnserve.service.gateway.errors import APIError
from rnnserve.service.gateway.protocol import ContinuationFields
from rnnserve.service.gateway.deps import owner
from rnnserve.service.gateway.sessions import Lease, call

# a session keeps the exact state (float32); a state sent to the client is compact (float16, or float32
# where a number is past float16's range: rnnserve/engine/state.py)
SESSION_DTYPE, CLIENT_DTYPE = "float32", "float16"


@dataclass
class Continuation:
    request: Request
    model: str
    lease: Lease | None = None
    return_state: bool = False
    state: str | None = None  # the signed state for the client, once the generation ended
    ended: bool = False

    async def end(self, final: dict) -> None:
        """The generation's last frame arrived: keep its state (before the answer that names it goes out)."""
        if self.ended:
            return
        self.ended = True
        if "state" not in final:
            if self.lease is not None or self.return_state:
                raise APIError(502, "model server returned no state", "upstream_error")
            return
        blob = base64.b64decode(final["state"])
        app = self.request.app.state
        if self.lease is not None:
            await call(app.sessions, "commit", self.lease, blob, int(final.get("state_tokens", 0)))
            self.lease = None
        if self.return_state:
            self.state = app.signer.sign(self.model, blob, owner(self.request))

    async def release(self) -> None:
        if self.lease is not None:
            lease, self.lease = self.lease, None
            await call(self.request.app.state.sessions, "release", lease)


async def begin(request: Request | None, model: str, fields: ContinuationFields, body: dict) -> Continuation | None:
    """None for a request that continues nothing (its `request` is not read: None on the fast path, fastpath.py);
    else the continuation, with `body` completed."""
    if not fields.continues:
        return None
    assert request is not None
    app = request.app.state
    cont = Continuation(request, model, return_state=fields.return_state)
    if fields.state is not None:
        body["state"] = base64.b64encode(app.signer.verify(model, fields.state, owner(request))).decode("ascii")
    if fields.session is not None:
        cont.lease = await call(app.sessions, "acquire", owner(request), fields.session, model)
        if cont.lease.state is not None:
            body["state"] = base64.b64encode(cont.lease.state).decode("ascii")
    body["return_state"] = SESSION_DTYPE if fields.session is not None else CLIENT_DTYPE
    return cont
