"""Readiness proven by real inference: TorchServe's /ping says Healthy even while workers crash-loop.

A background task asks every served model for one token, at start and then every few seconds, so
that /readyz reports an outage and the recovery after it. A probe can queue behind the largest valid
requests (a full batch, a long scoring step); it fails only when the model made no progress for
`timeout_s`: neither the probe nor any other request of that model got a frame. A busy model that keeps
stepping stays ready; a stuck or dead one is reported within about `timeout_s`.
"""
from __future__ import annotations

import asyncio
import logging
import time

from rnnserve.service.gateway.registry import Registry
from rnnserve.service.gateway.upstream import Upstream, UpstreamError

log = logging.getLogger(__name__)

PROBES = {"lm": {"prompt": "a", "max_tokens": 1, "temperature": 0.0},
          "translation": {"texts": ["ein hund ."], "beam_size": 1, "max_tokens": 2}}


class Readiness:
    def __init__(self, registry: Registry, upstream: Upstream, interval_s: float, timeout_s: float = 5.0) -> None:
        self.registry, self.upstream, self.interval_s, self.timeout_s = registry, upstream, interval_s, timeout_s
        self.status: dict[str, str] = {name: "not probed yet" for name in registry.models}

    @property
    def ready(self) -> bool:
        return bool(self.status) and all(s == "ready" for s in self.status.values())

    async def _ask(self, name: str) -> None:
        async for frame in self.upstream.frames(name, PROBES[self.registry.models[name].task]):
            if "error" in frame:
                raise UpstreamError(502, frame["error"].get("message", "error frame"))

    async def probe(self, name: str) -> None:
        ask = asyncio.ensure_future(self._ask(name))
        try:
            while True:
                done, _ = await asyncio.wait({ask}, timeout=self.timeout_s)
                if done:
                    ask.result()
                    new = "ready"
                    break
                if time.monotonic() - self.upstream.last_frame.get(name, float("-inf")) > self.timeout_s:
                    raise TimeoutError  # stuck: no request of this model got a frame in that time
                # busy: the probe waits behind other requests that are being answered
                log.info("model %s: the readiness probe waits behind other requests, which are being answered", name)
        except (UpstreamError, TimeoutError) as e:
            new = f"not ready: {getattr(e, 'message', None) or f'no progress within {self.timeout_s:g}s'}"
        finally:
            ask.cancel()
        if new != self.status.get(name):
            log.info("model %s: %s", name, new)
        self.status[name] = new

    async def run(self) -> None:
        while True:
            await asyncio.gather(*(self.probe(n) for n in self.registry.models))
            # probe quickly until ready, then at the configured interval
            await asyncio.sleep(self.interval_s if self.ready else min(1.0, self.interval_s))
