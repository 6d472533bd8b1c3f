"""The TorchServe handler driven as the continuous-batching frontend drives it (ContinuousBatching.java):
each call re-sends the requests still in flight with an empty payload and adds new ones."""

from rnnserve.service.handlers.lm_handler import LanguageModelHandler
from tests.unit.fakes import FakeContext, Frontend


def steps_apart(fe):
    """A clock of the test's own for the handler (`call.now[0]`), and a call that first moves it on by `by` (a whole
    step unless told): rows that joined a whole step before a call no longer shorten the next step (streaming.py)."""
    now = [0.0]
    fe.h.clock = lambda: now[0]

    def call(settle: bool = True, by: float | None = None) -> None:
        now[0] += fe.h.step_s if by is None else by
        fe.step(settle)

    call.now = now
    return call


def make(tiny_lm_folder):
    ctx = FakeContext(tiny_lm_folder)
    h = LanguageModelHandler()
    h.initialize(ctx)
    return Frontend(h, ctx)


def test_streams_end_with_usage_and_the_first_frame_is_never_the_last(tiny_lm_folder):
    fe = make(tiny_lm_folder)
    fe.submit("a", {"prompt": "ROMEO:", "max_tokens": 2, "seed": 1})  # finishes within its first step
    fe.submit("b", {"prompt": "", "max_tokens": 40, "seed": 2})
    fe.drain()
    for rid, n in (("a", 2), ("b", 40)):
        frames = fe.frames[rid]
        assert len(frames) >= 2  # TorchServe cannot end a stream on its first frame
        assert "finish_reason" not in frames[0]
        assert frames[-1]["finish_reason"] == "length"
        assert frames[-1]["usage"]["completion_tokens"] == n
        assert len("".join(f["text"] for f in frames)) == n
    assert fe.frames["a"][-1]["usage"]["prompt_tokens"] == 6


def test_a_bad_request_gets_its_own_error_and_others_go_on(tiny_lm_folder):
    fe = make(tiny_lm_folder)
    fe.submit("good", {"prompt": "a", "max_tokens": 30, "seed": 1})
    fe.step()
    fe.submit("bad", {"prompt": "a", "max_tokens": 10**9})
    fe.submit("junk", b"\xff\xfe not json")
    fe.submit("extra", {"prompt": "a", "nope": 1})
    fe.drain()
    assert fe.frames["bad"][-1] == {"error": {"message": "max_tokens must be at most 2048",
                                              "type": "invalid_request_error", "code": 400}}
    assert fe.frames["junk"][-1]["error"]["message"].startswith("request body is not valid JSON")
    assert fe.frames["extra"][-1]["error"]["message"] == "unknown fields: ['nope']"
    assert fe.frames["good"][-1]["usage"]["completion_tokens"] == 30


def test_a_request_that_disappears_frees_its_row(tiny_lm_folder):
    fe = make(tiny_lm_folder)
    fe.submit("stay", {"prompt": "a", "max_tokens": 60})
    fe.submit("leave", {"prompt": "b", "max_tokens": 60})
    fe.step()
    assert fe.h.engine.num_running == 2
    fe.inflight.remove("leave")  # the frontend dropped it: its client closed the connection
    fe.step()
    assert fe.h.engine.num_running == 1 and "leave" not in fe.h.engine
    assert fe.h.aborted == 1
    fe.drain()
    assert fe.frames["stay"][-1]["finish_reason"] == "length"


def test_same_seed_same_text_through_the_handler(tiny_lm_folder):
    texts = []
    for _ in range(2):
        fe = make(tiny_lm_folder)
        fe.submit("x", {"prompt": "KING:", "max_tokens": 25, "seed": 9, "temperature": 0.8})
        fe.drain()
        texts.append("".join(f["text"] for f in fe.frames["x"]))
    assert texts[0] == texts[1] and len(texts[0]) == 25


