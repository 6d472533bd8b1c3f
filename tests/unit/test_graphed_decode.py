"""Several tokens per replay (models/graphed_decode.py): on CPU its eager path, on padded buffers, gives what
the engine's own token loop gives, bit for bit with the exact int8 step; the capture needs a CUDA GPU."""
import random

import pytest
import torch

from rnnserve.engine.lm_engine import MAX_LOGPROBS, LMEngine
from rnnserve.engine.sampling import SamplingParams
from rnnserve.models.graphed_decode import GraphedDecode

N = 8


def _run(engine: LMEngine, requests: list[dict]) -> dict:
    for i, r in enumerate(requests):
        engine.add(str(i), r["prompt"], r["params"], logprobs=r["logprobs"], return_state=r["state"])
    out: dict = {}
    while engine.has_work():
        for o in engine.step(N):
            d = out.setdefault(o.request_id, {"text": "", "lps": []})
            d["text"] += o.text
            d["lps"] += [(e.token, e.logprob, e.top) for e in o.logprobs or []]
            if o.finished:
                d["end"] = (o.finish_reason, o.completion_tokens, o.cumulative_logprob,
                            o.state.to_bytes(b"k" * 16) if o.state is not None else None)
    return out


def _requests(seed: int, state: bool) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": rng.choice(["", "ROMEO:", "To be"]),
             "params": SamplingParams(max_tokens=rng.randint(1, 30), temperature=rng.choice([0.0, 0.8, 1.3]),
                                      top_k=rng.choice([0, 4]), top_p=rng.choice([1.0, 0.8]),
                                      stop=rng.choice([[], ["e"], ["a", "\n"]]), seed=i),
             "logprobs": rng.choice([None, 0, 3, 5]), "state": state and i % 4 == 0} for i in range(20)]


@pytest.mark.parametrize("state", [False, True])
def test_the_eager_path_of_the_graphed_decode_equals_the_engines_loop(tiny_lm, state):
    torch.set_num_threads(1)
    want = _run(LMEngine(tiny_lm.model, tiny_lm.tokenizer, max_batch_size=16, int8=True), _requests(3, state))
    engine = LMEngine(tiny_lm.model, tiny_lm.tokenizer, max_batch_size=16, int8=True)
    engine._graphed_decode = graphed = GraphedDecode(engine._step, 16, N, MAX_LOGPROBS, capture=False)
    got = _run(engine, _requests(3, state))
    assert got == want
    if not state:  # it ran (padded buckets); a batch with a row returning its state takes the engine's loop
        assert graphed._buffers
    assert any(d["lps"] for d in got.values()) and any(d["end"][0] == "stop" for d in got.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("int8", [True, False])
def test_the_captured_decode_generates_as_the_engines_loop_on_the_gpu(tiny_lm_folder, int8):
    from rnnserve.models.folder import load_lm

    loaded = load_lm(tiny_lm_folder, device=torch.device("cuda"), dtype=torch.float32)
    plain = LMEngine(loaded.model, loaded.tokenizer, max_batch_size=16, device="cuda", int8=int8)
    graphed = LMEngine(loaded.model, loaded.tokenizer, max_batch_size=16, device="cuda", int8=int8,
                       cuda_graphs=True, tokens_per_replay=N)
    assert graphed._graphed_decode is not None
    want, got = _run(plain, _requests(5, False)), _run(graphed, _requests(5, False))
    assert any(b.graph is not None for b in graphed._graphed_decode._buffers.values())
    if int8:  # exact: the same bits
        assert got == want
    else:  # fp32 GEMMs round by shape (padded buckets): the same greedy/sampled text in all but rare cases
        assert sum(got[k]["text"] == want[k]["text"] for k in want) >= len(want) - 2
