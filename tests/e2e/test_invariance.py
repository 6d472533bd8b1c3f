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
