"""The training CLI end to end on tiny settings: folders, metrics, plots, resume, evaluate."""
import json
import math
import subprocess
import sys

import pytest

from rnnserve.cli import main
from rnnserve.models.folder import load_lm, load_translation
from rnnserve.paths import DATA_DIR
from rnnserve.training.lm import LMTrainConfig, train_lm

SHAKESPEARE = str(DATA_DIR / "tinyshakespeare" / "input.txt")
RAW = DATA_DIR / "multi30k" / "raw"
TINY_LM = ["--train-file", SHAKESPEARE, "--limit-chars", "20000", "--hidden-size", "32", "--embed-dim", "16",
           "--batch-size", "8", "--seq-len", "32", "--warmup-steps", "5", "--threads", "1"]


def test_train_lm_writes_a_servable_folder_and_learns(tmp_path, capsys):
    out = tmp_path / "lm"
    assert main(["train", "lm", "--out", str(out), "--epochs", "2", *TINY_LM]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {p.name for p in out.iterdir()} == {"config.json", "tokenizer.json", "model.safetensors", "metrics.json",
                                               "loss.png", "README.md"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["history"][1]["val_loss"] < metrics["history"][0]["val_loss"] < math.log(65)
    assert printed["best_val_loss"] == metrics["best_val_loss"]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    lm = load_lm(out)
    assert lm.model.config.hidden_size == 32 and lm.tokenizer.vocab_size == 65
    # the int8 check ran on the saved weights, and config.json says whether it is served in int8
    check = metrics["int8"]
    assert check["int8_keeps_quality"] == (check["int8_delta"] <= 0.01)
    assert lm.meta["int8"] is check["int8_keeps_quality"]
    card = (out / "README.md").read_text()
    assert f"rnnserve train lm --out {out} --epochs 2 --train-file {SHAKESPEARE} --limit-chars 20000" in card
    assert "| validation loss (nats per character) |" in card and "| tokenizer | characters (65) |" in card


def test_training_resumes_from_its_checkpoint(tmp_path):
    cfg = LMTrainConfig(train_file=SHAKESPEARE, out=str(tmp_path / "lm"), epochs=3, limit_chars=20000, hidden_size=32,
                        embed_dim=16, batch_size=8, seq_len=32, warmup_steps=5, threads=1, max_minutes=0.0)
    first = train_lm(cfg)  # the time budget stops it within the first epoch
    # the checkpoint lies next to the folder: the folder, which is archived and deployed, holds the model only
    assert len(first["history"]) == 1 and (tmp_path / "lm.train_state.pt").exists()
    assert {p.name for p in (tmp_path / "lm").iterdir()} == {"config.json", "tokenizer.json", "model.safetensors",
                                                             "metrics.json", "loss.png", "README.md"}
    cfg.resume, cfg.max_minutes = True, 10.0
    second = train_lm(cfg)
    assert [h["epoch"] for h in second["history"]] == [1, 2, 3]
    assert second["history"][0] == first["history"][0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm"]  # finished: no checkpoint left to resume


def test_evaluate_prints_loss_perplexity_and_bits_per_char(tmp_path, capsys):
    out = tmp_path / "lm"
    main(["train", "lm", "--out", str(out), "--epochs", "1", *TINY_LM])
    capsys.readouterr()
    text = tmp_path / "t.txt"
    text.write_text("ROMEO:\nWhat light through yonder window breaks?\n" * 20)
    assert main(["evaluate", str(out), "--text-file", str(text)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert r["bits_per_char"] == pytest.approx(r["loss"] / math.log(2))
    assert r["characters"] == len(text.read_text())


def test_train_and_evaluate_translation(tmp_path, capsys):
    out = tmp_path / "tr"
    assert main(["train", "translation", "--train-src", str(RAW / "val.de.gz"), "--train-tgt", str(RAW / "val.en.gz"),
                 "--out", str(out), "--epochs", "1", "--limit-sentences", "400", "--src-vocab", "400",
                 "--tgt-vocab", "400", "--embed-dim", "16", "--enc-hidden", "16", "--dec-hidden", "24",
                 "--attn-dim", "8", "--batch-size", "64", "--threads", "1"]) == 0
    capsys.readouterr()
    tr = load_translation(out)
    assert tr.model.config.cell == "gru" and tr.src.pieces([0, 1, 2, 3]) == ["<pad>", "<unk>", "<s>", "</s>"]
    src, ref = tmp_path / "src.de", tmp_path / "ref.en"
    src.write_text("Zwei Hunde spielen im Schnee.\nEin Mann.\n")
    ref.write_text("Two dogs play in the snow.\nA man.\n")
    assert main(["evaluate", str(out), "--src-file", str(src), "--ref-file", str(ref), "--beam-size", "2"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["sentences"] == 2 and 0 <= r["bleu"] <= 100 and r["beam_size"] == 2 and r["seconds"] > 0
    assert r["bleu_signature"] == "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"
    assert 0 <= r["bleu_lowercased_tokenized"] <= 100 and 0 <= r["chrf"] <= 100


def test_mismatched_files_are_refused(tmp_path, tiny_translation_folder):
    src, ref = tmp_path / "a", tmp_path / "b"
    src.write_text("a\nb\n")
    ref.write_text("a\n")
    r = subprocess.run([sys.executable, "-m", "rnnserve.cli", "evaluate", str(tiny_translation_folder),
                        "--src-file", str(src), "--ref-file", str(ref)], capture_output=True, text=True)
    assert r.returncode == 1 and "has 2 lines but" in r.stderr


def test_epoch_tracker_keeps_the_best_weights_stops_on_patience_and_resumes(tmp_path):
    import torch

    from rnnserve.training.loop import EpochTracker

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    t = EpochTracker(tmp_path / "state.pt", patience=2, higher_is_better=True)  # a BLEU: higher is better
    stops = []
    for epoch, (score, weight) in enumerate([(10.0, 1.0), (12.0, 2.0), (11.0, 3.0), (12.0, 4.0)]):
        with torch.no_grad():
            model.weight.fill_(weight)
        stops.append(t.end_epoch(epoch, model, opt, score, {"epoch": epoch + 1, "bleu": score}))
    assert stops == [False, False, False, True]  # 12.0 again is no improvement
    assert t.best == 12.0 and t.best_state["weight"].eq(2.0).all()
    again = EpochTracker(tmp_path / "state.pt", patience=2, higher_is_better=True)
    again.resume(torch.nn.Linear(2, 1), torch.optim.SGD(model.parameters(), lr=0.1))
    assert (again.start_epoch, again.best, again.bad_epochs) == (4, 12.0, 2)
    assert [h["bleu"] for h in again.history] == [10.0, 12.0, 11.0, 12.0]
    assert EpochTracker(tmp_path / "other.pt", patience=1).best == float("inf")  # a loss: lower is better


def test_a_vocabulary_too_small_for_the_text_is_a_clear_error_before_training(tmp_path, capsys):
    out = tmp_path / "tr"
    args = ["train", "translation", "--train-src", str(RAW / "val.de.gz"), "--train-tgt", str(RAW / "val.en.gz"),
            "--out", str(out), "--limit-sentences", "400", "--threads", "1"]
    assert main([*args, "--src-vocab", "300", "--tgt-vocab", "400"]) == 2
    err = capsys.readouterr().err
    assert err == ("rnnserve train: error: --src-vocab 300 is too small for the training source sentences: they need "
                   "at least 322 pieces (each of their characters, 256 byte pieces and the special tokens); give "
                   "--src-vocab 322 or more\n")
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing trained, nothing written
    # the size it names is enough
    from rnnserve.training.corpus import read_parallel
    from rnnserve.training.translation import learn_vocabulary

    pairs = read_parallel(RAW / "val.de.gz", RAW / "val.en.gz")
    assert learn_vocabulary(pairs.src[:400], 322, "unigram", "--src-vocab", "source").vocab_size == 322
    text = tmp_path / "t.txt"
    text.write_text("".join(f"{line}\n" for line in pairs.src[:400]))
    assert main(["train", "lm", "--train-file", str(text), "--tokenizer", "subword", "--vocab-size", "100",
                 "--out", str(tmp_path / "lm")]) == 2
    assert capsys.readouterr().err.startswith(f"rnnserve train: error: --vocab-size 100 is too small for {text}: its "
                                              f"text needs at least ")


def test_help_shows_each_default_once_and_no_empty_one(capsys):
    with pytest.raises(SystemExit):
        main(["train", "lm", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: )" not in text and text.count("(default: the folder's name)") == 1
    assert "(default: 0.1)" in text


def test_the_lm_log_and_bar_count_the_same_steps(tmp_path, caplog, capsys):
    import logging

    caplog.set_level(logging.INFO, logger="rnnserve.training.lm")
    main(["train", "lm", "--out", str(tmp_path / "lm"), "--epochs", "1", *TINY_LM])
    # 20,000 training characters in 8 streams of 2,500: 78 windows of 32, one of them kept for the random shift
    assert "77 steps/epoch" in caplog.text
    assert " 77/77 " in capsys.readouterr().err


def test_a_name_that_cannot_be_served_stops_the_run_before_training(tmp_path, capsys):
    assert main(["train", "lm", "--out", str(tmp_path / "lm"), "--name", "my model", *TINY_LM]) == 2
    assert capsys.readouterr().err == ("rnnserve train: error: --name: the served name 'my model' must be letters, "
                                       "digits, '_', '-' and '.', starting with a letter or digit\n")
    assert not (tmp_path / "lm").exists()