def test_a_call_that_admits_sends_first_tokens_and_long_steps_run_between_calls(tiny_lm_folder):
    """A call returns the step that ran in the background since the previous call. A call that admits also
    runs a short step (prefill, one token) itself, so new requests get text in their first frame; the
    background step after it is cut by the share of new requests in the batch (all new: one token)."""
    ctx = FakeContext(tiny_lm_folder, {"target_step_ms": 60_000, "admit_step_ms": 0, "max_tokens_per_step": 8})
    h = LanguageModelHandler()
    h.initialize(ctx)
    fe = Frontend(h, ctx)
    every_step = steps_apart(fe)  # each call a whole step after the previous one: no row joined within a step
    fe.submit("a", {"prompt": "x", "max_tokens": 100, "seed": 1})
    every_step()  # a's first token; the whole batch is new: one token in the background
    fe.submit("b", {"prompt": "y", "max_tokens": 100, "seed": 2})
    every_step()  # a: 1 from the background and 1 from the short step that admits b; then half a budget
    every_step()  # nothing admitted: a whole step
    fe.submit("c", {"prompt": "z", "max_tokens": 100, "seed": 3})
    every_step()
    every_step()
    assert [len(f["text"]) for f in fe.frames["a"]] == [1, 2, 8, 9, 8]
    assert [len(f["text"]) for f in fe.frames["b"]] == [1, 8, 9, 8]
    assert [len(f["text"]) for f in fe.frames["c"]] == [1, 8]


def minute_tokens(tiny_lm_folder, frame_interval_ms: int, **cfg):
    """A handler on a clock of the test's own where each decoded token takes one minute and a long step ten, its
    frontend, `call` (steps_apart) and `held`: set, the next decoded token waits until new requests have cut the
    running step (their call has come). `cfg` overrides the handler's settings."""
    import math
    import threading

    from tests.e2e.waits import wait_for

    ctx = FakeContext(tiny_lm_folder, {"max_batch_size": 8, "target_step_ms": 600_000, "admit_step_ms": 0,
                                       "max_tokens_per_step": 100, "frame_interval_ms": frame_interval_ms, **cfg})
    h = LanguageModelHandler()
    h.initialize(ctx)
    fe = Frontend(h, ctx)
    call = steps_apart(fe)
    held = threading.Event()
    real = h.engine._step

    def token(tokens, state):
        if held.is_set():
            wait_for(lambda: h._cut != math.inf, "the new requests' call")
            held.clear()
        call.now[0] += 60.0
        return real(tokens, state)

    h.engine._step = token
    return fe, call, held


def test_new_requests_cut_the_running_long_step_and_get_their_first_token_in_that_call(tiny_lm_folder):
    """Counted in tokens on a clock of the test's own, where each decoded token takes one minute: a long step
    is ten minutes (600 tokens, more than max_tokens_per_step's 100). Three requests arriving while a's long
    step runs are 3/4 of the batch: the step ends once it has run a quarter of its length (3 tokens), and the
    call that brings them answers with their first tokens. A call without new requests leaves a step whole."""
    fe, call, held = minute_tokens(tiny_lm_folder, frame_interval_ms=0)
    fe.submit("a", {"prompt": "x", "max_tokens": 1000, "seed": 1})
    call()  # a's first token; all of the batch is new: a one-token long step follows
    held.set()
    call(settle=False)  # the token of that step; a long step starts and waits for the next call
    for rid in "bcd":
        fe.submit(rid, {"prompt": rid, "max_tokens": 50, "seed": 2})
    call(by=0)  # at once: the long step is still at its first token
    call()  # nothing new: the long step after the admitting call (1/4 new: 3/4 of a step) runs whole
    assert [len(f["text"]) for f in fe.frames["a"]] == [1, 1, 3 + 1, 100]
    for rid in "bcd":
        assert [len(f["text"]) for f in fe.frames[rid]] == [1, 50 - 1]
        assert fe.frames[rid][-1]["finish_reason"] == "length"


