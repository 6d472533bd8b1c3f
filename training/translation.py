"""Train an attention encoder-decoder on any pair of languages, from line-aligned files or a TSV.

Subword vocabularies (SentencePiece) are learnt from the training sentences, one per side, so
cased, raw text goes in and detokenized text comes out.

Teacher forcing with scheduled sampling (the share of gold previous tokens falls linearly from 1
to `tf_min`), label smoothing, gradient-norm clipping, Adam with warm-up and cosine decay, and the
best epoch by validation BLEU (greedy) kept.
"""
from __future__ import annotations

import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from rnnserve.models.folder import name_problem, save_translation
from rnnserve.offline import translate_ids
from rnnserve.models.seq2seq import BOS, EOS, PAD, Seq2Seq, Seq2SeqConfig
from rnnserve.subword import MODEL_TYPES, SubwordTokenizer, VocabularyTooSmall
from rnnserve.training.card import article, command_line, write_card
from rnnserve.training.corpus import MAX_CHARS, DataError, Parallel, hold_out, read_parallel, read_tsv
from rnnserve.training.loop import (EpochTracker, ProgressBar, checkpoint_path, cosine_lr, opt, seed_everything,
                                    write_metrics)

log = logging.getLogger(__name__)


@dataclass
class TranslationTrainConfig:
    train_src: str = opt("", "training source sentences, one per line (UTF-8, raw and cased; .gz read too)")
    train_tgt: str = opt("", "training target sentences, line-aligned with --train-src")
    train_tsv: str = opt("", "or: one tab-separated file holding both sides (see --src-column, --tgt-column)")
    src_column: int = opt(0, "--train-tsv/--valid-tsv: the source's column, numbered from 0")
    tgt_column: int = opt(1, "--train-tsv/--valid-tsv: the target's column, numbered from 0")
    valid_src: str = opt("", "validation source sentences (without a validation set, --valid-share is held out)")
    valid_tgt: str = opt("", "validation target sentences, line-aligned with --valid-src")
    valid_tsv: str = opt("", "or: a tab-separated validation file")
    valid_share: float = opt(0.05, "share of the training pairs held out for validation when none is given "
                                   "(seeded, at most 1,000 pairs)")
    src_lang: str = opt("", "source language code, e.g. de (shown by /v1/models and the model card)")
    tgt_lang: str = opt("", "target language code, e.g. en")
    max_chars: int = opt(MAX_CHARS, "pairs with a side longer than this many characters are dropped (and counted)")
    data_terms: str = opt("", "the data's origin and terms of use, copied into the model card")
    out: str = opt("", "model folder to write, e.g. models/translate-fr-en")
    name: str = opt("", "model name as served (default: the folder's name)")
    subword: str = opt("unigram", "SentencePiece model type: unigram or bpe")
    src_vocab: int = opt(8000, "source subword vocabulary size")
    tgt_vocab: int = opt(8000, "target subword vocabulary size")
    cell: str = opt("gru", "recurrent cell of encoder and decoder: gru or lstm")
    embed_dim: int = opt(256, "embedding size (source and target)")
    enc_hidden: int = opt(256, "hidden units per direction of the bidirectional encoder")
    dec_hidden: int = opt(512, "hidden units of the decoder")
    attn_dim: int = opt(256, "size of the additive attention's hidden layer")
    enc_layers: int = opt(2, "stacked encoder layers")
    dropout: float = opt(0.3, "dropout on embeddings and between layers")
    batch_size: int = opt(128, "sentence pairs per step")
    lr: float = opt(2e-3, "peak learning rate (Adam)")
    min_lr: float = opt(5e-5, "learning rate at the end of the cosine decay")
    warmup_steps: int = opt(200, "steps of linear learning-rate warm-up")
    label_smoothing: float = opt(0.1, "label smoothing of the cross-entropy")
    clip: float = opt(1.0, "gradient-norm clipping threshold")
    tf_min: float = opt(0.85, "teacher-forcing ratio reached at the last epoch (scheduled sampling)")
    epochs: int = opt(12, "passes over the training pairs")
    max_minutes: float = opt(85.0, "minutes from the first step (validations included) after which the "
                                    "epoch under way is cut; its validation and writing the folder come on top")
    patience: int = opt(4, "epochs without validation improvement before stopping")
    seed: int = opt(1234, "random seed (held-out split, initialisation, batching, dropout)")
    threads: int = opt(0, "torch threads (0: torch's default)")
    limit_sentences: int = opt(0, "train on this many pairs only (0: all; for smoke runs)")
    resume: bool = opt(False, "continue from the checkpoint next to the folder (<out>.train_state.pt)")
    extra: dict = field(default_factory=dict)


