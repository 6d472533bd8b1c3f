"""A user's own data to a served model: tiny models trained by the CLI from files this test writes (and one
imported), archived and served by `rnnserve serve` from a models folder of their own, each under the name its
`--name` gave, beside a model store that already holds another archive, and asked through the gateway."""
import itertools
import json

import httpx
import pytest
import torch

from rnnserve.cli import main
from rnnserve.models.folder import load_translation
from rnnserve.offline import translate_lines
from rnnserve.paths import MODELS_DIR
from rnnserve.service.archive import build_archive
from rnnserve.service.stack import start_stack, stop_stack

pytestmark = pytest.mark.e2e

SUBJECTS = [("Le chien", "The dog"), ("Le chat", "The cat"), ("La femme", "The woman"), ("L'homme", "The man"),
            ("L'enfant", "The child"), ("La fille", "The girl"), ("Le garçon", "The boy"), ("L'oiseau", "The bird")]
VERBS = [("court", "runs"), ("mange", "eats"), ("dort", "sleeps"), ("saute", "jumps"), ("chante", "sings"),
         ("joue", "plays")]
PLACES = [("dans le parc", "in the park"), ("sous l'arbre", "under the tree"), ("près de l'eau", "near the water"),
          ("à la maison", "at home"), ("sur la plage", "on the beach"), ("dans la rue", "in the street")]
PAIRS = [(f"{s} {v} {p}.", f"{S} {V} {P}.") for (s, S), (v, V), (p, P) in itertools.product(SUBJECTS, VERBS, PLACES)]
ENGLISH = {w for _, en in PAIRS for w in en.rstrip(".").split()}
TINY = ["--embed-dim", "32", "--threads", "1", "--seed", "3"]


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    data, models = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("models")
    (data / "train.fr").write_text("".join(fr + "\n" for fr, _ in PAIRS), encoding="utf-8")
    (data / "train.en").write_text("".join(en + "\n" for _, en in PAIRS), encoding="utf-8")
    assert main(["train", "translation", "--train-src", str(data / "train.fr"), "--train-tgt", str(data / "train.en"),
                 "--src-lang", "fr", "--tgt-lang", "en", "--out", str(models / "tiny-fr-en"), "--src-vocab", "300",
                 "--tgt-vocab", "300", "--enc-hidden", "32", "--dec-hidden", "64", "--attn-dim", "32",
                 "--enc-layers", "1", "--dropout", "0.1", "--batch-size", "16", "--lr", "0.01", "--epochs", "12",
                 "--patience", "12", "--tf-min", "1.0", "--label-smoothing", "0", "--data-terms", "written by the test",
                 *TINY]) == 0
    text = "".join(f"{en}\n" for _, en in PAIRS[:200])
    (data / "lm.txt").write_text(text, encoding="utf-8")
    # --name: served as tiny-lm from the folder lm-folder
    assert main(["train", "lm", "--train-file", str(data / "lm.txt"), "--tokenizer", "subword", "--vocab-size", "300",
                 "--out", str(models / "lm-folder"), "--name", "tiny-lm", "--hidden-size", "64", "--num-layers", "1",
                 "--seq-len", "32", "--batch-size", "8", "--epochs", "4", *TINY]) == 0
    # a model's own limits, below the service-wide ones
    config = json.loads((models / "lm-folder" / "config.json").read_text())
    (models / "lm-folder" / "config.json").write_text(json.dumps({**config, "limits": {"max_tokens": 50}}))
    # word_language_model's layout, imported under a name of its own
    torch.manual_seed(0)
    words = ["<eos>", *sorted(ENGLISH)]
    weights = {"encoder.weight": torch.randn(len(words), 8), "rnn.weight_ih_l0": torch.randn(32, 8) * 0.1,
               "rnn.weight_hh_l0": torch.randn(32, 8) * 0.1, "rnn.bias_ih_l0": torch.zeros(32),
               "rnn.bias_hh_l0": torch.zeros(32), "decoder.weight": torch.randn(len(words), 8),
               "decoder.bias": torch.zeros(len(words))}
    torch.save(weights, data / "words.pt")
    (data / "vocab.txt").write_text("".join(f"{w}\n" for w in words))
    assert main(["import", "--weights", str(data / "words.pt"), "--vocab", str(data / "vocab.txt"),
                 "--out", str(models / "words-folder"), "--name", "words"]) == 0
    # the store already holds an archive of a model that is not in this models folder: it is left alone
    root = tmp_path_factory.mktemp("stack")
    build_archive("lm-shakespeare", MODELS_DIR / "lm-shakespeare", "lm", root / "model_store")
    stack = start_stack(root, models_dir=models)
    yield stack, models
    stop_stack(stack)