def test_rows_that_joined_within_a_step_keep_the_next_steps_short_by_how_recently(tiny_lm_folder):
    """A burst reaches the worker over several calls: a call without new requests that comes soon after some
    joined still runs a shorter step (so the next call, which may bring the rest, comes sooner); a step later
    the batch is old and steps are whole."""
    ctx = FakeContext(tiny_lm_folder, {"target_step_ms": 60_000, "admit_step_ms": 0, "max_tokens_per_step": 8})
    h = LanguageModelHandler()
    h.initialize(ctx)
    fe = Frontend(h, ctx)
    call = steps_apart(fe)
    fe.submit("a", {"prompt": "x", "max_tokens": 100, "seed": 1})
    fe.submit("b", {"prompt": "y", "max_tokens": 100, "seed": 2})
    call()
    assert h._step_len == 0.0  # all of the batch just joined
    call(by=15.0)
    assert h._step_len == 15.0  # both joined a quarter of a step ago: weighed 3/4 each
    call(by=30.0)
    assert h._step_len == 45.0
    call(by=15.0)
    assert h._step_len == 60.0  # a whole step since they joined


def test_without_overlap_a_call_returns_its_own_step(tiny_lm_folder):
    ctx = FakeContext(tiny_lm_folder, {"target_step_ms": 60_000, "admit_step_ms": 0, "max_tokens_per_step": 8,
                                       "overlap_steps": False})
    h = LanguageModelHandler()
    h.initialize(ctx)
    fe = Frontend(h, ctx)
    fe.submit("a", {"prompt": "x", "max_tokens": 100, "seed": 1})
    fe.step()
    fe.step()
    assert [len(f["text"]) for f in fe.frames["a"]] == [1, 8]


def test_a_failing_step_ends_its_requests_with_an_error_and_the_handler_goes_on(tiny_lm_folder, monkeypatch):
    fe = make(tiny_lm_folder)
    fe.submit("a", {"prompt": "x", "max_tokens": 50, "seed": 1})
    fe.step()
    real = fe.h.engine.step
    monkeypatch.setattr(fe.h.engine, "step", lambda *a, **k: 1 / 0)
    fe.step()  # this call starts the failing step in the background ...
    fe.step()  # ... and the next one delivers its outcome
    assert fe.frames["a"][-1] == {"error": {"message": "internal error during generation", "type": "internal_error",
                                            "code": 500}}
    assert "a" not in fe.inflight and fe.h.engine.request_ids() == []
    monkeypatch.setattr(fe.h.engine, "step", real)
    fe.submit("b", {"prompt": "y", "max_tokens": 20, "seed": 2})
    fe.drain()
    assert fe.frames["b"][-1]["usage"]["completion_tokens"] == 20


def test_folded_and_module_steps_give_the_same_seeded_text(tiny_lm_folder, monkeypatch):
    """`folded_step` (model-config, or RNNSERVE_FOLDED_STEP) picks the decode step; both give the same text."""
    from rnnserve.models.decode import LSTMStep

    texts = {}
    for folded in ("1", "0"):
        monkeypatch.setenv("RNNSERVE_FOLDED_STEP", folded)
        fe = make(tiny_lm_folder)
        assert isinstance(fe.h.engine._step, LSTMStep) == (folded == "1")
        for i in range(3):
            fe.submit(f"r{i}", {"prompt": "KING:", "max_tokens": 60, "seed": i, "temperature": 0.9, "top_p": 0.95})
        fe.drain()
        texts[folded] = ["".join(f["text"] for f in fe.frames[f"r{i}"]) for i in range(3)]
    assert texts["1"] == texts["0"] and all(len(t) == 60 for t in texts["1"])


def test_paced_steps_decode_one_token_each_and_last_at_least_min_step_ms(tiny_lm_folder, monkeypatch):
    """What the end-to-end suite uses for streams that stay slow on any machine: one token per step and a
    floor on each step's duration, set through the environment as for a running TorchServe."""
    import time

    monkeypatch.setenv("RNNSERVE_MAX_TOKENS_PER_STEP", "1")
    monkeypatch.setenv("RNNSERVE_MIN_STEP_MS", "30")
    ctx = FakeContext(tiny_lm_folder, {"target_step_ms": 60_000, "overlap_steps": False})
    h = LanguageModelHandler()
    h.initialize(ctx)
    fe = Frontend(h, ctx)
    fe.submit("x", {"prompt": "a", "max_tokens": 5, "seed": 1})
    t0 = time.monotonic()
    fe.drain()
    texts = [f["text"] for f in fe.frames["x"]]
    assert [len(t) for t in texts[:5]] == [1, 1, 1, 1, 1] and "".join(texts) == "".join(texts[:5])
    assert time.monotonic() - t0 >= 5 * 0.030  # a lower bound only: sleeping never makes a step shorter


