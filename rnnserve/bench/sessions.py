"""`rnnserve bench sessions`: continuing a long conversation from its state against sending its whole
history again, measured in one run on the same model, text and machine.

The conversation is Tiny Shakespeare's opening, cut to each history length; the new turn is a speaker's
name. Time to first token (TTFT) of the turn is measured three ways:
- history: the whole history and the turn as one prompt (what a stateless server must do);
- session: the turn after the state the server holds (float32);
- state: the turn after a state the client sent back (float16, signature checked, bytes parsed).
In the engine (every history length), and through the whole stack (gateway, TorchServe, handler) for
the histories that fit a prompt's limit. Medians of `--repeat` runs.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from rnnserve.engine.lm_engine import LMEngine
from rnnserve.engine.sampling import SamplingParams
from rnnserve.engine.state import fingerprint, from_bytes
from rnnserve.models.folder import WEIGHTS_FILE, load_lm
from rnnserve.paths import DATA_DIR, MODELS_DIR
from rnnserve.service.gateway.protocol import MAX_PROMPT_CHARS
from rnnserve.service.gateway.sessions import ENTRY_OVERHEAD
from rnnserve.service.gateway.states import StateSigner
from rnnserve.service.stack import start_stack, stop_stack

MODEL = "lm-shakespeare"
TURN = "\n\nROMEO:\n"
HISTORIES = (1000, 8000, 32000)
KEY = b"bench-" + b"k" * 32


def _first_token(engine: LMEngine) -> None:
    while not any(o.text or o.finished for o in engine.step(1)):
        pass
    for rid in engine.request_ids():
        engine.abort(rid)


def bench_engine(history: str, repeat: int) -> dict:
    lm = load_lm(MODELS_DIR / MODEL)
    weights = fingerprint(MODELS_DIR / MODEL / WEIGHTS_FILE)
    engine = LMEngine(lm.model, lm.tokenizer, max_prompt_chars=len(history) + len(TURN))
    one = SamplingParams(max_tokens=1, temperature=0)
    engine.add("read", history, one, return_state=True)
    (final,) = [o for o in engine.step(1) if o.finished]
    session_blob = final.state.to_bytes(weights, "float32")
    signer = StateSigner(KEY)
    token = signer.sign(MODEL, final.state.to_bytes(weights, "float16"))
    times: dict[str, list[float]] = {"history": [], "session": [], "state": []}
    for i in range(repeat + 1):  # the first round warms up
        t0 = time.perf_counter()
        engine.add(f"h{i}", history + TURN, one)
        _first_token(engine)
        t1 = time.perf_counter()
        engine.add(f"s{i}", TURN, one, state=from_bytes(session_blob, lm.model, weights))
        _first_token(engine)
        t2 = time.perf_counter()
        engine.add(f"c{i}", TURN, one, state=from_bytes(signer.verify(MODEL, token), lm.model, weights))
        _first_token(engine)
        t3 = time.perf_counter()
        if i:
            times["history"].append(t1 - t0)
            times["session"].append(t2 - t1)
            times["state"].append(t3 - t2)
    return {"session_bytes": len(session_blob) + ENTRY_OVERHEAD, "state_chars": len(token),
            **{k: statistics.median(v) for k, v in times.items()}}


def _ttft(client: httpx.Client, body: dict) -> float:
    t0 = time.perf_counter()
    with client.stream("POST", "/v1/generate", json={"model": MODEL, "max_tokens": 1, "temperature": 0,
                                                     "stream": True, **body}) as r:
        r.raise_for_status()
        ttft = None
        for line in r.iter_lines():  # read to the end: the stream's connection is then reused
            if ttft is None and line.startswith("data: {") and json.loads(line[6:]).get("text"):
                ttft = time.perf_counter() - t0
    return ttft


def bench_stack(histories: list[str], repeat: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        stack = start_stack(Path(tmp), extra_env={"RNNSERVE_STATE_KEY": KEY.decode()})
        try:
            with httpx.Client(base_url=stack.url, timeout=300) as c:
                for n, history in enumerate(histories):
                    base = f"bench-{n}"
                    c.post("/v1/generate", json={"model": MODEL, "prompt": history, "max_tokens": 1,
                                                 "temperature": 0, "session": base}).raise_for_status()
                    state = c.post("/v1/generate", json={"model": MODEL, "prompt": history, "max_tokens": 1,
                                                         "temperature": 0, "return_state": True}).json()["state"]
                    times: dict[str, list[float]] = {"history": [], "session": [], "state": []}
                    for i in range(repeat + 1):
                        fork = c.post(f"/v1/sessions/{base}/fork", json={}).json()["id"]
                        h = _ttft(c, {"prompt": history + TURN})
                        s = _ttft(c, {"prompt": TURN, "session": fork})
                        st = _ttft(c, {"prompt": TURN, "state": state})
                        c.delete(f"/v1/sessions/{fork}")
                        if i:
                            times["history"].append(h)
                            times["session"].append(s)
                            times["state"].append(st)
                    rows.append({"history_chars": len(history), **{k: statistics.median(v) for k, v in times.items()}})
        finally:
            stop_stack(stack)
    return rows


def _table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print("| history (chars) | TTFT whole history | TTFT session | TTFT returned state | history / session | "
          "history / state |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['history_chars']:,} | {r['history'] * 1000:.1f} ms | {r['session'] * 1000:.2f} ms | "
              f"{r['state'] * 1000:.2f} ms | {r['history'] / r['session']:.0f}x | {r['history'] / r['state']:.0f}x |")


def main(args) -> int:
    text = (DATA_DIR / "tinyshakespeare" / "input.txt").read_text()
    histories = [text[:n] for n in HISTORIES]
    engine_rows = []
    for h in histories:
        r = bench_engine(h, args.repeat)
        engine_rows.append({"history_chars": len(h), **r})
    _table(f"Engine, {MODEL}, medians of {args.repeat}", engine_rows)
    size = engine_rows[0]["session_bytes"]
    print(f"\nsession: {size:,} bytes held (state {size - ENTRY_OVERHEAD:,} + bookkeeping {ENTRY_OVERHEAD}), "
          f"{2**30 // size:,} sessions per GiB; returned state: {engine_rows[0]['state_chars']:,} characters")
    stack_rows = bench_stack([h for h in histories if len(h) + len(TURN) <= MAX_PROMPT_CHARS], args.repeat)
    _table(f"Whole stack (gateway, TorchServe, handler), {MODEL}, medians of {args.repeat}", stack_rows)
    if args.out:
        Path(args.out).write_text(json.dumps({"engine": engine_rows, "stack": stack_rows}, indent=1))
    return 0
