"""One decode step of a trained language model, in the form serving wants.

Training keeps torch's recurrent modules, whose kernels are built for whole sequences. One decode
step through them is an embedding lookup and two GEMMs per layer, each call with a fixed cost that
dominates small batches on CPU. For LSTM, `LSTMStep` folds the weights once, at load:
- layer 0's input projection and both biases into a (vocab, 4H) table, so the embedding lookup
  replaces that GEMM (while the table stays small);
- each other layer's input and hidden weights into one (in + H, 4H) matrix: one GEMM per layer;
- the gate order (i, f, g, o) into (i, f, o, g), so one sigmoid covers three gates.
The result equals the modules' up to float rounding (tests/unit/test_decode.py). `LSTMStep` folds
the weights when built: rebuild it after changing them. Other cells step through the modules.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from rnnserve.models.lm import RNNLanguageModel, State

# (tokens (B,) long, state) -> (next-token logits (B, V), new state); the state keeps the model's format
StepFn = Callable[[torch.Tensor, State], tuple[torch.Tensor, State]]

MAX_TABLE_BYTES = 64 * 2**20  # a word-level vocabulary would make layer 0's table too large to keep


def _ifog(w: torch.Tensor) -> torch.Tensor:
    """Reorder torch's LSTM gate blocks (i, f, g, o) along dim 0 into (i, f, o, g)."""
    i, f, g, o = w.chunk(4, 0)
    return torch.cat([i, f, o, g], 0)


class LSTMStep:
    def __init__(self, model: RNNLanguageModel, max_table_bytes: int = MAX_TABLE_BYTES) -> None:
        cfg = model.config
        self.hidden = cfg.hidden_size
        self.residual = cfg.residual
        self.embed = model.embed.weight.detach()
        first = model.layers[0]
        w_ih0 = _ifog(first.weight_ih_l0.detach())
        self.bias0 = _ifog((first.bias_ih_l0 + first.bias_hh_l0).detach())
        table_bytes = cfg.vocab_size * w_ih0.size(0) * w_ih0.element_size()
        self.table = (torch.addmm(self.bias0, self.embed, w_ih0.t()).contiguous()
                      if table_bytes <= max_table_bytes else None)
        self.w_ih0 = w_ih0.t().contiguous() if self.table is None else None
        self.w_hh0 = _ifog(first.weight_hh_l0.detach()).t().contiguous()
        # layers after the first: gates = [x, h] @ w + b, one GEMM
        self.w = [_ifog(torch.cat([m.weight_ih_l0, m.weight_hh_l0], 1).detach()).t().contiguous()
                  for m in model.layers[1:]]
        self.b = [_ifog((m.bias_ih_l0 + m.bias_hh_l0).detach()) for m in model.layers[1:]]
        self.head_w = model.head.weight.detach().t().contiguous()
        self.head_b = model.head.bias.detach()

    def _cell(self, gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        H = self.hidden
        s = gates[:, : 3 * H].sigmoid()
        c = torch.addcmul(s[:, H: 2 * H] * c, s[:, :H], gates[:, 3 * H:].tanh())
        return s[:, 2 * H:] * c.tanh(), c

    def __call__(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        (h, c) = state[0]
        if self.table is not None:
            x_part = self.table.index_select(0, tokens)
        else:
            x_part = torch.addmm(self.bias0, self.embed.index_select(0, tokens), self.w_ih0)
        x, c = self._cell(torch.addmm(x_part, h[0], self.w_hh0), c[0])
        new_state: State = [(x.unsqueeze(0), c.unsqueeze(0))]
        for (h, c), w, b in zip(state[1:], self.w, self.b, strict=True):
            out, c = self._cell(torch.addmm(b, torch.cat([x, h[0]], 1), w), c[0])
            new_state.append((out.unsqueeze(0), c.unsqueeze(0)))
            x = out + x if self.residual else out
        return torch.addmm(self.head_b, x, self.head_w), new_state


def _int8(w_t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A (in, out) fp32 weight and its bias, quantized per output channel to int8 and packed for
    fbgemm's dynamic linear (activations are quantized per call, accumulation is int32)."""
    w = w_t.t().contiguous().float()
    scale = (w.abs().amax(1) / 127.0).clamp(min=1e-8).double()
    with warnings.catch_warnings():  # torch marks quantized tensors deprecated; their kernels are what run
        warnings.simplefilter("ignore", UserWarning)
        q = torch.quantize_per_channel(w, scale, torch.zeros(w.size(0), dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, bias.float().contiguous())


class Int8LSTMStep(LSTMStep):
    """The folded step with its GEMMs in int8 (weights per output channel, activations per call):
    fbgemm's int8 kernels have about twice the arithmetic peak of fp32 on AVX2. Layer 0's input part
    stays a table lookup in fp32. CPU only. Quality is checked per model (`rnnserve evaluate --int8`)."""

    def __init__(self, model: RNNLanguageModel, max_table_bytes: int = MAX_TABLE_BYTES) -> None:
        super().__init__(model, max_table_bytes)
        H = self.hidden
        zero = torch.zeros(4 * H)
        self.q_hh0 = _int8(self.w_hh0, zero)
        self.q_ih0 = _int8(self.w_ih0, self.bias0) if self.table is None else None
        self.q = [_int8(w, b) for w, b in zip(self.w, self.b)]
        self.q_head = _int8(self.head_w, self.head_b)

    def __call__(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        linear = torch.ops.quantized.linear_dynamic
        (h, c) = state[0]
        if self.table is not None:
            x_part = self.table.index_select(0, tokens)
        else:
            x_part = linear(self.embed.index_select(0, tokens), self.q_ih0, True)
        x, c = self._cell(x_part + linear(h[0].contiguous(), self.q_hh0, True), c[0])
        new_state: State = [(x.unsqueeze(0), c.unsqueeze(0))]
        for (h, c), q in zip(state[1:], self.q, strict=True):
            out, c = self._cell(linear(torch.cat([x, h[0]], 1), q, True), c[0])
            new_state.append((out.unsqueeze(0), c.unsqueeze(0)))
            x = out + x if self.residual else out
        return linear(x.contiguous(), self.q_head, True), new_state


def module_step(model: RNNLanguageModel) -> StepFn:
    """A decode step through the model's own modules."""
    def step(tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        logits, _, state = model(tokens.unsqueeze(1), state)
        return logits[:, -1], state

    return step


def decode_step(model: RNNLanguageModel, int8: bool = False) -> StepFn:
    """The fastest decode step this model has: folded weights for LSTM (in int8 when asked, on CPU), the
    modules otherwise."""
    if model.config.cell != "lstm":
        return module_step(model)
    on_cpu = model.embed.weight.device.type == "cpu"
    return Int8LSTMStep(model) if int8 and on_cpu else LSTMStep(model)