def test_int8_is_chosen_per_model_and_overridable(tiny_lm_folder, monkeypatch):
    from rnnserve.models.decode import Int8LSTMStep
    from rnnserve.service.archive import model_config

    assert model_config("lm", {"task": "lm"})["handler"]["int8"] is False
    assert model_config("lm", {"task": "lm", "int8": True})["handler"]["int8"] is True
    monkeypatch.setenv("RNNSERVE_INT8", "1")
    fe = make(tiny_lm_folder)
    assert isinstance(fe.h.engine._step, Int8LSTMStep)
    fe.submit("a", {"prompt": "KING:", "max_tokens": 30, "temperature": 0})
    fe.drain()
    assert fe.frames["a"][-1]["usage"]["completion_tokens"] == 30


def test_cuda_graphs_are_read_from_the_config_and_env_and_ignored_on_cpu(tiny_lm_folder, monkeypatch):
    import torch

    from rnnserve.models.decode import LSTMStep
    from rnnserve.service.handlers.frames import handler_setup

    ctx = FakeContext(tiny_lm_folder, {"cuda_graphs": False})
    monkeypatch.setenv("RNNSERVE_CUDA_GRAPHS", "1")
    assert handler_setup(ctx)[1]["cuda_graphs"] is True
    if torch.cuda.is_available():
        return  # the GPU side: tests/unit/test_graphs.py
    h = LanguageModelHandler()
    h.initialize(ctx)
    assert h.engine.cuda_graphs is False and isinstance(h.engine._step, LSTMStep)
    fe = Frontend(h, ctx)
    fe.submit("a", {"prompt": "KING:", "max_tokens": 9, "temperature": 0})
    fe.drain()
    assert fe.frames["a"][-1]["usage"]["completion_tokens"] == 9


def test_prefill_chunk_is_read_from_the_config_and_env_and_long_prompts_still_stream(tiny_lm_folder, monkeypatch):
    ctx = FakeContext(tiny_lm_folder, {"max_batch_size": 8, "target_step_ms": 5, "prefill_chunk_tokens": 16})
    h = LanguageModelHandler()
    h.initialize(ctx)
    assert h.engine.prefill_chunk == 16
    fe = Frontend(h, ctx)
    fe.submit("long", {"prompt": "KING:\n" * 50, "max_tokens": 5, "seed": 1})
    fe.drain()
    assert fe.frames["long"][-1]["usage"] == {"prompt_tokens": 300, "completion_tokens": 5}
    monkeypatch.setenv("RNNSERVE_PREFILL_CHUNK_TOKENS", "0")
    h = LanguageModelHandler()
    h.initialize(ctx)
    assert h.engine.prefill_chunk is None


def _synthetic_folder(tiny_lm_folder, tmp_path):
    import json
    import shutil

    folder = tmp_path / "synthetic"
    shutil.copytree(tiny_lm_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "engine": "synthetic", "synthetic_token_ms": 0}))
    return folder


