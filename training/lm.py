"""Train a character-level recurrent language model with truncated BPTT.

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

from rnnserve.models.folder import save_lm
from rnnserve.models.lm import LMConfig, RNNLanguageModel, detach_state
from rnnserve.tokenizer import CharTokenizer
from rnnserve.training.data import shakespeare_splits
from rnnserve.training.loop import EpochTracker, ProgressBar, cosine_lr, opt, seed_everything, write_metrics

log = logging.getLogger(__name__)


@dataclass
class LMTrainConfig:
    out: str = opt("models/lm-shakespeare", "model folder to write (weights, config, tokenizer, metrics, loss plot)")
    name: str = opt("lm-shakespeare", "model name, as served and listed by /v1/models")
    cell: str = opt("lstm", "recurrent cell: lstm, gru or rnn")
    embed_dim: int = opt(128, "embedding size")
    hidden_size: int = opt(512, "hidden units per layer")
    num_layers: int = opt(2, "stacked recurrent layers")
    dropout: float = opt(0.25, "dropout between layers and before the output layer")
    residual: bool = opt(False, "add each layer's input to its output (layers after the first)")
    tie_weights: bool = opt(False, "share the embedding and output matrices (needs embed-dim = hidden-size)")
    batch_size: int = opt(64, "parallel text streams per step")
    seq_len: int = opt(128, "characters per truncated-BPTT window")
    lr: float = opt(3e-3, "peak learning rate (AdamW)")
    min_lr: float = opt(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = opt(100, "steps of linear learning-rate warm-up")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    clip: float = opt(1.0, "gradient-norm clipping threshold")
    epochs: int = opt(10, "passes over the training text")
    max_minutes: float = opt(60.0, "stop after this many minutes, keeping the best epoch")
    patience: int = opt(3, "epochs without validation improvement before stopping")
    eval_every: int = opt(0, "steps between validations (0: once per epoch)")
    seed: int = opt(1337, "random seed (initialisation, batching, dropout)")
    threads: int = opt(0, "torch threads (0: torch's default)")
    limit_chars: int = opt(0, "train on this many characters only (0: all; for smoke runs)")
    resume: bool = opt(False, "continue from the folder's train_state.pt checkpoint")
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


def train_lm(cfg: LMTrainConfig) -> dict:
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_text, val_text = shakespeare_splits()
    tokenizer = CharTokenizer.from_text(train_text + val_text)
    if cfg.limit_chars:
        train_text, val_text = train_text[: cfg.limit_chars], val_text[: max(cfg.limit_chars // 10, 2048)]
    train_ids = torch.tensor(tokenizer.encode(train_text), dtype=torch.long)
    val_ids = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)

    model_cfg = LMConfig(vocab_size=tokenizer.vocab_size, cell=cfg.cell, embed_dim=cfg.embed_dim,
                         hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, dropout=cfg.dropout,
                         residual=cfg.residual, tie_weights=cfg.tie_weights)
    model = RNNLanguageModel(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    data = batchify(train_ids, cfg.batch_size)
    steps_per_epoch = (data.size(1) - 1) // cfg.seq_len
    total_steps = steps_per_epoch * cfg.epochs
    out = Path(cfg.out)
    ckpt_path = out / "train_state.pt"
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
        bar = ProgressBar(steps_per_epoch - 1, desc=f"epoch {epoch + 1}/{cfg.epochs}")
        run_loss, n = 0.0, 0
        for s in range(steps_per_epoch - 1):
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
    metrics = {"name": cfg.name, "best_val_loss": best_val, "best_val_perplexity": math.exp(best_val),
               "best_val_bits_per_char": best_val / math.log(2), "parameters": n_params,
               "train_minutes": (time.monotonic() - t0) / 60, "history": tracker.history, "train_config": asdict(cfg)}
    save_lm(out, model, tokenizer, meta={"name": cfg.name})
    write_metrics(out, metrics)
    if not out_of_time:  # a run stopped by --max-minutes keeps its checkpoint for --resume
        ckpt_path.unlink(missing_ok=True)
    return metrics
