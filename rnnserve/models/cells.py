"""Recurrent cells written from their gate equations, readable and slow.

They document what torch's fused nn.RNN / nn.LSTM / nn.GRU compute (training and serving use the
fused modules) and tests check them against those modules with the same weights. Parameters use
torch's names and layout: weight_ih (G*H, I), weight_hh (G*H, H), bias_ih and bias_hh (G*H,), with
the gates stacked in torch's order: LSTM (i, f, g, o), GRU (r, z, n).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class _Cell(nn.Module):
    gates = 1

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        G = self.gates * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(G, input_size))
        self.weight_hh = nn.Parameter(torch.empty(G, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(G))
        self.bias_hh = nn.Parameter(torch.empty(G))
        bound = 1 / math.sqrt(hidden_size)  # torch's initialisation
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def load_from(self, module: nn.RNNBase, layer: int = 0, suffix: str = "") -> "_Cell":
        """Copy layer `layer` of a fused torch module (suffix "_reverse" for the backward direction)."""
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(self, name).data.copy_(getattr(module, f"{name}_l{layer}{suffix}").data)
        return self


class RNNCell(_Cell):
    """h' = tanh(W_ih x + b_ih + W_hh h + b_hh)"""

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.weight_ih.T + self.bias_ih + h @ self.weight_hh.T + self.bias_hh)


class LSTMCell(_Cell):
    """Gates from the input and the previous output; the cell state carries memory additively.

    i = sigma(W_ii x + b_ii + W_hi h + b_hi)    input gate: how much of the candidate to write
    f = sigma(W_if x + b_if + W_hf h + b_hf)    forget gate: how much of the old cell to keep
    g = tanh (W_ig x + b_ig + W_hg h + b_hg)    candidate cell content
    o = sigma(W_io x + b_io + W_ho h + b_ho)    output gate: how much of the cell to expose
    c' = f * c + i * g
    h' = o * tanh(c')
    """
    gates = 4

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        pre = x @ self.weight_ih.T + self.bias_ih + h @ self.weight_hh.T + self.bias_hh  # (B, 4H)
        i, f, g, o = pre.chunk(4, dim=-1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g
        return o * torch.tanh(c), c


class GRUCell(_Cell):
    """Two gates and no separate cell state.

    r = sigma(W_ir x + b_ir + W_hr h + b_hr)          reset gate: how much history feeds the candidate
    z = sigma(W_iz x + b_iz + W_hz h + b_hz)          update gate: how much of the old state to keep
    n = tanh (W_in x + b_in + r * (W_hn h + b_hn))    candidate (torch applies r after W_hn h + b_hn)
    h' = (1 - z) * n + z * h
    """
    gates = 3

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        xi = x @ self.weight_ih.T + self.bias_ih  # (B, 3H)
        hh = h @ self.weight_hh.T + self.bias_hh
        xr, xz, xn = xi.chunk(3, dim=-1)
        hr, hz, hn = hh.chunk(3, dim=-1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h


CELLS = {"rnn": RNNCell, "lstm": LSTMCell, "gru": GRUCell}


def run_layer(cell: _Cell, x: torch.Tensor, state, reverse: bool = False):
    """Unroll a cell over x (B, T, I) -> outputs (B, T, H), final state (backpropagation through time
    flows back through this loop)."""
    steps = range(x.size(1) - 1, -1, -1) if reverse else range(x.size(1))
    outs: list[torch.Tensor | None] = [None] * x.size(1)
    for t in steps:
        state = cell(x[:, t], state)
        outs[t] = state[0] if isinstance(state, tuple) else state
    return torch.stack(outs, 1), state  # type: ignore[arg-type]
