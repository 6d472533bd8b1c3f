"""The readable cells compute exactly what torch's fused modules compute, given the same weights."""
import pytest
import torch
import torch.nn as nn

from rnnserve.models.cells import CELLS, run_layer

FUSED = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


def init_state(cell, B, H):
    h = torch.randn(B, H)
    return (h, torch.randn(B, H)) if cell == "lstm" else h


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_stacked_layers_equal_torch(cell):
    torch.manual_seed(0)
    B, T, I, H, L = 3, 9, 5, 7, 2
    fused = FUSED[cell](I, H, num_layers=L, batch_first=True)
    x = torch.randn(B, T, I)
    states = [init_state(cell, B, H) for _ in range(L)]
    if cell == "lstm":
        h0 = (torch.stack([s[0] for s in states]), torch.stack([s[1] for s in states]))
    else:
        h0 = torch.stack(states)
    want, want_state = fused(x, h0)
    out = x
    finals = []
    for layer in range(L):
        c = CELLS[cell](I if layer == 0 else H, H).load_from(fused, layer)
        out, s = run_layer(c, out, states[layer])
        finals.append(s)
    assert (out - want).abs().max() < 1e-5
    got_h = torch.stack([s[0] if cell == "lstm" else s for s in finals])
    want_h = want_state[0] if cell == "lstm" else want_state
    assert (got_h - want_h).abs().max() < 1e-5
    if cell == "lstm":
        assert (torch.stack([s[1] for s in finals]) - want_state[1]).abs().max() < 1e-5


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_bidirectional_layer_equals_torch(cell):
    torch.manual_seed(1)
    B, T, I, H = 2, 6, 4, 5
    fused = FUSED[cell](I, H, batch_first=True, bidirectional=True)
    x = torch.randn(B, T, I)
    want, _ = fused(x)
    zeros = (torch.zeros(B, H), torch.zeros(B, H)) if cell == "lstm" else torch.zeros(B, H)
    fwd, _ = run_layer(CELLS[cell](I, H).load_from(fused, 0), x, zeros)
    bwd, _ = run_layer(CELLS[cell](I, H).load_from(fused, 0, "_reverse"), x, zeros, reverse=True)
    assert (torch.cat([fwd, bwd], -1) - want).abs().max() < 1e-5


def test_gradients_through_time_equal_torch():
    """Backpropagation through time in the unrolled loop gives torch's gradients."""
    torch.manual_seed(2)
    fused = nn.GRU(3, 4, batch_first=True)
    cell = CELLS["gru"](3, 4).load_from(fused)
    x = torch.randn(2, 8, 3)
    fused(x)[0].pow(2).sum().backward()
    run_layer(cell, x, torch.zeros(2, 4))[0].pow(2).sum().backward()
    assert (cell.weight_hh.grad - fused.weight_hh_l0.grad).abs().max() < 1e-5
    assert (cell.bias_ih.grad - fused.bias_ih_l0.grad).abs().max() < 1e-5


def test_lstm_gate_order_is_torchs():
    """Opening only the forget gate (2nd block) keeps the cell state: the order is i, f, g, o."""
    cell = CELLS["lstm"](1, 1)
    with torch.no_grad():
        for p in cell.parameters():
            p.zero_()
        cell.bias_ih[:] = torch.tensor([-100.0, 100.0, 0.0, 100.0])  # i closed, f open, o open
    h, c = cell(torch.zeros(1, 1), (torch.zeros(1, 1), torch.full((1, 1), 0.5)))
    assert c.item() == pytest.approx(0.5)
    assert h.item() == pytest.approx(torch.tanh(torch.tensor(0.5)).item())
