"""Cost, not count, and bounded answers, through real stacks: scoring is read in chunks while streams keep
their pace, admission holds each model to a budget of tokens, a translation whose answer could pass the
limit of one answer is refused with 400, and the largest valid requests leave every worker alive.

`costly` is paced (waits.PACED) and reads 16 tokens of a prompt or scored text per step, so that scoring
sixteen 4,096-character texts takes at least 256 steps of at least 20 ms on any machine; its budget of
100,000 tokens holds one such request (65,536) and a stream, never two. `roomy` has the default settings
but a deadline (900 s) that only a hang reaches, for the largest valid requests."""
import json
import threading
from pathlib import Path

import httpx
import pytest

from rnnserve.paths import REPO_ROOT
from rnnserve.service.stack import start_stack, stop_stack
from tests.e2e.test_faults import lm_worker_pid, worker_pids
from tests.e2e.waits import HANG_S, PACED, metric, wait_for

pytestmark = pytest.mark.e2e

LM, MT = "lm-shakespeare", "translate-de-en"
CORPUS = (REPO_ROOT / "data" / "tinyshakespeare" / "input.txt").read_text()
TEXTS = [CORPUS[i * 8192: (i + 1) * 8192] for i in range(16)]  # the largest valid scoring request
BIG_SCORE = {"model": LM, "candidates": TEXTS, "token_logprobs": True}
SCORE = {"model": LM, "candidates": [t[:4096] for t in TEXTS], "token_logprobs": True}  # 65,536 tokens
GERMAN = ("Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt. Ein Boston Terrier läuft über saftig-grünes "
          "Gras vor einem weißen Zaun. Ein Mädchen in einem Karateanzug bricht einen Stock mit einem Tritt. Fünf "
          "Leute in Winterjacken und mit Helmen stehen im Schnee mit Schneemobilen im Hintergrund. Leute "
          "reparieren das Dach eines Hauses. Ein hell gekleideter Mann fotografiert eine Gruppe von Männern in "
          "dunklen Anzügen und mit Hüten, die um eine Frau in einem trägerlosen Kleid herum stehen. Eine Gruppe "
          "von Menschen steht vor einem Iglu. Ein Junge in einem roten Trikot versucht, die Home Base zu "
          "erreichen, während der Catcher im blauen Trikot versucht, ihn zu fangen. Ein Typ arbeitet an einem "
          "Gebäude. Ein Mann in einer Weste sitzt auf einem Stuhl und hält Magazine. Ein Mann in einer blauen "
          "Mütze steht auf einer Leiter und putzt ein Fenster. Zwei Köche bereiten in einer engen Küche Essen zu. "
          "Zwei Männer spielen auf einer Strasse Fußball, während ein Hund zusieht und Leute warten. Ein Kind "
          "sitzt auf einer Bank im Park.")[:1000]
BIG_TRANSLATION = {"model": MT, "text": [GERMAN] * 64, "beam_size": 8, "n_best": 8, "max_tokens": 256,
                   "return_alignment": True}
BIG_COMPLETION = {"model": LM, "prompt": CORPUS[-8192:], "n": 8, "echo": True, "logprobs": 5, "max_tokens": 2048,
                  "temperature": 1.0, "seed": 3}
STREAM = {"model": LM, "prompt": "ROMEO:", "max_tokens": 2048, "stream": True, "seed": 1}  # paced: over 40 s


@pytest.fixture(scope="module")
def costly(tmp_path_factory):
    s = start_stack(tmp_path_factory.mktemp("cost"), extra_env={
        **PACED, "RNNSERVE_PREFILL_CHUNK_TOKENS": "16", "RNNSERVE_MAX_TOKENS_IN_FLIGHT_PER_MODEL": "100000",
        "RNNSERVE_REQUEST_TIMEOUT_S": "600"})
    yield s
    stop_stack(s)


@pytest.fixture(scope="module")
def roomy(tmp_path_factory):
    s = start_stack(tmp_path_factory.mktemp("roomy"), extra_env={"RNNSERVE_REQUEST_TIMEOUT_S": "900"})
    yield s
    stop_stack(s)


