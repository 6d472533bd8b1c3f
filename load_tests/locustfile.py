"""Load scenarios for rnnserve (first version: streamed and non-streamed generation).

    locust -f load_tests/locustfile.py --host http://127.0.0.1:8000 --headless -u 8 -r 4 -t 30s

Streaming is timed properly: time to first chunk is reported as its own entry ("TTFT").
"""
from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, events, task

MODEL = os.environ.get("RNNSERVE_LOAD_MODEL", "lm-shakespeare")
MAX_TOKENS = int(os.environ.get("RNNSERVE_LOAD_MAX_TOKENS", "128"))
PROMPTS = ["ROMEO:\n", "JULIET:\n", "KING RICHARD III:\n", "First Citizen:\n", "To be, or not to be"]


class GenerateUser(HttpUser):
    wait_time = between(0.0, 0.5)

    def _body(self, stream: bool) -> dict:
        return {"model": MODEL, "prompt": random.choice(PROMPTS), "max_tokens": MAX_TOKENS,
                "temperature": 0.8, "stream": stream}

    @task(3)
    def generate_stream(self) -> None:
        t0 = time.perf_counter()
        first = None
        with self.client.post("/v1/generate", json=self._body(True), stream=True, catch_response=True,
                              name="/v1/generate stream") as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
                return
            for line in resp.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    resp.failure(f"error event: {event['error'].get('type')}")
                    return
                if first is None and event.get("text"):
                    first = time.perf_counter()
                    events.request.fire(request_type="SSE", name="TTFT", response_time=(first - t0) * 1000,
                                        response_length=0, exception=None, context={})
            resp.success()

    @task(1)
    def generate(self) -> None:
        self.client.post("/v1/generate", json=self._body(False), name="/v1/generate")
