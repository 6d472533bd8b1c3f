"""The gateway's client of TorchServe: token handling, NDJSON frame streams, truncation detection.

TorchServe fixes a stream's status with its first chunk and, when a worker dies mid-stream, cuts the
connection without a terminating chunk or error body. A stream therefore counts as complete only when
its last frame says so (`finish_reason` or `error`); anything else becomes an UpstreamError, which the
routes turn into an error status or a final SSE error event.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime

import httpx

from rnnserve.service.settings import Settings

log = logging.getLogger(__name__)

# refresh TorchServe's inference key this long before it expires
KEY_REFRESH_MARGIN_S = 300.0


class UpstreamError(Exception):
    """TorchServe failed or is unreachable. `status` is what the gateway answers."""

    def __init__(self, status: int, message: str, reason: str = "upstream") -> None:
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason


class TorchServeKeys:
    """Reads key_file.json (written by TorchServe, mode 0600) and renews the inference key in time."""

    def __init__(self, settings: Settings, client: httpx.AsyncClient) -> None:
        self.settings, self.client = settings, client
        self._inference: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    def _read(self) -> dict:
        try:
            return json.loads(self.settings.key_file.read_text())
        except (OSError, ValueError) as e:
            raise UpstreamError(503, "model server is starting", "unavailable") from e

    def _load(self) -> None:
        keys = self._read()
        self._inference = keys["inference"]["key"]
        expires = keys["inference"].get("expiration time", "")
        try:
            self._expires = datetime.fromisoformat(expires.replace("Z", "+00:00")).timestamp()
        except ValueError:
            self._expires = time.time() + 3600

    async def inference_header(self) -> dict[str, str]:
        if not self.settings.ts_token_auth:
            return {}
        if self._inference is None or time.time() > self._expires - KEY_REFRESH_MARGIN_S:
            async with self._lock:
                if self._inference is None or time.time() > self._expires - KEY_REFRESH_MARGIN_S:
                    self._load()
                    if time.time() > self._expires - KEY_REFRESH_MARGIN_S:
                        await self._renew()
        return {"Authorization": f"Bearer {self._inference}"}

    async def _renew(self) -> None:
        api_key = self._read()["API"]["key"]
        r = await self.client.get(f"{self.settings.management_url}/token", params={"type": "inference"},
                                  headers={"Authorization": f"Bearer {api_key}"})
        if r.status_code != 200:
            raise UpstreamError(503, "model server token could not be renewed", "unavailable")
        self._load()
        log.info("renewed TorchServe inference key")

    def forget(self) -> None:
        """Called after TorchServe refused the key (it restarted, say): read the file again next time."""
        self._inference = None


class Upstream:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        timeout = httpx.Timeout(connect=settings.upstream_connect_timeout_s, read=settings.request_timeout_s,
                                write=10.0, pool=settings.upstream_connect_timeout_s)
        # one pooled client; its connection limit is above the admission limits, never the bottleneck
        self.client = httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=1024,
                                                                             max_keepalive_connections=128))
        self.keys = TorchServeKeys(settings, self.client)

    async def close(self) -> None:
        await self.client.aclose()

    async def frames(self, model: str, body: dict, request_id: str) -> AsyncIterator[dict]:
        """Yield the handler's frames; raise UpstreamError unless the last one ends the stream."""
        url = f"{self.settings.inference_url}/predictions/{model}"
        headers = await self.keys.inference_header()
        headers["X-Request-Id"] = request_id
        try:
            async with self.client.stream("POST", url, json=body, headers=headers) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise self._status_error(resp)
                async for line in resp.aiter_lines():
                    if not line:
                        continue
                    try:
                        frame = json.loads(line)
                    except ValueError:
                        raise UpstreamError(502, "model server sent a malformed frame") from None
                    yield frame
                    if "error" in frame or frame.get("finish_reason"):
                        return
        except httpx.ConnectError as e:
            raise UpstreamError(503, "model server is not reachable", "unavailable") from e
        except httpx.TimeoutException as e:
            raise UpstreamError(504, "model server did not answer in time", "timeout") from e
        except httpx.TransportError as e:  # connection cut mid-stream: the worker died
            raise UpstreamError(502, "model server ended the stream early (worker failure)") from e
        raise UpstreamError(502, "model server ended the stream early (worker failure)")

    def _status_error(self, resp: httpx.Response) -> UpstreamError:
        try:
            detail = resp.json().get("message", "")
        except ValueError:
            detail = resp.text[:200]
        log.warning("TorchServe answered %d: %s", resp.status_code, detail)
        if resp.status_code in (400, 401) and "token" in detail.lower():
            self.keys.forget()
            return UpstreamError(503, "model server refused the gateway's credentials", "unavailable")
        if resp.status_code == 404:
            return UpstreamError(503, "model is not loaded on the model server", "unavailable")
        if resp.status_code == 503:
            return UpstreamError(503, "model server is overloaded or has no healthy worker", "unavailable")
        if resp.status_code == 413:
            return UpstreamError(413, "request too large for the model server", "validation")
        return UpstreamError(502, f"model server error ({resp.status_code})")