def post(stack, path: str, body: dict, out: dict, name: str) -> None:
    with httpx.Client(base_url=stack.url, timeout=900) as c:
        r = c.post(path, json=body)
        out[name] = (r.status_code, r.json())


def test_a_stream_keeps_receiving_frames_while_a_large_scoring_request_is_read(costly):
    events: list[str] = []
    done = threading.Event()

    def stream() -> None:
        with httpx.Client(base_url=costly.url, timeout=HANG_S) as c:
            with c.stream("POST", "/v1/generate", json=STREAM) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                    if done.is_set():
                        break

    reader = threading.Thread(target=stream)
    reader.start()
    try:
        wait_for(lambda: len(events) >= 1, "the stream's first event")
        before = len(events)
        with httpx.Client(base_url=costly.url, timeout=600) as c:
            r = c.post("/v1/score", json=SCORE)
        during = len(events) - before
    finally:
        done.set()
        reader.join(timeout=HANG_S)
    assert r.status_code == 200, r.text
    # 256 steps read the texts, each one a token of the stream: read whole, the stream would wait for all of them
    assert during >= 50, during
    scores = r.json()["scores"]
    assert [s["text"] for s in scores] == SCORE["candidates"]
    for s in scores:
        assert s["tokens"] == 4096 and len(s["token_logprobs"]) == 4096
        assert "".join(t["token"] for t in s["token_logprobs"]) == s["text"]
        assert sum(t["logprob"] for t in s["token_logprobs"]) == pytest.approx(s["logprob"], abs=1e-3)
    assert r.json()["usage"] == {"prompt_tokens": 16 * 4096, "completion_tokens": 0, "total_tokens": 16 * 4096}


def test_requests_joining_a_running_stream_get_text_in_their_first_event_and_their_seeded_text(costly):
    """New requests arrive while a paced 2,048-token stream runs (over 40 s): each is admitted between two of its
    steps (cutting the running one short), its first event carries its first token, and its whole seeded text,
    stop string included, is the one it gets alone, all while the long stream is still running."""
    joiners = [{"model": LM, "prompt": p, "max_tokens": 12, "seed": i, "temperature": 0.9, "stop": ["\n\n"]}
               for i, p in enumerate(["ROMEO:", "JULIET:\n", "", "To be"])]
    with httpx.Client(base_url=costly.url, timeout=HANG_S) as c:
        alone = [c.post("/v1/generate", json=j).json() for j in joiners]
    assert all(len(a["text"]) > 0 for a in alone)
    events: list[dict] = []
    done = threading.Event()

    def stream(body: dict, into: list) -> None:
        with httpx.Client(base_url=costly.url, timeout=HANG_S) as c:
            with c.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        into.append(json.loads(line[6:]))
                    if done.is_set():
                        break

    reader = threading.Thread(target=stream, args=(STREAM, events))
    reader.start()
    try:
        wait_for(lambda: len(events) >= 1, "the long stream's first event")
        joined: list[list[dict]] = [[] for _ in joiners]
        threads = [threading.Thread(target=stream, args=(j, out)) for j, out in zip(joiners, joined)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=HANG_S)
        still_running = not any(e.get("finish_reason") for e in events)
    finally:
        done.set()
        reader.join(timeout=HANG_S)
    assert still_running
    for out, a in zip(joined, alone):
        assert out[0]["text"] and "finish_reason" not in out[0]
        assert out[-1]["finish_reason"] == a["finish_reason"]
        assert "".join(e["text"] for e in out) == a["text"]


