"""Train a recurrent language model on any text with truncated BPTT: characters, or SentencePiece
subwords for word-level text (lines end with `<eos>`).

The training text is cut into `batch_size` parallel streams; each step feeds the next `seq_len`
characters of every stream and carries the (detached) hidden state into the next window, so the
model sees context longer than one window while gradients flow through `seq_len` steps only.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rnnserve.models.folder import name_problem, save_lm
from rnnserve.models.lm import LMConfig, RNNLanguageModel, detach_state
from rnnserve.subword import SubwordLMTokenizer, VocabularyTooSmall
from rnnserve.tokenizer import CharTokenizer
from rnnserve.training.card import article, command_line, write_card
from rnnserve.training.corpus import DataError, read_text
from rnnserve.training.loop import (EpochTracker, ProgressBar, checkpoint_path, cosine_lr, opt, seed_everything,
                                    write_metrics)

log = logging.getLogger(__name__)


@dataclass
class LMTrainConfig:
    train_file: str = opt("", "training text (UTF-8; .gz read too)")
    valid_file: str = opt("", "validation text (default: the last --valid-share of the training text)")
    valid_share: float = opt(0.1, "share of the training text, from its end, held out when no --valid-file is given")
    tokenizer: str = opt("char", "char: one token per character; subword: SentencePiece pieces learnt from the "
                                 "training text, for word-level text")
    vocab_size: int = opt(8000, "--tokenizer subword: vocabulary size")
    data_terms: str = opt("", "the data's origin and terms of use, copied into the model card")
    out: str = opt("", "model folder to write, e.g. models/lm-mytext")
    name: str = opt("", "model name as served (default: the folder's name)")
    cell: str = opt("lstm", "recurrent cell: lstm, gru or rnn")
    embed_dim: int = opt(128, "embedding size")
    hidden_size: int = opt(512, "hidden units per layer")
    num_layers: int = opt(2, "stacked recurrent layers")
    dropout: float = opt(0.25, "dropout between layers and before the output layer")
    residual: bool = opt(False, "add each layer's input to its output (layers after the first)")
    tie_weights: bool = opt(False, "share the embedding and output matrices (needs embed-dim = hidden-size)")
    batch_size: int = opt(64, "parallel text streams per step")
    seq_len: int = opt(128, "tokens per truncated-BPTT window")
    lr: float = opt(3e-3, "peak learning rate (AdamW)")
    min_lr: float = opt(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = opt(100, "steps of linear learning-rate warm-up")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    clip: float = opt(1.0, "gradient-norm clipping threshold")
    epochs: int = opt(10, "passes over the training text")
    max_minutes: float = opt(60.0, "minutes from the first step (validations included) after which the "
                                    "epoch under way is cut; its validation and writing the folder come on top")
    patience: int = opt(3, "epochs without validation improvement before stopping")
    eval_every: int = opt(0, "steps between validations (0: once per epoch)")
    seed: int = opt(1337, "random seed (initialisation, batching, dropout)")
    threads: int = opt(0, "torch threads (0: torch's default)")
    limit_chars: int = opt(0, "train on this many characters of the text only (0: all; for smoke runs)")
    resume: bool = opt(False, "continue from the checkpoint next to the folder (<out>.train_state.pt)")
    extra: dict = field(default_factory=dict)


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N,) -> (B, N // B): B contiguous streams of the text, one per batch row."""
    n = ids.numel() // batch_size
    return ids[: n * batch_size].view(batch_size, n)


@torch.no_grad()
def evaluate_lm(model: RNNLanguageModel, ids: torch.Tensor, batch_size: int = 32, seq_len: int = 256) -> float:
    """Mean cross-entropy (nats per character) over the whole text, state carried across windows."""
    model.eval()
    data = batchify(ids, batch_size)
    state = None
    total, count = 0.0, 0
    for i in range(0, data.size(1) - 1, seq_len):
        x = data[:, i: i + seq_len]
        y = data[:, i + 1: i + 1 + seq_len]
        x = x[:, : y.size(1)]
        _, loss, state = model(x, state, y)
        total += loss.item() * y.numel()
        count += y.numel()
    return total / max(count, 1)


