"""`rnnserve import`: PyTorch's word_language_model layout into a model folder that loads and generates."""
import json

import pytest
import torch
import torch.nn as nn

from rnnserve.cli import main
from rnnserve.engine.lm_engine import LMEngine
from rnnserve.engine.sampling import SamplingParams
from rnnserve.models.folder import load_lm

WORDS = ["<eos>", "the", "cat", "sat", "on", "mat", "a", "dog", "<unk>"]


class RNNModel(nn.Module):
    """The example's model (word_language_model/model.py), built here from its description."""

    def __init__(self, rnn_type: str, ntoken: int, ninp: int, nhid: int, nlayers: int, tie: bool = False):
        super().__init__()
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = getattr(nn, rnn_type)(ninp, nhid, nlayers, dropout=0.2 if nlayers > 1 else 0.0)
        self.decoder = nn.Linear(nhid, ntoken)
        if tie:
            self.decoder.weight = self.encoder.weight

    def forward(self, x):  # (T, B) as the example feeds it
        out, _ = self.rnn(self.encoder(x))
        return self.decoder(out)


@pytest.mark.parametrize("rnn_type,tie", [("LSTM", False), ("GRU", True), ("RNN", False)])
def test_imported_model_computes_what_the_original_computes(tmp_path, rnn_type, tie):
    torch.manual_seed(0)
    original = RNNModel(rnn_type, len(WORDS), 16, 16 if tie else 24, 2, tie).eval()
    torch.save(original.state_dict(), tmp_path / "model.pt")
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    assert main(["import", "--weights", str(tmp_path / "model.pt"), "--vocab", str(tmp_path / "vocab.txt"),
                 "--out", str(tmp_path / "lm-words"), "--data-terms", "made up in a test"]) == 0
    lm = load_lm(tmp_path / "lm-words")
    assert lm.model.config.cell == rnn_type.lower() and lm.model.config.tie_weights == tie
    ids = lm.tokenizer.encode("the cat sat on a mat\nthe dog")
    assert ids == [1, 2, 3, 4, 6, 5, 0, 1, 7]
    x = torch.tensor(ids)
    with torch.no_grad():
        want = original(x[:, None])[:, 0]
        got, _, _ = lm.model(x[None])
    # fp16 storage of the folder: close, not equal
    assert torch.allclose(got[0], want, atol=2e-2), (got[0] - want).abs().max()
    card = (tmp_path / "lm-words" / "README.md").read_text()
    assert "word_language_model" in card and "made up in a test" in card and "rnnserve import --weights" in card


def test_an_imported_model_generates_words_and_line_breaks(tmp_path):
    torch.manual_seed(1)
    torch.save(RNNModel("LSTM", len(WORDS), 8, 8, 1).state_dict(), tmp_path / "m.pt")
    (tmp_path / "v.json").write_text(json.dumps(WORDS))
    main(["import", "--weights", str(tmp_path / "m.pt"), "--vocab", str(tmp_path / "v.json"), "--out",
          str(tmp_path / "w")])
    lm = load_lm(tmp_path / "w")
    engine = LMEngine(lm.model, lm.tokenizer)
    engine.add("r", "the cat", SamplingParams(max_tokens=30, seed=3))
    text = "".join(o.text for _ in range(30) for o in engine.step())
    words = text.replace("\n", " ").split()
    assert len(text.split(" ")) > 1 and set(words) <= set(WORDS) - {"<eos>"}
    assert text.startswith(" ") or text.startswith("\n")  # continues the prompt's line or ends it


def test_a_pickled_whole_model_is_refused_without_being_unpickled(tmp_path, capsys):
    torch.save(RNNModel("LSTM", len(WORDS), 8, 8, 1), tmp_path / "whole.pt")  # the object, not its state_dict
    (tmp_path / "v.txt").write_text("\n".join(WORDS))
    with pytest.raises(SystemExit, match=r"not a state_dict readable with weights_only=True .*"
                                         r"torch.save\(model.state_dict\(\), path\)"):
        main(["import", "--weights", str(tmp_path / "whole.pt"), "--vocab", str(tmp_path / "v.txt"), "--out",
              str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_a_vocabulary_that_does_not_fit_the_weights_is_refused(tmp_path):
    torch.save(RNNModel("GRU", len(WORDS), 8, 8, 1).state_dict(), tmp_path / "m.pt")
    (tmp_path / "v.txt").write_text("\n".join(WORDS[:-1]))
    with pytest.raises(SystemExit, match="the vocabulary has 8 words but the weights 9"):
        main(["import", "--weights", str(tmp_path / "m.pt"), "--vocab", str(tmp_path / "v.txt"), "--out",
              str(tmp_path / "x")])