def test_a_frame_interval_gathers_a_fast_engines_steps_into_bigger_frames(tiny_lm_folder, tmp_path):
    """The synthetic engine makes its 4 tokens per step at once: with no frame interval every step is a frame;
    with one longer than the whole stream, the first frame still goes out alone (time to first token) and the
    rest comes in far fewer frames, the text and the stop string's cut the same."""
    from rnnserve.engine.synthetic import SyntheticEngine

    folder = _synthetic_folder(tiny_lm_folder, tmp_path)
    texts = {}
    for interval in (0, 600_000):
        ctx = FakeContext(folder, {"max_batch_size": 8, "target_step_ms": 5, "max_tokens_per_step": 4,
                                   "frame_interval_ms": interval})
        h = LanguageModelHandler()
        h.initialize(ctx)
        assert isinstance(h.engine, SyntheticEngine)
        fe = Frontend(h, ctx)
        call = steps_apart(fe)  # the handler's clock stands still within a call: the interval is never spent
        fe.submit("a", {"prompt": "x", "max_tokens": 40, "seed": 0})
        fe.submit("b", {"prompt": "x", "max_tokens": 60, "seed": 0, "stop": ["summer"]})
        while fe.inflight or fe.new:
            call()
        texts[interval] = {r: [f["text"] for f in fe.frames[r] if f["text"]] for r in "ab"}
        assert fe.frames["b"][-1]["finish_reason"] == "stop"
    assert [len(t) for t in texts[0]["a"]] == [4] * 10
    # the first frame alone; then the step after the admitting call, cut by the share of new requests in the
    # batch (all of it: one step, streaming.py); then everything else in one frame
    assert [len(t) for t in texts[600_000]["a"]] == [4, 4, 32]
    for r in "ab":
        assert "".join(texts[0][r]) == "".join(texts[600_000][r])
    assert "".join(texts[0]["b"]) == "Now is the winter of our discontent made glorious "


def test_a_new_request_cutting_the_step_gets_its_first_token_while_the_others_frames_wait_their_interval(
        tiny_lm_folder):
    """As above (a token is a minute of the test's clock, a long step ten), with a frame interval of ten minutes:
    the three new requests cut a's step as soon as before and get their first tokens in that call, but a's frame
    is not due (four minutes since its last): the call leaves a out, and what a made meanwhile goes out with its
    next frame, whole, once its interval has passed."""
    fe, call, held = minute_tokens(tiny_lm_folder, frame_interval_ms=600_000)
    fe.submit("a", {"prompt": "x", "max_tokens": 1000, "seed": 1})
    call()  # a's first token; all of the batch is new: a one-token long step follows
    held.set()
    call(settle=False)  # that token (a whole interval after the first); a long step starts
    for rid in "bcd":
        fe.submit(rid, {"prompt": rid, "max_tokens": 50, "seed": 2})
    call(by=0)  # a's step cut after 3 tokens, then the short step: b, c, d get their first token; a is left out
    assert fe.left_out == ["a"]
    assert [len(f["text"]) for f in fe.frames["a"]] == [1, 1]
    for rid in "bcd":
        assert [len(f["text"]) for f in fe.frames[rid]] == [1]
    call()  # a step later a is due: its held 4 tokens and the step's 100 (max_tokens_per_step) in one frame
    assert [len(f["text"]) for f in fe.frames["a"]] == [1, 1, 4 + 100]
    # the same text as a frame per step gives
    fe.drain()
    ctx2 = FakeContext(tiny_lm_folder, {"max_batch_size": 8, "target_step_ms": 5, "max_tokens_per_step": 100})
    h2 = LanguageModelHandler()
    h2.initialize(ctx2)
    fe2 = Frontend(h2, ctx2)
    fe2.submit("a", {"prompt": "x", "max_tokens": 1000, "seed": 1})
    fe2.drain()
    assert "".join(f["text"] for f in fe.frames["a"]) == "".join(f["text"] for f in fe2.frames["a"])