def test_the_trained_folders_hold_sentencepiece_models_and_a_model_card(own):
    _, models = own
    files = sorted(p.name for p in (models / "tiny-fr-en").iterdir())
    assert files == ["README.md", "config.json", "loss.png", "metrics.json", "model.safetensors", "source.model",
                     "target.model"]
    card = (models / "tiny-fr-en" / "README.md").read_text()
    assert "| languages | fr → en |" in card and "written by the test" in card
    assert "rnnserve train translation --train-src" in card and "validation BLEU" in card


def test_models_lists_both_with_languages_and_their_own_limits(own):
    stack, _ = own
    with stack.client() as c:
        cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert set(cards) == {"tiny-fr-en", "tiny-lm", "words"}  # served names (--name), not the store's other archive
    assert cards["tiny-fr-en"]["languages"] == {"source": "fr", "target": "en"}
    assert cards["tiny-fr-en"]["task"] == "translation" and cards["tiny-lm"]["task"] == "lm"
    assert cards["tiny-lm"]["limits"]["max_tokens"] == 50 and cards["tiny-lm"]["languages"] is None


def test_translations_through_the_gateway_are_cased_words_of_the_target_language(own):
    stack, models = own
    sources = ["Le garçon joue sur la plage.", "La femme dort près de l'eau.", "L'oiseau chante sous l'arbre."]
    with stack.client() as c:
        r = c.post("/v1/translate", json={"model": "tiny-fr-en", "text": sources, "beam_size": 4})
    assert r.status_code == 200, r.text
    texts = [t["text"] for t in r.json()["translations"]]
    for text in texts:
        assert text[0].isupper() and text.endswith(".") and "<unk>" not in text and "\u2047" not in text, texts
        assert set(text.rstrip(".").split()) <= ENGLISH, texts
    # the server answers what the model folder answers offline
    from io import StringIO

    out = StringIO()
    translate_lines(models / "tiny-fr-en", sources, out, beam_size=4, progress=None)
    assert out.getvalue().splitlines() == texts
    tr = load_translation(models / "tiny-fr-en")
    assert r.json()["translations"][0]["source_tokens"] == tr.src.pieces(tr.src.encode(sources[0]))


def test_a_streamed_translation_ends_with_the_whole_text(own):
    stack, _ = own
    body = {"model": "tiny-fr-en", "text": "Le chat mange à la maison.", "stream": True}
    with stack.client() as c, c.stream("POST", "/v1/translate", json=body) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    whole = events[-1]["translation"]["text"]
    assert "".join(e["text"] for e in events) == whole and whole[0].isupper()


def test_generation_from_a_subword_model_and_its_own_limit(own):
    stack, _ = own
    with stack.client() as c:
        r = c.post("/v1/generate", json={"model": "tiny-lm", "prompt": "The dog", "max_tokens": 40, "seed": 1,
                                         "temperature": 0.5})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] == 40 and body["usage"]["prompt_tokens"] >= 2
        assert "<unk>" not in body["text"] and "\u2047" not in body["text"] and len(body["text"]) > 40
        over = c.post("/v1/generate", json={"model": "tiny-lm", "prompt": "The", "max_tokens": 51})
    assert over.status_code == 400
    assert over.json()["error"] == {"message": "max_tokens must be at most 50 for model 'tiny-lm'",
                                    "type": "invalid_request_error", "param": "max_tokens", "code": 400}


def test_an_imported_model_answers_under_its_name_and_only_there(own):
    stack, _ = own
    with stack.client() as c:
        r = c.post("/v1/generate", json={"model": "words", "prompt": "The dog", "max_tokens": 5, "seed": 1})
        folder = c.post("/v1/generate", json={"model": "words-folder", "prompt": "The", "max_tokens": 5})
        other = c.post("/v1/generate", json={"model": "lm-shakespeare", "prompt": "The", "max_tokens": 5})
    assert r.status_code == 200, r.text
    assert r.json()["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}
    assert set(r.json()["text"].split()) <= ENGLISH
    for refused, name in ((folder, "words-folder"), (other, "lm-shakespeare")):
        assert refused.status_code == 404 and refused.json()["error"]["message"] == (
            f"model {name!r} does not exist; GET /v1/models lists the served models")


def test_bad_input_to_a_model_of_ones_own_gets_the_one_error_shape(own):
    stack, _ = own
    r = httpx.post(f"{stack.url}/v1/translate", json={"model": "tiny-lm", "text": "x"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"] == (
        "model 'tiny-lm' is a lm model; use a translation model for this route")