@dataclass
class TranslationData:
    train: Parallel
    valid: Parallel
    described: list[tuple[str, str]]  # (role, description) rows for the model card


def load_data(cfg: TranslationTrainConfig) -> TranslationData:
    """The training and validation pairs the options name, checked (DataError) before anything trains."""
    if bool(cfg.train_tsv) == bool(cfg.train_src or cfg.train_tgt):
        raise DataError("give either --train-src and --train-tgt, or --train-tsv")
    if not cfg.train_tsv and not (cfg.train_src and cfg.train_tgt):
        raise DataError("--train-src and --train-tgt go together")
    if cfg.train_tsv:
        train = read_tsv(cfg.train_tsv, cfg.src_column, cfg.tgt_column, cfg.max_chars)
    else:
        train = read_parallel(cfg.train_src, cfg.train_tgt, cfg.max_chars)
    if cfg.valid_src or cfg.valid_tgt:
        if not (cfg.valid_src and cfg.valid_tgt):
            raise DataError("--valid-src and --valid-tgt go together")
        valid = read_parallel(cfg.valid_src, cfg.valid_tgt, cfg.max_chars)
    elif cfg.valid_tsv:
        valid = read_tsv(cfg.valid_tsv, cfg.src_column, cfg.tgt_column, cfg.max_chars)
    else:
        train, valid = hold_out(train, cfg.valid_share, cfg.seed)
    if cfg.limit_sentences:
        train = Parallel(train.src[: cfg.limit_sentences], train.tgt[: cfg.limit_sentences], train.dropped,
                         train.origin)
        valid = Parallel(valid.src[:200], valid.tgt[:200], valid.dropped, valid.origin)
    if train.dropped:
        print(f"dropped {train.dropped} training pairs with an empty side or a side over {cfg.max_chars} characters",
              file=sys.stderr)
    described = [("train", f"{train.origin}: {len(train):,} pairs ({train.dropped:,} dropped: empty or over "
                           f"{cfg.max_chars} characters)"),
                 ("validation", f"{valid.origin}: {len(valid):,} pairs")]
    return TranslationData(train, valid, described)