def test_with_every_row_taken_a_step_lasts_the_frame_interval_and_a_finishing_stream_ends_it(tiny_lm_folder):
    """A token is a minute of the test's clock, a step ten, and the frame interval of two streams fifty. With both
    rows of the batch taken no new request can join before a stream ends, so a long step lasts the interval: one call
    per frame of each stream, where steps of ten made five. A stream finishing ends the step with its engine step
    (5 tokens), so that its last frame goes out and its row is free. With a row free a step stays ten minutes."""
    grown = {"max_tokens_per_step": 5, "frame_interval_per_stream_ms": 1_500_000, "max_frame_interval_ms": 3_000_000}
    fe, call, _ = minute_tokens(tiny_lm_folder, frame_interval_ms=600_000, max_batch_size=2, **grown)
    fe.submit("a", {"prompt": "x", "max_tokens": 1000, "seed": 1})
    fe.submit("b", {"prompt": "y", "max_tokens": 40, "seed": 2})
    call()  # first tokens; all of the batch is new: a one-token long step follows
    assert fe.h._step_len == 0.0
    start = fe.h.clock()
    call()  # that token is held (no frame due); the batch is old and full: the step after lasts the interval...
    assert fe.left_out == ["a", "b"] and fe.h._step_len == 50 * 60.0
    # ... but b's last 38 tokens end in its 8th engine step: it ran 40 tokens (the call came a step of 10 later)
    assert fe.h.clock() - start == 10 * 60.0 + 40 * 60.0
    call()
    assert [(len(f["text"]), f.get("finish_reason")) for f in fe.frames["b"]] == [(1, None), (1 + 38, "length")]
    assert [len(f["text"]) for f in fe.frames["a"]] == [1, 1 + 40]
    assert fe.h._step_len == 10 * 60.0  # a row is free: a new request may come with the next call

    fe, call, _ = minute_tokens(tiny_lm_folder, frame_interval_ms=600_000, max_batch_size=3, **grown)
    fe.submit("a", {"prompt": "x", "max_tokens": 1000, "seed": 1})
    fe.submit("b", {"prompt": "y", "max_tokens": 40, "seed": 2})
    call()
    call()
    assert fe.h._step_len == 10 * 60.0


def gathering(tiny_lm_folder, **cfg):
    """A handler that gathers the requests reaching it idle for up to ten minutes of the test's own clock, its
    frontend, `call` (steps_apart) and the rows of each prefill the engine ran."""
    ctx = FakeContext(tiny_lm_folder, {"max_batch_size": 4, "target_step_ms": 60_000, "admit_step_ms": 0,
                                       "max_tokens_per_step": 8, "admit_gather_ms": 600_000, **cfg})
    h = LanguageModelHandler()
    h.initialize(ctx)
    fe = Frontend(h, ctx)
    prefills: list[int] = []
    real = h.engine._prefill

    def prefill(reads):
        prefills.append(len(reads))
        return real(reads)

    h.engine._prefill = prefill
    return fe, steps_apart(fe), prefills


def test_a_burst_reaching_an_idle_engine_is_prefilled_once_when_a_call_brings_no_more(tiny_lm_folder, caplog):
    """Requests reaching an idle engine over several calls wait, answered nothing, while each call brings more;
    the first call that brings none prefills them all at once and carries their first tokens."""
    caplog.set_level("INFO", logger="rnnserve.service.handlers.streaming")
    fe, call, prefills = gathering(tiny_lm_folder)
    fe.submit("a", {"prompt": "x", "max_tokens": 20, "seed": 1})
    call(by=0)
    fe.submit("b", {"prompt": "yy", "max_tokens": 20, "seed": 2})
    fe.submit("c", {"prompt": "zzz", "max_tokens": 20, "seed": 3})
    call(by=0)
    assert fe.left_out == ["a", "b", "c"] and fe.frames == {} and prefills == []
    assert fe.h.engine.num_waiting == 3 and fe.h.engine.num_running == 0
    call(by=0)  # nothing new: one prefill reads all three, and their first tokens go out
    assert prefills == [3]
    assert "one prefill for 3 requests gathered over 3 calls in 0.0 ms" in caplog.messages
    assert {rid: [len(f["text"]) for f in frames] for rid, frames in fe.frames.items()} == {"a": [1], "b": [1],
                                                                                             "c": [1]}
    fe.drain()
    assert prefills == [3]
    assert all(len("".join(f["text"] for f in fe.frames[rid])) == 20 for rid in "abc")


def test_a_lone_request_waits_one_call_and_its_text_is_the_text_it_gets_without_gathering(tiny_lm_folder):
    texts = []
    for gather_ms in (600_000, 0):
        fe, call, prefills = gathering(tiny_lm_folder, admit_gather_ms=gather_ms)
        fe.submit("a", {"prompt": "KING:", "max_tokens": 30, "seed": 4, "temperature": 0.8})
        call(by=0)
        assert fe.left_out == (["a"] if gather_ms else [])
        fe.drain()
        assert prefills == [1] and fe.frames["a"][-1]["finish_reason"] == "length"
        texts.append("".join(f["text"] for f in fe.frames["a"]))
    assert texts[0] == texts[1] and len(texts[0]) == 30


