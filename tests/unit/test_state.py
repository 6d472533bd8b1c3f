"""States as bytes and as signed tokens: exact round trips, and every malformed one refused."""
import pytest
import torch

from rnnserve.engine.lm_engine import LMEngine
from rnnserve.engine.sampling import SamplingParams
from rnnserve.engine.state import HEADER, StateError, from_bytes, state_size
from rnnserve.service.gateway.errors import APIError
from rnnserve.service.gateway.states import StateSigner
from tests.unit.test_lm_engine import run

WEIGHTS = bytes(range(16))


def final_state(lm, prompt="ROMEO:", tokens=20, **kw):
    e = LMEngine(lm.model, lm.tokenizer)
    e.add("a", prompt, SamplingParams(max_tokens=tokens, temperature=0), return_state=True, **kw)
    texts, finals = run(e, 3)
    return texts["a"], finals["a"].state


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_bytes_round_trip(tiny_lm, dtype):
    _, state = final_state(tiny_lm)
    blob = state.to_bytes(WEIGHTS, dtype)
    assert len(blob) == state_size(tiny_lm.model, dtype)
    back = from_bytes(blob, tiny_lm.model, WEIGHTS)
    assert (back.pending, back.tokens, back.line_start) == (state.pending, state.tokens, state.line_start)
    tol = 0 if dtype == "float32" else 1e-3
    for a, b in zip(back.layers, state.layers):
        for x, y in zip(a, b):
            assert x.shape == y.shape == (1, 1, 32)
            torch.testing.assert_close(x, y, atol=tol, rtol=tol)


def test_continuing_from_a_state_is_exact_in_the_engine(tiny_lm):
    whole, _ = final_state(tiny_lm, tokens=50)
    first, state = final_state(tiny_lm, tokens=20)
    assert state.tokens == 6 + 20 - 1  # the prompt and all but the last (pending) token
    e = LMEngine(tiny_lm.model, tiny_lm.tokenizer)
    e.add("b", "", SamplingParams(max_tokens=30, temperature=0), state=from_bytes(state.to_bytes(WEIGHTS),
                                                                                  tiny_lm.model, WEIGHTS))
    e.add("other", "a batch neighbour", SamplingParams(max_tokens=40, seed=3))
    texts, _ = run(e, 4)
    assert first + texts["b"] == whole


@pytest.mark.parametrize("mangle, message", [
    (lambda b: b[:10], "state is truncated"),
    (lambda b: b"XXXX" + b[4:], "state is not a state of this server's format"),
    (lambda b: b[: HEADER.size - 16] + bytes(16) + b[HEADER.size:],
     "state was made by other weights than this model's"),
    (lambda b: b + b"\0\0\0\0", "state has 516 bytes of layers; this model's have 512"),
    (lambda b: b[:HEADER.size] + b"\xff\xff\xff\x7f" * 128, "state holds values that are not finite"),
])
def test_malformed_bytes_are_refused(tiny_lm, mangle, message):
    _, state = final_state(tiny_lm)
    with pytest.raises(StateError) as e:
        from_bytes(mangle(state.to_bytes(WEIGHTS)), tiny_lm.model, WEIGHTS)
    assert str(e.value) == message


def test_signed_tokens():
    signer = StateSigner(b"k" * 32)
    token = signer.sign("m", b"\x00state")
    assert signer.verify("m", token) == b"\x00state"
    with pytest.raises(APIError, match="issued for model 'm', not 'n'"):
        signer.verify("n", token)
    with pytest.raises(APIError, match="signature does not match"):
        StateSigner(b"j" * 32).verify("m", token)
    with pytest.raises(APIError, match="not a state this server issued"):
        signer.verify("m", "rs2.bm9w")


def test_a_cell_past_float16s_range_is_written_in_float32_and_read_back(tiny_lm):
    _, state = final_state(tiny_lm)
    h, c = state.layers[0]
    state.layers[0] = (h, c * 0 + 70_000.0)  # float16's largest is 65,504
    blob = state.to_bytes(WEIGHTS, "float16")
    assert blob[5] == 2 and len(blob) == state_size(tiny_lm.model, "float32")
    back = from_bytes(blob, tiny_lm.model, WEIGHTS)
    assert back.layers[0][1].max().item() == 70_000.0
    state.layers[0] = (h, c)
    assert state.to_bytes(WEIGHTS, "float16")[5] == 1  # within range: still the compact form


def test_tokens_are_bound_to_the_api_key_that_made_them():
    signer = StateSigner(b"k" * 32)
    token = signer.sign("m", b"\x00state", owner="k1-digest")
    assert signer.verify("m", token, owner="k1-digest") == b"\x00state"
    for other in ("k2-digest", ""):
        with pytest.raises(APIError, match="issued to another API key"):
            signer.verify("m", token, owner=other)


def test_base64_is_decoded_strictly():
    signer = StateSigner(b"k" * 32)
    token = signer.sign("m", b"\x00state\x01")
    prefix, model, blob, mac = token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    sibling = blob[:-1] + alphabet[alphabet.index(blob[-1]) ^ 1]  # the same bytes, another unused bit set
    junk = [blob[:3] + "!" + blob[3:], blob[:3] + " " + blob[3:], blob + "==", blob[:4] + "+/" + blob[4:], sibling]
    for bad in junk:
        with pytest.raises(APIError, match="not a state this server issued"):
            signer.verify("m", ".".join([prefix, model, bad, mac]))