def test_admission_holds_a_model_to_its_budget_of_tokens(costly):
    results: dict = {}
    body = {**SCORE, "token_logprobs": False}
    threads = [threading.Thread(target=post, args=(costly, "/v1/score", body, results, f"s{i}")) for i in range(2)]
    for t in threads:
        t.start()
    with costly.client() as c:
        # 65,536 tokens each, a slot each: the second waits for the first's tokens, not for a slot
        wait_for(lambda: metric(c, "rnnserve_requests_waiting", model=LM) == 1
                 and metric(c, "rnnserve_requests_running", model=LM) == 1, "one score to run and the other to wait")
        for t in threads:
            t.join(timeout=600)
        assert {k: v[0] for k, v in results.items()} == {"s0": 200, "s1": 200}
        assert results["s0"][1]["scores"] == results["s1"][1]["scores"]
        # 64 x (1,000 + 4 x 256) tokens: more than the model may hold at once, whatever else runs
        r = c.post("/v1/translate", json={"model": MT, "text": [GERMAN] * 64, "max_tokens": 256})
    assert r.status_code == 400
    assert r.json() == {"error": {
        "message": "this request costs 129,536 tokens (the characters it sends and the tokens it asks for); model "
                   "'translate-de-en' runs at most 100,000 at once: send fewer or shorter texts, or a lower max_tokens",
        "type": "invalid_request_error", "param": None, "code": 400}}


def test_an_answer_that_could_pass_the_limit_is_refused_before_any_work(roomy):
    with roomy.client() as c:
        r = c.post("/v1/translate", json={**BIG_TRANSLATION, "return_attention": True})
        assert r.status_code == 400
        assert r.json() == {"error": {
            "message": "the answer to this request could exceed 8 MiB, the limit of one answer; it grows with text, "
                       "max_tokens, n_best, return_attention, return_alignment: send fewer or shorter texts, lower "
                       "max_tokens or n_best, or leave out return_attention",
            "type": "invalid_request_error", "param": "return_attention", "code": 400}}
        # the same request streamed (one text) is refused alike when its one answer could pass the limit
        one = c.post("/v1/translate", json={"model": MT, "text": GERMAN, "beam_size": 8, "n_best": 8,
                                            "max_tokens": 256, "return_attention": True, "stream": True})
        assert one.status_code == 200 and one.text.endswith("data: [DONE]\n\n")  # 1.4 MiB at most: it fits
        assert metric(c, "rnnserve_requests_total", model=MT, route="translate", outcome="validation") >= 1


def test_the_workers_survive_the_largest_valid_requests(roomy):
    pids, lm_pid = set(worker_pids(roomy, LM)), lm_worker_pid(roomy)
    results: dict = {}
    # at once: the language model holds the score (131,072 tokens) and the completions (147,456) in turn
    jobs = [("/v1/score", BIG_SCORE, "score"), ("/v1/translate", BIG_TRANSLATION, "translate"),
            ("/v1/completions", BIG_COMPLETION, "completions")]
    threads = [threading.Thread(target=post, args=(roomy, path, body, results, name)) for path, body, name in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert {k: v[0] for k, v in results.items()} == {name: 200 for _, _, name in jobs}, \
        {k: v[1] for k, v in results.items() if v[0] != 200}
    translations = results["translate"][1]["translations"]
    assert len(translations) == 64 and all(len(t["hypotheses"]) == 8 for t in translations)
    assert all(len(t["alignment"]) == len(t["tokens"]) for t in translations)
    choices = results["completions"][1]["choices"]
    assert len(choices) == 8 and all(len(ch["logprobs"]["tokens"]) == 8192 + 2048 for ch in choices)
    assert all(len(s["token_logprobs"]) == 8192 for s in results["score"][1]["scores"])
    # the same workers answered everything: none was restarted for a frame too large or a step too long
    assert set(worker_pids(roomy, LM)) == pids and lm_worker_pid(roomy) == lm_pid
    logs = "".join(p.read_text(errors="replace") for p in Path(roomy.run_dir, "logs").glob("*.log"))
    assert "TooLongFrameException" not in logs and "did not respond in given time" not in logs
    # a readiness probe that queued behind these requests may have timed out (5 s) on a slow machine; the
    # next probe, once they are done, finds the same workers ready
    with roomy.client() as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, "readiness after the largest requests")