def test_gathering_ends_when_every_row_is_taken_or_its_time_is_up(tiny_lm_folder):
    fe, call, prefills = gathering(tiny_lm_folder)
    for rid in "ab":
        fe.submit(rid, {"prompt": rid, "max_tokens": 20, "seed": 1})
    call(by=0)
    for rid in "cd":  # the batch's last two rows: no request can join before one ends
        fe.submit(rid, {"prompt": rid, "max_tokens": 20, "seed": 1})
    call(by=0)
    assert prefills == [4] and sorted(fe.frames) == ["a", "b", "c", "d"]

    fe, call, prefills = gathering(tiny_lm_folder)
    fe.submit("a", {"prompt": "a", "max_tokens": 20, "seed": 1})
    call(by=0)
    fe.submit("b", {"prompt": "b", "max_tokens": 20, "seed": 1})
    call(by=600.0)  # ten minutes since a came: time is up, though b is new
    assert prefills == [2] and sorted(fe.frames) == ["a", "b"]


def test_requests_joining_running_rows_are_not_gathered(tiny_lm_folder):
    """Running rows keep stepping: a request that joins them gets its first token in the call that admits it."""
    fe, call, prefills = gathering(tiny_lm_folder)
    fe.submit("a", {"prompt": "a", "max_tokens": 100, "seed": 1})
    call(by=0)
    call()
    assert [len(f["text"]) for f in fe.frames["a"]] == [1]
    fe.submit("b", {"prompt": "b", "max_tokens": 100, "seed": 2})
    call()
    assert [len(f["text"]) for f in fe.frames["b"]] == [1] and prefills == [1, 1]


def test_a_stream_that_ends_while_its_text_is_held_keeps_that_text_when_a_gather_begins(tiny_lm_folder):
    """On the test's clock (a token a minute, a long step ten): a stream's frames are held by a 30-minute frame
    interval (grown past the 10-minute floor, so steps stay ten minutes), it ends in the background, and the next
    call brings a request to the now idle engine, which starts a gather: the ended stream's last frame still
    carries everything held for it."""
    fe, call, held = minute_tokens(tiny_lm_folder, frame_interval_ms=600_000, frame_interval_per_stream_ms=1_800_000,
                                   max_frame_interval_ms=1_800_000, admit_gather_ms=600_000, max_tokens_per_step=1)
    fe.submit("a", {"prompt": "x", "max_tokens": 12, "seed": 1})
    call(by=0)  # gathered
    call(by=0)  # a's first token, in its first frame; the step after it (young rows) makes one token
    call()  # that token is held (the interval has not passed); the long step after this call makes a's last ten
    assert [len(f["text"]) for f in fe.frames["a"]] == [1] and "a" in fe.h._held  # one token held
    assert not fe.h.engine.has_work()  # a ended in the background step
    fe.submit("b", {"prompt": "y", "max_tokens": 5, "seed": 2})
    call()  # b is gathered; a's last frame goes out, with the held token
    assert fe.left_out == ["b"]
    assert [len(f["text"]) for f in fe.frames["a"]] == [1, 11] and fe.frames["a"][-1]["finish_reason"] == "length"
    fe.drain()
    assert len("".join(f["text"] for f in fe.frames["b"])) == 5


def test_a_gathered_request_whose_client_goes_away_is_dropped_before_the_prefill(tiny_lm_folder):
    fe, call, prefills = gathering(tiny_lm_folder)
    fe.submit("stay", {"prompt": "a", "max_tokens": 10, "seed": 1})
    fe.submit("leave", {"prompt": "b", "max_tokens": 10, "seed": 2})
    call(by=0)
    assert fe.left_out == ["stay", "leave"]
    fe.inflight.remove("leave")  # the frontend dropped it: its client closed the connection
    call(by=0)
    assert prefills == [1] and "leave" not in fe.h.engine and fe.h.aborted == 1
    fe.drain()
    assert "leave" not in fe.frames and len("".join(f["text"] for f in fe.frames["stay"])) == 10