def to_batch(pairs: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[(src ids, tgt ids)] -> src (B, S) padded, src lengths (B,), tgt (B, T) = <bos> .. <eos> padded."""
    S = max(len(s) for s, _ in pairs)
    T = max(len(t) for _, t in pairs) + 2
    src = torch.full((len(pairs), S), PAD, dtype=torch.long)
    tgt = torch.full((len(pairs), T), PAD, dtype=torch.long)
    for i, (s, t) in enumerate(pairs):
        src[i, : len(s)] = torch.tensor(s)
        tgt[i, : len(t) + 2] = torch.tensor([BOS, *t, EOS])
    return src, torch.tensor([len(s) for s, _ in pairs]), tgt


def batches(pairs: list, batch_size: int, shuffle: bool, rng: random.Random) -> list[list]:
    """Batches of similar source length (less padding), in random order when training."""
    order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][0]), rng.random() if shuffle else 0))
    chunks = [[pairs[i] for i in order[j: j + batch_size]] for j in range(0, len(order), batch_size)]
    if shuffle:
        rng.shuffle(chunks)
    return chunks


@torch.no_grad()
def evaluate_loss(model: Seq2Seq, pairs: list, batch_size: int = 256) -> float:
    model.eval()
    total, count = 0.0, 0
    for chunk in batches(pairs, batch_size, False, random.Random(0)):
        src, src_len, tgt = to_batch(chunk)
        logits, _ = model(src, src_len, tgt)
        n = int((tgt[:, 1:] != PAD).sum())
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt[:, 1:].reshape(-1), ignore_index=PAD,
                                 reduction="sum").item()
        count += n
    return total / count


def sacre_bleu(hyps: list[str], refs: list[str]) -> dict:
    """sacreBLEU's default BLEU (cased, 13a tokenization of detokenized text) with its signature, and chrF."""
    import sacrebleu

    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    b = bleu.corpus_score(hyps, [refs])
    return {"bleu": b.score, "bleu_signature": str(bleu.get_signature()), "chrf": chrf.corpus_score(hyps, [refs]).score,
            "chrf_signature": str(chrf.get_signature())}


def corpus_bleu(hyps: list[str], refs: list[str]) -> tuple[float, float]:
    """BLEU-4 and chrF with sacrebleu on already lowercased, tokenized text (no re-tokenization)."""
    import sacrebleu

    # force: the text is tokenized on purpose (as the references compute BLEU), so no warning about it
    bleu = sacrebleu.corpus_bleu(hyps, [refs], tokenize="none", lowercase=True, force=True).score
    chrf = sacrebleu.corpus_chrf(hyps, [refs]).score
    return bleu, chrf


def learn_vocabulary(lines: list[str], size: int, kind: str, option: str, side: str) -> SubwordTokenizer:
    """A side's SentencePiece vocabulary; a size too small for its text is bad data (DataError), before training."""
    if kind not in MODEL_TYPES:
        raise DataError(f"--subword must be one of {', '.join(MODEL_TYPES)}, not {kind!r}")
    try:
        return SubwordTokenizer.train(lines, size, kind)
    except VocabularyTooSmall as e:
        raise DataError(f"{option} {size} is too small for the training {side} sentences: they need at least "
                        f"{e.minimum} pieces (each of their characters, 256 byte pieces and the special tokens); "
                        f"give {option} {e.minimum} or more") from None


def train_translation(cfg: TranslationTrainConfig) -> dict:
    data = load_data(cfg)  # every data problem stops here, before anything is trained
    if not cfg.out:
        raise DataError("give --out, the model folder to write (e.g. models/translate-fr-en)")
    name = cfg.name or Path(cfg.out).name
    if name_problem(name):
        raise DataError(f"--name: {name_problem(name)}")
    seed_everything(cfg.seed)
    rng = random.Random(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_tok = time.monotonic()
    src_tok = learn_vocabulary(data.train.src, cfg.src_vocab, cfg.subword, "--src-vocab", "source")
    tgt_tok = learn_vocabulary(data.train.tgt, cfg.tgt_vocab, cfg.subword, "--tgt-vocab", "target")
    log.info("subword vocabularies: %d source, %d target pieces (%.1f s)", src_tok.vocab_size, tgt_tok.vocab_size,
             time.monotonic() - t_tok)
    train = [(src_tok.encode(s), tgt_tok.encode(t)) for s, t in zip(data.train.src, data.train.tgt)]
    val = [(src_tok.encode(s), tgt_tok.encode(t)) for s, t in zip(data.valid.src, data.valid.tgt)]
    val_refs = data.valid.tgt

    mcfg = Seq2SeqConfig(src_vocab=src_tok.vocab_size, tgt_vocab=tgt_tok.vocab_size, cell=cfg.cell,
                         embed_dim=cfg.embed_dim, enc_hidden=cfg.enc_hidden, dec_hidden=cfg.dec_hidden,
                         attn_dim=cfg.attn_dim, enc_layers=cfg.enc_layers, dropout=cfg.dropout)
    model = Seq2Seq(mcfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    out = Path(cfg.out)
    ckpt_path = checkpoint_path(out)
    tracker = EpochTracker(ckpt_path, cfg.patience, higher_is_better=True)  # by validation BLEU
    if cfg.resume and ckpt_path.exists():
        tracker.resume(model, opt)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.2fM parameters; vocab %d source %d target; %d steps/epoch", mcfg, n_params / 1e6,
             src_tok.vocab_size, tgt_tok.vocab_size, steps_per_epoch)
    t0 = time.monotonic()
    out_of_time = False
    for epoch in range(tracker.start_epoch, cfg.epochs):
        model.train()
        tf = 1.0 - (1.0 - cfg.tf_min) * (epoch / max(1, cfg.epochs - 1))
        bar = ProgressBar(steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs} tf {tf:.2f}")
        run_loss, n = 0.0, 0
        for s, chunk in enumerate(batches(train, cfg.batch_size, True, rng)):
            step = epoch * steps_per_epoch + s
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, total_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
            src, src_len, tgt = to_batch(chunk)
            logits, _ = model(src, src_len, tgt, teacher_forcing=tf)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt[:, 1:].reshape(-1), ignore_index=PAD,
                                   label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            run_loss += loss.item()
            n += 1
            bar.update(loss=run_loss / n, lr=opt.param_groups[0]["lr"])
            if (time.monotonic() - t0) / 60 > cfg.max_minutes:
                out_of_time = True
                break
        bar.close()
        val_loss = evaluate_loss(model, val)
        hyps = [tgt_tok.decode(h) for h in translate_ids(model, [s for s, _ in val])]
        scores = sacre_bleu(hyps, val_refs)
        bleu, chrf = scores["bleu"], scores["chrf"]
        record = {"epoch": epoch + 1, "train_loss": run_loss / max(n, 1), "val_loss": val_loss,
                  "val_perplexity": math.exp(val_loss), "val_bleu_greedy": bleu, "val_chrf_greedy": chrf,
                  "teacher_forcing": tf, "minutes": (time.monotonic() - t0) / 60}
        log.info("epoch %d: train %.3f val loss %.3f ppl %.2f BLEU %.2f (%.1f min)", epoch + 1,
                 record["train_loss"], val_loss, math.exp(val_loss), bleu, record["minutes"])
        if tracker.end_epoch(epoch, model, opt, bleu, record) or out_of_time:
            break
    model.load_state_dict(tracker.best_state)
    history = tracker.history
    best = max(history, key=lambda h: h["val_bleu_greedy"])
    minutes = (time.monotonic() - t0) / 60
    languages = {"source": cfg.src_lang or "source", "target": cfg.tgt_lang or "target"}
    metrics = {"name": name, "best_epoch": best["epoch"], "best_val_bleu_greedy": tracker.best,
               "best_val_chrf_greedy": best["val_chrf_greedy"], "best_val_loss": best["val_loss"],
               "best_val_perplexity": best["val_perplexity"], "parameters": n_params, "train_minutes": minutes,
               "train_pairs": len(train), "valid_pairs": len(val), "dropped_pairs": data.train.dropped,
               "history": history, "train_config": asdict(cfg)}
    save_translation(out, model, src_tok, tgt_tok, meta={"name": name, "languages": languages})
    write_metrics(out, metrics)
    write_card(out, name=name, task="translation",
               summary=f"{article(cfg.cell)} {cfg.cell.upper()} encoder-decoder with additive attention translating "
                       f"{languages['source']} to {languages['target']}, served by rnnserve.",
               languages=languages, data=data.described, terms=cfg.data_terms, command=command_line(),
               metrics={"validation BLEU, greedy (sacreBLEU, cased)": tracker.best,
                        "validation chrF, greedy": best["val_chrf_greedy"],
                        "validation perplexity (per subword)": best["val_perplexity"], "best epoch": best["epoch"],
                        "parameters": n_params},
               minutes=minutes, architecture={"cell": cfg.cell, "embeddings": cfg.embed_dim,
                                              "encoder": f"{cfg.enc_layers} x {cfg.enc_hidden} bidirectional",
                                              "decoder": cfg.dec_hidden, "attention": cfg.attn_dim},
               tokenizer=f"SentencePiece {cfg.subword}, {src_tok.vocab_size} source and {tgt_tok.vocab_size} "
                         f"target pieces",
               usage=f"Put this folder under `models/` and run `make serve`, or try it without a server: "
                     f"`echo 'A sentence.' | rnnserve translate {out}`. "
                     f"Score a test set with `rnnserve evaluate {out} --src-file F --ref-file F`.")
    if not out_of_time:  # a run stopped by --max-minutes keeps its checkpoint for --resume
        ckpt_path.unlink(missing_ok=True)
    return metrics
