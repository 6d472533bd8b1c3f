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
from pydantic_core import from_json, to_json

from rnnserve.service.gateway import torchserve_client as tsc
from rnnserve.service.settings import Settings
from rnnserve.service.torchserve import MAX_RESPONSE_BYTES

log = logging.getLogger(__name__)

# refresh TorchServe's inference key this long before it expires
KEY_REFRESH_MARGIN_S = 300.0
# wait at most this long for the end of a stream whose last frame arrived
DRAIN_TIMEOUT_S = 1.0


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
        # inference streams go through a lean client of TorchServe's HTTP/1.1 (torchserve_client.py): it
        # costs the gateway less CPU per request than aiohttp or httpx (BENCHMARKS.md); httpx stays for the
        # rare management calls. Lines are bounded by what TorchServe lets a response be; no connection
        # limit of its own: admission bounds the streams per model, and a pool limit below the sum of the
        # models' bounds would queue admitted streams out of sight of the metrics
        self.torchserve = tsc.TorchServeClient(settings.inference_url, settings.upstream_connect_timeout_s,
                                               settings.request_timeout_s, MAX_RESPONSE_BYTES)
        # when each model last sent a frame (monotonic): readiness tells a busy model from a stuck one by it
        self.last_frame: dict[str, float] = {}

    async def close(self) -> None:
        await self.client.aclose()
        await self.torchserve.close()

    async def frames(self, model: str, body: dict) -> AsyncIterator[dict]:
        """Yield the handler's frames; raise UpstreamError unless the last one ends the stream. Closing the
        iterator early closes its connection: TorchServe then drops the job.

        The request carries only the headers TorchServe reads (its token, the body's type and length, the
        host): with continuous batching its frontend sends every header of every request in flight to the
        worker again on each engine step, and the worker decodes them all; neither reads the gateway's
        request id (the gateway logs it)."""
        headers = await self.keys.inference_header()
        resp: tsc.Response | None = None
        try:
            resp = await self._post(self.torchserve, f"/predictions/{model}", to_json(body), headers)
            if resp.status != 200:
                raise self._status_error(resp.status, await resp.text())
            while (line := await resp.readline()) is not None:  # one line per frame (NDJSON)
                try:
                    frame = from_json(line)  # pydantic-core's parser: about 10x the json module's speed
                except ValueError:
                    raise UpstreamError(502, "model server sent a malformed frame") from None
                self.last_frame[model] = time.monotonic()
                if "error" in frame or frame.get("finish_reason"):
                    # read to the end (the terminating chunk follows at once): its connection is then reused
                    await resp.finish(DRAIN_TIMEOUT_S)
                    yield frame
                    return
                yield frame
        except tsc.ConnectError as e:
            raise UpstreamError(503, "model server is not reachable", "unavailable") from e
        except tsc.ReadTimeout as e:
            raise UpstreamError(504, "model server did not answer in time", "timeout") from e
        except tsc.LineTooLong as e:
            raise UpstreamError(502, "model server sent a frame over the size bound") from e
        except tsc.Disconnected as e:  # connection cut mid-stream: the worker died
            raise UpstreamError(502, "model server ended the stream early (worker failure)") from e
        finally:
            if resp is not None:
                resp.release()
        raise UpstreamError(502, "model server ended the stream early (worker failure)")

    @staticmethod
    async def _post(client: tsc.TorchServeClient, path: str, body: bytes, headers: dict) -> tsc.Response:
        """The request, its connection tried again while connecting times out: nothing reached TorchServe yet, and
        under a burst (a thousand streams admitted at once on a loaded machine) its frontend and this event loop
        can take longer than the connect timeout to set a connection up. A request the gateway admitted keeps its
        place until its own deadline (the caller's timeout) ends it; a refused connection still fails at once."""
        while True:
            try:
                return await client.post(path, body, headers)
            except tsc.ConnectTimeout:
                log.warning("connecting to TorchServe timed out; trying again")

    def _status_error(self, status: int, text: str) -> UpstreamError:
        try:
            detail = json.loads(text).get("message", "")
        except (ValueError, AttributeError):
            detail = text[:200]
        log.warning("TorchServe answered %d: %s", status, detail)
        if status in (400, 401) and "token" in detail.lower():
            self.keys.forget()
            return UpstreamError(503, "model server refused the gateway's credentials", "unavailable")
        if status == 404:
            return UpstreamError(503, "model is not loaded on the model server", "unavailable")
        if status == 503:
            return UpstreamError(503, "model server is overloaded or has no healthy worker", "unavailable")
        if status == 413:
            return UpstreamError(413, "request too large for the model server", "validation")
        return UpstreamError(502, f"model server error ({status})")
