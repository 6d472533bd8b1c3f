"""Recurrent language model: embedding -> stacked RNN/LSTM/GRU layers -> projection.

Each layer is its own single-layer torch module (fused kernels) so that dropout and optional
residual connections can sit between layers. The recurrent state is a list with one entry per
layer: an `(h, c)` pair for LSTM, a single `h` for RNN/GRU, each of shape (1, B, H).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

LayerState = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
State = list[LayerState]

RNN_TYPES = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


@dataclass
class LMConfig:
    vocab_size: int
    cell: str = "lstm"  # rnn | lstm | gru
    embed_dim: int = 256
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float = 0.2
    residual: bool = False  # add each layer's input to its output (layers after the first)
    tie_weights: bool = False  # needs embed_dim == hidden_size

    def __post_init__(self) -> None:
        if self.cell not in RNN_TYPES:
            raise ValueError(f"cell must be one of {sorted(RNN_TYPES)}, got {self.cell!r}")
        if self.tie_weights and self.embed_dim != self.hidden_size:
            raise ValueError("tie_weights needs embed_dim == hidden_size")

    def to_dict(self) -> dict:
        return asdict(self)


class RNNLanguageModel(nn.Module):
    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim)
        rnn_cls = RNN_TYPES[config.cell]
        self.layers = nn.ModuleList(
            rnn_cls(config.embed_dim if i == 0 else config.hidden_size, config.hidden_size, batch_first=True)
            for i in range(config.num_layers)
        )
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        if config.tie_weights:
            self.head.weight = self.embed.weight

    def init_state(self, batch_size: int, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> State:
        def zeros() -> torch.Tensor:
            return torch.zeros(1, batch_size, self.config.hidden_size, device=device, dtype=dtype)

        if self.config.cell == "lstm":
            return [(zeros(), zeros()) for _ in self.layers]
        return [zeros() for _ in self.layers]

    def forward(self, idx: torch.Tensor, state: State | None = None,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, State]:
        """idx (B, T) token ids -> logits (B, T, V), mean cross-entropy over all steps, new state."""
        x = self.drop(self.embed(idx))  # (B, T, E)
        if state is None:
            state = self.init_state(idx.size(0), idx.device, x.dtype)
        new_state: State = []
        for i, layer in enumerate(self.layers):
            out, s = layer(x, state[i])  # (B, T, H)
            out = self.drop(out)
            x = out + x if (self.config.residual and i > 0) else out
            new_state.append(s)
        logits = self.head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss, new_state


    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], initial: State | None = None,
                every_position: bool = False) -> tuple[torch.Tensor, State]:
        """Prompts of different lengths as one packed batch -> next-token logits (B, V), final state.

        Packing runs each prompt's recurrence only over its own tokens, so every row ends in the state
        it would have alone, in one call per layer instead of one per prompt. `initial` continues each
        row from a state instead of zeros; `every_position` returns the logits after every token,
        (B, T, V), right-padded (scoring).
        """
        device = self.embed.weight.device
        lengths = torch.tensor([len(p) for p in prompts])
        idx = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            idx[i, : len(p)] = torch.tensor(p, device=device)
        x = self.drop(self.embed(idx))  # (B, T, E)
        state: State = []
        for i, layer in enumerate(self.layers):
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, s = layer(packed, initial[i] if initial is not None else None)  # s: in the prompts' order
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=idx.size(1))
            out = self.drop(out)
            x = out + x if (self.config.residual and i > 0) else out
            state.append(s)
        if every_position:
            return self.head(x), state
        last = x[torch.arange(len(prompts), device=device), (lengths - 1).to(device)]  # (B, H)
        return self.head(last), state


def detach_state(state: State) -> State:
    """Cut the graph between truncated-BPTT windows while carrying the values over."""
    return [tuple(t.detach() for t in s) if isinstance(s, tuple) else s.detach() for s in state]


def select_rows(state: State, index: torch.Tensor) -> State:
    """Keep the batch rows named by `index` (dim 1 of every (1, B, H) tensor)."""
    return [tuple(t.index_select(1, index) for t in s) if isinstance(s, tuple) else s.index_select(1, index)
            for s in state]


def concat_rows(a: State, b: State) -> State:
    """Append the rows of state `b` after those of state `a`."""
    return [tuple(torch.cat(pair, 1) for pair in zip(sa, sb)) if isinstance(sa, tuple) else torch.cat([sa, sb], 1)
            for sa, sb in zip(a, b)]
