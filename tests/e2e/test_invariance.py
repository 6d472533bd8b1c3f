"""Through the real stack: a seeded completion's text and logprobs are the same bits alone and among random
companions (lm-shakespeare is served with its exact int8 decode step)."""
import asyncio
import json
import random

import openai
import pytest

from rnnserve.paths import MODELS_DIR

pytestmark = pytest.mark.e2e


def _probe(rng: random.Random, seed: int) -> dict:
    return dict(model="lm-shakespeare", prompt=rng.choice(["", "ROMEO:", "To be, or not to be", "KING HENRY:\n"]),
                max_tokens=rng.randint(5, 60), temperature=rng.choice([0.0, 0.8, 1.2]),
                top_p=rng.choice([1.0, 0.9]), stop=rng.choice([None, ["e"], ["\n", "th"]]), seed=seed,
                logprobs=rng.choice([None, 0, 2]), extra_body={"top_k": rng.choice([0, 5])})


def _answer(r) -> tuple:
    (c,) = r.choices
    lp = c.logprobs
    return c.text, c.finish_reason, (lp.tokens, lp.token_logprobs, lp.top_logprobs) if lp else None


async def _run(url: str, probes: list[dict], rng: random.Random) -> list[tuple]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    companions = [client.completions.create(**_probe(rng, 10_000 + i)) for i in range(rng.randint(8, 40))]
    mine = [client.completions.create(**p) for p in probes]
    order = list(range(len(companions) + len(mine)))
    rng.shuffle(order)
    calls = companions + mine
    results = await asyncio.gather(*(calls[i] for i in order))
    by_call = dict(zip(order, results))
    await client.close()
    return [_answer(by_call[len(companions) + j]) for j in range(len(mine))]


def test_seeded_completions_are_bit_identical_alone_and_among_random_companions(stack):
    assert json.loads((MODELS_DIR / "lm-shakespeare" / "config.json").read_text())["int8"] is True
    rng = random.Random(11)
    probes = [_probe(rng, i) for i in range(12)]
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=60)
    alone = [_answer(client.completions.create(**p)) for p in probes]
    assert any(a[1] == "stop" for a in alone) and any(a[2] for a in alone)
    for _ in range(2):
        assert asyncio.run(_run(stack.url, probes, rng)) == alone


def _translation_probe(rng: random.Random, texts: list[str]) -> dict:
    beam = rng.choice([1, 2, 4, 5])
    return {"model": "translate-de-en", "text": rng.sample(texts, rng.choice([1, 1, 2])),
            "beam_size": beam, "n_best": rng.randint(1, beam), "return_alignment": rng.random() < 0.3}


async def _translate_among_companions(url: str, probes: list[dict], texts: list[str], rng: random.Random) -> list:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        calls = [_translation_probe(rng, texts) for _ in range(rng.randint(8, 30))] + probes
        order = list(range(len(calls)))
        rng.shuffle(order)
        answers = await asyncio.gather(*(client.post("/v1/translate", json=calls[i]) for i in order))
    by_call = dict(zip(order, answers))
    return [by_call[len(calls) - len(probes) + j].json()["translations"] for j in range(len(probes))]


def test_translations_are_bit_identical_alone_and_among_random_companions(stack):
    """translate-de-en is served with its exact int8 decoder step: a sentence's translation, logprob and n-best
    list are the same alone and decoded beside random others (other sources, lengths and beam widths)."""
    from rnnserve.paths import DATA_DIR
    from rnnserve.training.corpus import read_lines

    assert json.loads((MODELS_DIR / "translate-de-en" / "config.json").read_text())["int8"] is True
    texts = read_lines(DATA_DIR / "multi30k" / "raw" / "test_2016_flickr.de.gz")[:200]
    rng = random.Random(3)
    probes = [_translation_probe(rng, texts) for _ in range(6)]
    with stack.client() as c:
        alone = []
        for p in probes:
            r = c.post("/v1/translate", json=p)
            assert r.status_code == 200, r.text
            alone.append(r.json()["translations"])
    assert all(t["text"] for a in alone for t in a) and any(t["hypotheses"] for a in alone for t in a)
    for _ in range(2):
        assert asyncio.run(_translate_among_companions(stack.url, probes, texts, rng)) == alone
