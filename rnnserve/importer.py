"""`rnnserve import`: weights trained elsewhere into a model folder that serves.

The layout read is PyTorch's `word_language_model` example (Embedding `encoder` -> nn.LSTM / nn.GRU /
nn.RNN `rnn` -> Linear `decoder`), the most common recurrent language model there is: its
`state_dict` saved with `torch.save(model.state_dict(), F)`, and its vocabulary (the example's
`corpus.dictionary.idx2word`) as a text file of one word per line, in index order, or a JSON list.
The weights are read with `weights_only=True`, which refuses anything but tensors and plain
containers, so an imported file cannot run code.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from rnnserve.models.folder import name_problem, save_lm
from rnnserve.models.lm import LMConfig, RNNLanguageModel
from rnnserve.tokenizer import WordLMTokenizer
from rnnserve.training.card import command_line, write_card

CELLS = {4: "lstm", 3: "gru", 1: "rnn"}  # rows of weight_ih per hidden unit


class ImportError_(ValueError):
    """The file is not a state_dict of the layout read here; the message says what was found."""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickled whole model, a foreign or corrupt file
        raise ImportError_(f"{path}: not a state_dict readable with weights_only=True ({type(e).__name__}); save "
                           f"the weights with torch.save(model.state_dict(), path)") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ImportError_(f"{path}: expected a state_dict (names to tensors)")
    return state


def read_vocab(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        words = json.loads(text)
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ImportError_(f"{path}: expected a JSON list of words")
        return words
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


def convert(state: dict[str, torch.Tensor], vocab_size: int, cell: str | None = None) -> RNNLanguageModel:
    """The example's tensors, renamed onto RNNLanguageModel (one single-layer module per layer)."""
    for key in ("encoder.weight", "decoder.weight", "decoder.bias", "rnn.weight_ih_l0", "rnn.weight_hh_l0"):
        if key not in state:
            raise ImportError_(f"no {key!r}: this is not word_language_model's RNNModel (found: "
                               f"{', '.join(sorted(state)[:8])})")
    if any(re.search(r"_reverse$", k) for k in state):
        raise ImportError_("a bidirectional recurrent layer cannot be a language model")
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"rnn\.weight_ih_l(\d+)$", k)))
    vocab, embed = state["encoder.weight"].shape
    hidden = state["rnn.weight_hh_l0"].shape[1]
    gates = state["rnn.weight_ih_l0"].shape[0] // hidden
    cell = cell or CELLS.get(gates)
    if cell is None or CELLS.get(gates) != cell:
        raise ImportError_(f"rnn.weight_ih_l0 has {gates} x {hidden} rows: not an LSTM (4), GRU (3) or RNN (1)")
    if vocab != vocab_size or state["decoder.weight"].shape != (vocab, hidden):
        raise ImportError_(f"the vocabulary has {vocab_size} words but the weights {vocab} (encoder) and "
                           f"{state['decoder.weight'].shape[0]} (decoder)")
    tied = embed == hidden and torch.equal(state["encoder.weight"], state["decoder.weight"])
    model = RNNLanguageModel(LMConfig(vocab_size=vocab, cell=cell, embed_dim=embed, hidden_size=hidden,
                                      num_layers=layers, dropout=0.0, tie_weights=tied))
    mapped = {"embed.weight": state["encoder.weight"], "head.weight": state["decoder.weight"],
              "head.bias": state["decoder.bias"]}
    for i in range(layers):
        for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            mapped[f"layers.{i}.{kind}_l0"] = state[f"rnn.{kind}_l{i}"]
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if missing or unexpected:
        raise ImportError_(f"weights do not fit: missing {missing}, unexpected {unexpected}")
    return model


def import_word_lm(weights: Path, vocab: Path, out: Path, name: str, cell: str | None = None,
                   terms: str = "") -> Path:
    if name_problem(name):
        raise ImportError_(f"--name: {name_problem(name)}")
    words = read_vocab(vocab)
    try:
        tokenizer = WordLMTokenizer(words)
    except ValueError as e:
        raise ImportError_(f"{vocab}: {e}") from None
    model = convert(read_state_dict(weights), tokenizer.vocab_size, cell)
    c = model.config
    save_lm(out, model, tokenizer, meta={"name": name, "imported_from": "word_language_model"})
    write_card(out, name=name, task="lm", summary="A word-level language model imported from PyTorch's "
               "word_language_model layout (Embedding -> recurrent layers -> Linear) by `rnnserve import`.",
               languages=None, data=[("weights", str(weights)), ("vocabulary", f"{vocab}: {len(words):,} words")],
               terms=terms, command=command_line(), metrics={"parameters": sum(p.numel() for p in model.parameters())},
               minutes=None, architecture={"cell": c.cell, "layers": c.num_layers, "hidden": c.hidden_size,
                                           "embeddings": c.embed_dim, "tied": c.tie_weights},
               tokenizer=f"words ({len(words):,}), lines ended by <eos>",
               usage=f"Put this folder under `models/` and run `make serve`, or try it without a server: "
                     f"`rnnserve generate {out} --prompt 'the'`.")
    return out


def main(args) -> int:
    try:
        out = import_word_lm(Path(args.weights), Path(args.vocab), Path(args.out), args.name or Path(args.out).name,
                             args.cell, args.data_terms)
    except (ImportError_, OSError) as e:
        raise SystemExit(f"rnnserve import: error: {e}") from None
    print(out)
    return 0
