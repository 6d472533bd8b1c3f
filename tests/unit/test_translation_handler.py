import threading

from rnnserve.models.folder import load_translation
from rnnserve.service.handlers.translation_handler import TranslationHandler
from tests.unit.fakes import FakeContext, Frontend


def make(folder, target_step_ms=0, step_on_admit=True):
    # target_step_ms 0: one decoder step per call, so tests see every step
    ctx = FakeContext(folder, {"max_rows": 16, "max_texts": 3, "max_text_chars": 50,
                               "target_step_ms": target_step_ms, "step_on_admit": step_on_admit})
    h = TranslationHandler()
    h.initialize(ctx)
    return Frontend(h, ctx)


def test_streams_deltas_then_translations_with_attention(tiny_translation_folder):
    fe = make(tiny_translation_folder)
    fe.submit("a", {"texts": ["Ein Mann läuft.", "Zwei Hunde spielen im Schnee!"], "beam_size": 2,
                    "max_tokens": 6, "return_attention": True})
    fe.drain()
    frames = fe.frames["a"]
    last = frames[-1]
    assert "finish_reason" not in frames[0] and last["finish_reason"] == "length"
    tr = load_translation(tiny_translation_folder)
    sources = [tr.src.encode(t) for t in ("Ein Mann läuft.", "Zwei Hunde spielen im Schnee!")]
    assert [t["source_tokens"] for t in last["translations"]] == [tr.src.pieces(ids) for ids in sources]
    for i, t in enumerate(last["translations"]):
        assert len(t["tokens"]) == 6 and t["finish_reason"] == "length"
        assert t["text"] == tr.tgt.decode([tr.tgt.sp.piece_to_id(p) for p in t["tokens"]])
        streamed = "".join(d["text"] for f in frames for d in f.get("deltas", []) if d["index"] == i)
        assert streamed == t["text"]
        assert len(t["attention"]) == 6 and all(len(row) == len(t["source_tokens"]) for row in t["attention"])
    assert last["usage"] == {"prompt_tokens": sum(map(len, sources)), "completion_tokens": 12}


def test_bad_requests_end_alone(tiny_translation_folder):
    fe = make(tiny_translation_folder)
    fe.submit("ok", {"texts": ["ein hund ."], "beam_size": 1, "max_tokens": 20})
    fe.step()
    fe.submit("wide", {"texts": ["a"], "beam_size": 9})
    fe.submit("many", {"texts": ["a", "b", "c", "d"]})
    fe.submit("long", {"texts": ["x" * 51]})
    fe.drain()
    assert fe.frames["wide"][-1]["error"]["message"] == "beam_size must be between 1 and 8"
    assert fe.frames["many"][-1]["error"]["message"] == "at most 3 texts per request"
    assert fe.frames["long"][-1]["error"]["message"] == "each text must be at most 50 characters"
    assert len(fe.frames["ok"][-1]["translations"][0]["tokens"]) == 20


def test_disconnected_request_frees_its_rows(tiny_translation_folder):
    fe = make(tiny_translation_folder)
    fe.submit("gone", {"texts": ["ein mann ."], "beam_size": 8, "max_tokens": 30})
    fe.step()
    assert fe.h.engine.num_rows == 8
    fe.inflight.remove("gone")
    fe.submit("next", {"texts": ["ein hund ."], "beam_size": 8, "max_tokens": 3})
    fe.step()
    assert fe.h.engine.num_rows == 8 and "gone" not in fe.h.engine and fe.h.aborted == 1
    fe.drain()
    assert fe.frames["next"][-1]["finish_reason"] == "length"


def test_a_time_budget_packs_several_decoder_steps_into_one_frame(tiny_translation_folder):
    counts = []
    for budget in (0, 10_000):
        fe = make(tiny_translation_folder, target_step_ms=budget)
        fe.submit("a", {"texts": ["ein mann ."], "beam_size": 2, "max_tokens": 12})
        fe.drain()
        counts.append(len(fe.frames["a"]))
        assert len(fe.frames["a"][-1]["translations"][0]["tokens"]) == 12
    # one decoder step per frame, against: the admitting call's short step, the short background step that
    # follows an admission, then everything else in one long step
    assert counts[0] >= 12 and counts[1] == 3


def test_without_step_on_admit_the_call_returns_and_the_background_step_prefills(tiny_translation_folder):
    results = {}
    for step_on_admit in (True, False):
        fe = make(tiny_translation_folder, step_on_admit=step_on_admit)
        threads = []
        step = fe.h.engine.step
        fe.h.engine.step = lambda: (threads.append(threading.current_thread().name), step())[1]
        handle, in_call = fe.h.handle, []
        fe.h.handle = lambda data, ctx: (handle(data, ctx), in_call.append(len(threads)))[0]
        fe.submit("a", {"texts": ["Ein Mann läuft.", "Zwei Hunde spielen!"], "beam_size": 2, "max_tokens": 8})
        fe.step()
        first_call = list(threads)
        fe.drain()
        results[step_on_admit] = fe.frames["a"][-1]["translations"]
        # all engine work runs on the engine thread, never on TorchServe's calling thread
        assert first_call and all(t.startswith("engine-step") for t in first_call)
        if step_on_admit:
            assert in_call[0] >= 1  # the admitting call's short step ran before the call answered
        else:
            assert fe.frames["a"][0] == {"text": ""}  # the call answered before any decoding
    assert results[True] == results[False]


def test_the_int8_setting_and_RNNSERVE_INT8_choose_the_decoder_step(tiny_translation_folder, monkeypatch):
    def engine(cfg):
        h = TranslationHandler()
        h.initialize(FakeContext(tiny_translation_folder, cfg))
        return h.engine

    assert engine({"int8": True}).int8 and not engine({}).int8
    monkeypatch.setenv("RNNSERVE_INT8", "0")
    assert not engine({"int8": True}).int8
    monkeypatch.setenv("RNNSERVE_INT8", "1")
    assert engine({}).int8
