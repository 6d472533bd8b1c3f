"""Strict batch invariance of the int8 engine: a seeded request gives the same text and the same logprobs,
bit for bit, alone and inside batches of random companions of random sizes, whatever the step size or the
prompts read beside it."""
import random

import pytest
import torch

from rnnserve.engine.lm_engine import LMEngine
from rnnserve.engine.sampling import SamplingParams

LIMIT = 12  # the engine's batch limit


def _probe(rng: random.Random, i: int) -> dict:
    return {"prompt": rng.choice(["", "ROMEO:", "To be, or not", "First Citizen:\nBefore we proceed",
                                  "KING HENRY", "a" * rng.randint(1, 40)]),
            "params": SamplingParams(max_tokens=rng.randint(1, 40), temperature=rng.choice([0.0, 0.7, 1.0, 1.4]),
                                     top_k=rng.choice([0, 3, 20]), top_p=rng.choice([1.0, 0.9, 0.4]),
                                     stop=rng.choice([[], ["e", "a", "o"], ["th", "\n", " "], ["ou"]]), seed=1000 + i),
            "logprobs": rng.choice([None, 0, 2, 5])}


def _record(outputs: dict, o) -> None:
    r = outputs.setdefault(o.request_id, {"text": "", "logprobs": []})
    r["text"] += o.text
    r["logprobs"] += [(e.token, e.logprob, e.top) for e in o.logprobs or []]
    if o.finished:
        r["finish"] = (o.finish_reason, o.completion_tokens, o.cumulative_logprob)


def _add(engine: LMEngine, rid: str, req: dict) -> None:
    engine.add(rid, req["prompt"], req["params"], logprobs=req["logprobs"])


def _alone(model, tokenizer, req: dict) -> dict:
    engine = LMEngine(model, tokenizer, max_batch_size=LIMIT, int8=True)
    _add(engine, "p", req)
    out: dict = {}
    while engine.has_work():
        for o in engine.step(1):
            _record(out, o)
    return out["p"]


@pytest.mark.parametrize("model_name", ["tiny", "shakespeare"])
def test_seeded_requests_are_bit_identical_alone_and_in_random_batches(model_name, tiny_lm):
    torch.set_num_threads(1)  # what the handlers run (several threads split element-wise loops by batch size)
    if model_name == "tiny":
        lm = tiny_lm
    else:
        from rnnserve.models.folder import load_lm
        from tests.conftest import LM_FOLDER
        lm = load_lm(LM_FOLDER)
    rng = random.Random(7)
    probes = [_probe(rng, i) for i in range(16 if model_name == "tiny" else 12)]
    alone = [_alone(lm.model, lm.tokenizer, p) for p in probes]
    assert any(a["finish"][0] == "stop" for a in alone) and any(a["logprobs"] for a in alone)
    for trial in range(3):
        engine = LMEngine(lm.model, lm.tokenizer, max_batch_size=LIMIT, int8=True,
                          prefill_chunk=rng.choice([None, 3, 8]))
        pending = [(f"p{i}", p) for i, p in enumerate(probes)]
        rng.shuffle(pending)
        out: dict = {}
        companions = 0
        while pending or engine.has_work():
            # random companions, random arrivals, random step sizes, up to the batch limit and past it (queued)
            for _ in range(min(rng.randint(0, LIMIT), 40 - companions)):
                _add(engine, f"c{companions}", _probe(rng, 10_000 + companions))
                companions += 1
            for _ in range(rng.randint(0, 3)):
                if pending:
                    rid, p = pending.pop()
                    _add(engine, rid, p)
            for o in engine.step(rng.randint(1, 9)):
                _record(out, o)
        for i, want in enumerate(alone):
            assert out[f"p{i}"] == want, (trial, i)
