"""Pieces shared by the training loops: seeding, schedule, progress, checkpoints, metrics and plots."""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


def opt(default, help: str):
    """A training-config field with its command-line help (rnnserve train builds one flag per field)."""
    return field(default=default, metadata={"help": help})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def cosine_lr(step: int, total: int, lr: float, min_lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay from `lr` to `min_lr` over the remaining steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


class ProgressBar:
    """A one-line progress bar with live loss on stderr (tqdm would add a dependency for this alone)."""

    def __init__(self, total: int, desc: str = "", every: float = 0.5) -> None:
        self.total, self.desc, self.every = max(total, 1), desc, every
        self.n, self.t0, self.last = 0, time.monotonic(), 0.0
        self.tty = sys.stderr.isatty()

    def update(self, **stats: float) -> None:
        self.n += 1
        now = time.monotonic()
        if now - self.last < (self.every if self.tty else 30.0) and self.n < self.total:
            return
        self.last = now
        rate = self.n / max(now - self.t0, 1e-9)
        eta = (self.total - self.n) / max(rate, 1e-9)
        done = int(30 * self.n / self.total)
        text = " ".join(f"{k} {v:.4g}" for k, v in stats.items())
        bar = "#" * done + "." * (30 - done)
        line = f"{self.desc} [{bar}] {self.n}/{self.total} {rate:.1f} it/s eta {eta:.0f}s {text}"
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def checkpoint_path(out: str | Path) -> Path:
    """The resumable checkpoint of a run writing the model folder `out`: next to the folder, never inside it,
    so that it is never archived or deployed with the model (models/lm-x -> models/lm-x.train_state.pt)."""
    out = Path(out)
    return out.parent / f"{out.name}.train_state.pt"


def save_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, **extra) -> None:
    """Resumable training state: tensors, numbers and dicts only, so it loads with weights_only=True."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "rng": torch.get_rng_state(), **extra}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    torch.set_rng_state(ck["rng"])
    return ck


@dataclass
class EpochTracker:
    """Epoch-end bookkeeping of both trainers: history, the best epoch's weights, patience, and the
    resumable checkpoint written after every epoch. The score is a validation loss (lower is better)
    or a BLEU (higher is better)."""
    path: Path
    patience: int
    higher_is_better: bool = False
    history: list[dict] = field(default_factory=list)
    best: float = math.nan
    best_state: dict | None = None
    bad_epochs: int = 0
    start_epoch: int = 0

    def __post_init__(self) -> None:
        if math.isnan(self.best):
            self.best = -math.inf if self.higher_is_better else math.inf

    def resume(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        ck = load_checkpoint(self.path, model, opt)
        self.history, self.best, self.start_epoch = ck["history"], ck["best_val"], ck["epoch"] + 1
        self.best_state, self.bad_epochs = ck.get("best_state"), ck.get("bad_epochs", 0)

    def end_epoch(self, epoch: int, model: torch.nn.Module, opt: torch.optim.Optimizer, score: float,
                  record: dict) -> bool:
        """Record the epoch, keep the weights if it is the best so far, checkpoint; True once the score
        has not improved for `patience` epochs."""
        self.history.append(record)
        if score > self.best if self.higher_is_better else score < self.best:
            self.best, self.bad_epochs = score, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.bad_epochs += 1
        save_checkpoint(self.path, model, opt, epoch=epoch, history=self.history, best_val=self.best,
                        best_state=self.best_state, bad_epochs=self.bad_epochs)
        return self.bad_epochs >= self.patience


def write_metrics(folder: Path, metrics: dict) -> None:
    """metrics.json and loss.png (train and validation loss per epoch) beside the model."""
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
    history = metrics.get("history", [])
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(metrics.get("name", ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=100)
    plt.close(fig)