def load_texts(cfg: LMTrainConfig) -> tuple[str, str, list[tuple[str, str]]]:
    """Training and validation text, checked (DataError) before anything trains; and the card's data rows."""
    if not cfg.train_file:
        raise DataError("give --train-file, the text to train on")
    if cfg.tokenizer not in ("char", "subword"):
        raise DataError(f"--tokenizer must be char or subword, not {cfg.tokenizer!r}")
    text = read_text(cfg.train_file)
    if cfg.valid_file:
        train_text, val_text = text, read_text(cfg.valid_file)
        rows = [("train", f"{cfg.train_file}: {len(train_text):,} characters"),
                ("validation", f"{cfg.valid_file}: {len(val_text):,} characters")]
    else:
        cut = int(len(text) * (1 - cfg.valid_share))
        train_text, val_text = text[:cut], text[cut:]
        rows = [("train", f"{cfg.train_file}: the first {len(train_text):,} characters"),
                ("validation", f"{cfg.train_file}: the last {len(val_text):,} characters")]
    if len(train_text) < 2 or len(val_text) < 2:
        raise DataError(f"{cfg.train_file}: too little text to train and validate on ({len(text)} characters)")
    return train_text, val_text, rows


def train_lm(cfg: LMTrainConfig) -> dict:
    train_text, val_text, data_rows = load_texts(cfg)  # every data problem stops here
    if not cfg.out:
        raise DataError("give --out, the model folder to write (e.g. models/lm-mytext)")
    name = cfg.name or Path(cfg.out).name
    if name_problem(name):
        raise DataError(f"--name: {name_problem(name)}")
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    chars = CharTokenizer.from_text(train_text + val_text)  # every character of the given text
    if cfg.limit_chars:
        train_text, val_text = train_text[: cfg.limit_chars], val_text[: max(cfg.limit_chars // 10, 2048)]
    if cfg.tokenizer == "subword":
        try:
            tokenizer = SubwordLMTokenizer.train(train_text, cfg.vocab_size)
        except VocabularyTooSmall as e:
            raise DataError(f"--vocab-size {cfg.vocab_size} is too small for {cfg.train_file}: its text needs at "
                            f"least {e.minimum} pieces (each of its characters, 256 byte pieces and the special "
                            f"tokens); give --vocab-size {e.minimum} or more") from None
        kind = f"SentencePiece unigram, {tokenizer.vocab_size} pieces, lines ended by <eos>"
    else:
        tokenizer = chars
        kind = f"characters ({tokenizer.vocab_size})"
    train_ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    val_ids = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)
    chars_per_token = len(val_text) / max(1, len(val_ids))

    model_cfg = LMConfig(vocab_size=tokenizer.vocab_size, cell=cfg.cell, embed_dim=cfg.embed_dim,
                         hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, dropout=cfg.dropout,
                         residual=cfg.residual, tie_weights=cfg.tie_weights)
    model = RNNLanguageModel(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    data = batchify(train_ids, cfg.batch_size)
    # windows per epoch: each epoch starts at a random shift below seq_len, so one window's room is kept for it
    steps_per_epoch = (data.size(1) - 1) // cfg.seq_len - 1
    if steps_per_epoch < 1:
        raise DataError(f"{cfg.train_file}: too little training text for --batch-size {cfg.batch_size} x --seq-len "
                        f"{cfg.seq_len}: it makes {train_ids.numel():,} tokens, and a step needs "
                        f"{cfg.batch_size * (2 * cfg.seq_len + 1):,}; lower --batch-size or --seq-len")
    total_steps = steps_per_epoch * cfg.epochs
    out = Path(cfg.out)
    ckpt_path = checkpoint_path(out)
    tracker = EpochTracker(ckpt_path, cfg.patience)
    if cfg.resume and ckpt_path.exists():
        tracker.resume(model, opt)
        log.info("resumed from %s at epoch %d", ckpt_path, tracker.start_epoch)

    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.2fM parameters, %d steps/epoch", model_cfg, n_params / 1e6, steps_per_epoch)
    t0 = time.monotonic()
    out_of_time = False
    for epoch in range(tracker.start_epoch, cfg.epochs):
        model.train()
        state = None
        # a random shift per epoch so windows do not always start at the same characters
        shift = int(torch.randint(0, cfg.seq_len, (1,)))
        bar = ProgressBar(steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}")
        run_loss, n = 0.0, 0
        for s in range(steps_per_epoch):
            i = shift + s * cfg.seq_len
            x = data[:, i: i + cfg.seq_len]
            y = data[:, i + 1: i + 1 + cfg.seq_len]
            if y.size(1) < x.size(1):
                break
            step = epoch * steps_per_epoch + s
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, total_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
            state = detach_state(state) if state is not None else None
            _, loss, state = model(x, state, y)
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
        val = evaluate_lm(model, val_ids)
        record = {"epoch": epoch + 1, "train_loss": run_loss / max(n, 1), "val_loss": val,
                  "val_perplexity": math.exp(val), "minutes": (time.monotonic() - t0) / 60}
        log.info("epoch %d: train %.4f val %.4f (%.1f min)", epoch + 1, record["train_loss"], val, record["minutes"])
        if tracker.end_epoch(epoch, model, opt, val, record) or out_of_time:
            break

    model.load_state_dict(tracker.best_state)
    best_val = tracker.best
    minutes = (time.monotonic() - t0) / 60
    bits_per_char = best_val / chars_per_token / math.log(2)
    metrics = {"name": name, "best_val_loss": best_val, "best_val_perplexity": math.exp(best_val),
               "best_val_bits_per_char": bits_per_char, "tokenizer": cfg.tokenizer, "parameters": n_params,
               "train_minutes": minutes, "history": tracker.history, "train_config": asdict(cfg)}
    save_lm(out, model, tokenizer, meta={"name": name})
    if cfg.cell == "lstm":  # served in int8 (exact and faster) where it keeps the quality
        metrics["int8"] = mark_int8(out, val_ids)
    write_metrics(out, metrics)
    unit = "character" if cfg.tokenizer == "char" else "token"
    write_card(out, name=name, task="lm",
               summary=f"{article(cfg.cell)} {cfg.cell.upper()} language model served by rnnserve.",
               languages=None, data=data_rows, terms=cfg.data_terms, command=command_line(),
               metrics={f"validation loss (nats per {unit})": best_val,
                        f"validation perplexity (per {unit})": math.exp(best_val),
                        "validation bits per character": bits_per_char, "parameters": n_params},
               minutes=minutes, architecture={"cell": cfg.cell, "layers": cfg.num_layers,
                                              "hidden": cfg.hidden_size, "embeddings": cfg.embed_dim},
               tokenizer=kind,
               usage=f"Put this folder under `models/` and run `make serve`, or try it without a server: "
                     f"`rnnserve generate {out} --prompt 'Some text'`.")
    if not out_of_time:  # a run stopped by --max-minutes keeps its checkpoint for --resume
        ckpt_path.unlink(missing_ok=True)
    return metrics


INT8_CHECK_TOKENS = 32_768  # validation tokens read step by step for the int8 check (a few seconds)


def mark_int8(folder: Path, val_ids: torch.Tensor) -> dict:
    """Read the validation text through the saved model's fp32 and int8 decode steps (what serving loads)
    and write `"int8": true` into its config.json when int8 costs at most INT8_MAX_DELTA nats per token."""
    import json

    from rnnserve.models.folder import CONFIG_FILE, load_lm
    from rnnserve.training.evaluate import int8_check

    ids = val_ids[:INT8_CHECK_TOKENS]
    result = int8_check(load_lm(folder).model, ids, max(1, min(32, (len(ids) - 1) // 256)))
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["int8"] = result["int8_keeps_quality"]
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1, ensure_ascii=False))
    log.info("int8 decode step: %+.5f nats per token against fp32: %s", result["int8_delta"],
             "served in int8" if config["int8"] else "served in fp32")
    return result
