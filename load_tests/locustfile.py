"""Load scenarios for rnnserve.

    rnnserve loadtest --users 16 --run-time 60s                  (closed loop, headless, reports)
    rnnserve loadtest --arrival-rate 20 --run-time 60s           (open loop: Poisson arrivals)
    locust -f load_tests/locustfile.py --host http://127.0.0.1:8000   (web UI)

User classes (weights from the environment,
RNNSERVE_LOAD_WEIGHTS="stream=4,generate=1,openai=1,translate=2,conversation=1"): streamed generation,
non-streamed generation, OpenAI-compatible completions, translation (single and batched texts, greedy
and beam), and conversations that never re-send their history (turns continue a server-held session or
a state the user sends back; their TTFT is its own entry). Streams are read event by event: time to first token ("TTFT")
and inter-token latency ("ITL") are reported as their own entries, output tokens are counted, and
failures are split by status (429, 503, 504, other 5xx) and by mid-stream error events.
"""
from __future__ import annotations

import json
import os
import random
import time

import gevent

from locust import HttpUser, events, task
from locust.exception import StopUser

from arrivals import PoissonArrivals, parse_weights  # locust puts this folder on sys.path

LM_MODEL = os.environ.get("RNNSERVE_LOAD_LM_MODEL", "lm-shakespeare")
TR_MODEL = os.environ.get("RNNSERVE_LOAD_TR_MODEL", "translate-de-en")
MAX_TOKENS = int(os.environ.get("RNNSERVE_LOAD_MAX_TOKENS", "128"))
API_KEY = os.environ.get("RNNSERVE_LOAD_API_KEY", "")
RATE = float(os.environ.get("RNNSERVE_LOAD_ARRIVAL_RATE", "0"))  # > 0: open loop, requests per second
WEIGHTS = parse_weights(os.environ.get("RNNSERVE_LOAD_WEIGHTS",
                                       "stream=4,generate=1,openai=1,translate=2,conversation=1"))
TURNS = 8  # turns of a conversation before it starts anew

PROMPTS = ["ROMEO:\n", "JULIET:\n", "KING RICHARD III:\n", "First Citizen:\n", "To be, or not to be", "MENENIUS:\n"]
GERMAN = ["Ein Mann fährt mit dem Fahrrad durch die Stadt.", "Zwei Hunde spielen im Schnee.",
          "Eine Frau sitzt auf einer Bank und liest ein Buch.", "Kinder spielen Fußball auf einer Wiese.",
          "Ein Mann in einem blauen Hemd steht vor einem Gebäude."]
STATUS_NAMES = {429: "429 overloaded", 503: "503 unavailable", 504: "504 timeout"}


def fail_name(status: int) -> str:
    return STATUS_NAMES.get(status, "5xx other" if status >= 500 else f"{status}")


def fire(name: str, ms: float, kind: str = "SSE", length: int = 0, exc: Exception | None = None) -> None:
    events.request.fire(request_type=kind, name=name, response_time=ms, response_length=length, exception=exc,
                        context={})


ARRIVALS = PoissonArrivals(RATE) if RATE > 0 else None


class RNNServeUser(HttpUser):
    abstract = True

    def wait_time(self) -> float:
        """Closed loop: the next request right after the last. Open loop: the Poisson schedule decides."""
        return ARRIVALS(self) if ARRIVALS else 0.0

    def on_start(self) -> None:
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"

    def stream(self, path: str, body: dict, name: str) -> dict | None:
        """POST an SSE request and report TTFT, ITL, tokens and failures as their own entries; returns the
        last event when the stream ended well."""
        _admit_one()
        t0 = time.perf_counter()
        first = last = None
        final = None
        with self.client.post(path, json=body, stream=True, catch_response=True, name=name) as resp:
            if resp.status_code != 200:
                resp.failure(fail_name(resp.status_code))
                return None
            for line in resp.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                if line == b"data: [DONE]":
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    resp.failure(f"mid-stream {event['error'].get('type')}")
                    return None
                text = event.get("text", "")
                if not text and "choices" in event:  # OpenAI chunks
                    text = "".join(c.get("text", "") for c in event["choices"])
                now = time.perf_counter()
                if text:
                    if first is None:
                        first = now
                        fire(f"TTFT {name}", (now - t0) * 1000)
                    else:
                        fire(f"ITL {name}", (now - last) * 1000 / len(text), length=len(text))
                    last = now
                usage = event.get("usage")
                if usage:
                    fire(f"tokens {name}", 0, kind="TOKENS", length=usage["completion_tokens"])
                final = event
            resp.success()
            return final

    def post(self, path: str, body: dict, name: str) -> None:
        _admit_one()
        with self.client.post(path, json=body, catch_response=True, name=name) as resp:
            if resp.status_code != 200:
                resp.failure(fail_name(resp.status_code))
                return
            usage = resp.json().get("usage")
            if usage:
                fire(f"tokens {name}", 0, kind="TOKENS", length=usage["completion_tokens"])
            resp.success()


