"""The OpenAI-compatible route, through the official `openai` client against the real stack."""
import openai
import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_completion(client, corpus_chars):
    r = client.completions.create(model="lm-shakespeare", prompt="ROMEO:\n", max_tokens=50, temperature=0.7, seed=3)
    assert r.object == "text_completion" and r.model == "lm-shakespeare" and r.id.startswith("cmpl-")
    (choice,) = r.choices
    assert choice.index == 0 and choice.finish_reason == "length"
    assert len(choice.text) == 50 and set(choice.text) <= corpus_chars
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (7, 50, 57)


def test_streamed_completion_equals_the_non_streamed_one(client):
    args = dict(model="lm-shakespeare", prompt="KING:", max_tokens=80, temperature=0.9, seed=21)
    whole = client.completions.create(**args).choices[0].text
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 80


def test_n_and_prompt_lists_give_every_choice(client):
    r = client.completions.create(model="lm-shakespeare", prompt=["To be", "Or not"], n=2, max_tokens=10,
                                  seed=5, stop=["\n\n"])
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == 2 * 5 + 2 * 6
    texts = {c.index: c.text for c in r.choices}
    assert texts[0] != texts[1]  # n > 1 with a seed: seed + j per choice, so they differ
    assert all(c.finish_reason in ("length", "stop") for c in r.choices)


def test_stop_string_ends_the_completion(client):
    base = client.completions.create(model="lm-shakespeare", prompt="ROMEO:", max_tokens=200, temperature=0)
    stop = base.choices[0].text[30:33]
    r = client.completions.create(model="lm-shakespeare", prompt="ROMEO:", max_tokens=200, temperature=0, stop=stop)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base.choices[0].text[: base.choices[0].text.find(stop)]


def test_errors_reach_the_client_in_openais_shape(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="lm-shakespeare", prompt="a", max_tokens=5000)
    assert e.value.status_code == 400
    assert e.value.body == {"message": "max_tokens: Input should be less than or equal to 2048",
                            "type": "invalid_request_error", "param": "max_tokens", "code": 400}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="a")
    with pytest.raises(openai.BadRequestError, match="prompts x n must be at most 8"):
        client.completions.create(model="lm-shakespeare", prompt=["a", "b", "c"], n=3)