def lm_body(stream: bool) -> dict:
    return {"model": LM_MODEL, "prompt": random.choice(PROMPTS), "max_tokens": MAX_TOKENS, "temperature": 0.8,
            "stream": stream}


class StreamUser(RNNServeUser):
    weight = WEIGHTS.get("stream", 0)

    @task
    def generate_stream(self) -> None:
        self.stream("/v1/generate", lm_body(True), "generate stream")


class GenerateUser(RNNServeUser):
    weight = WEIGHTS.get("generate", 0)

    @task
    def generate(self) -> None:
        self.post("/v1/generate", lm_body(False), "generate")


class OpenAIUser(RNNServeUser):
    weight = WEIGHTS.get("openai", 0)

    @task
    def completions_stream(self) -> None:
        self.stream("/v1/completions", {"model": LM_MODEL, "prompt": random.choice(PROMPTS),
                                         "max_tokens": MAX_TOKENS, "stream": True}, "completions stream")


class ConversationUser(RNNServeUser):
    """A conversation of TURNS turns that never re-sends its history: even turns continue a session the
    server holds, odd ones a state this user holds and sends back (any replica accepts it)."""
    weight = WEIGHTS.get("conversation", 0)

    def on_start(self) -> None:
        super().on_start()
        self.turn_no, self.state = 0, None
        self.session = f"locust-{random.getrandbits(64):016x}"

    @task
    def turn(self) -> None:
        if self.turn_no == TURNS:  # start anew: the server's copy goes, the user's is dropped
            self.client.delete(f"/v1/sessions/{self.session}", name="conversation end")
            self.turn_no, self.state = 0, None
        body = {"model": LM_MODEL, "prompt": "\n\n" + random.choice(PROMPTS), "max_tokens": MAX_TOKENS,
                "temperature": 0.8, "stream": True}
        if self.turn_no % 2 == 0:
            self.stream("/v1/generate", {**body, "session": self.session}, "conversation session")
        else:
            final = self.stream("/v1/generate", {**body, "state": self.state, "return_state": True},
                                "conversation state")
            self.state = (final or {}).get("state")
        self.turn_no += 1


class TranslateUser(RNNServeUser):
    weight = WEIGHTS.get("translate", 0)

    @task(3)
    def single_beam(self) -> None:
        self.post("/v1/translate", {"model": TR_MODEL, "text": random.choice(GERMAN), "beam_size": 4},
                  "translate beam4")

    @task(2)
    def single_greedy_stream(self) -> None:
        self.stream("/v1/translate", {"model": TR_MODEL, "text": random.choice(GERMAN), "beam_size": 1,
                                      "stream": True}, "translate greedy stream")

    @task(1)
    def batch(self) -> None:
        self.post("/v1/translate", {"model": TR_MODEL, "text": random.sample(GERMAN, 4), "beam_size": 4},
                  "translate batch4")


MAX_REQUESTS = int(os.environ.get("RNNSERVE_LOAD_MAX_REQUESTS", "0"))  # > 0: stop after this many requests
_started = _finished = 0
_env = None


def _admit_one() -> None:
    """Bound the run by a number of requests: a user that would send one more stops instead, and the
    run ends when the last one has finished, so no request is cut at the end."""
    global _started
    if MAX_REQUESTS and _started >= MAX_REQUESTS:
        raise StopUser()
    _started += 1


@events.init.add_listener
def _keep_env(environment, **_kw) -> None:
    global _env
    _env = environment


@events.request.add_listener
def _count(request_type: str, **_kw) -> None:
    global _finished
    if not MAX_REQUESTS or request_type not in ("POST", "GET"):
        return  # TTFT/ITL/token entries are not requests
    _finished += 1
    if _finished == MAX_REQUESTS and _env is not None and _env.runner is not None:
        # from another greenlet, and after locust's CSV writer (1 s period) has recorded the last request
        gevent.spawn_later(2.0, _env.runner.quit)
