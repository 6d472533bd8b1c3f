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


def _pad_to(n: int, multiple: int = 8) -> int:
    """A GEMM dimension for cuBLAS's int8 kernels: a multiple of 8, and at least 32 (tiny models)."""
    return max(-(-n // multiple) * multiple, 32)


SMALL_BATCH = 8  # up to this many rows the CPU multiplies by the column-major copy of the weights
# fp32 holds every integer below 2^24 exactly, so a dot product of K int8 pairs (each at most 127 x 127 in size) is
# exact in fp32 in any order of summation while K x 127^2 < 2^24: K up to 1,040
EXACT_FP32_K = 2**24 // 127**2


def int8_gemm_native() -> bool:
    """Whether this CPU multiplies int8 matrices in int8 (AVX-512 VNNI, with which oneDNN runs torch._int_mm).
    Without it torch._int_mm takes a reference loop, 15-40x slower than an fp32 GEMM of the same shape on an AVX2
    machine (BENCHMARKS.md), and `Int8Linear` computes the same integers with fp32 GEMMs instead."""
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(probe()) if probe is not None else True


def int8_gemm_path(device: torch.device | str) -> str:
    """How the exact int8 steps multiply on `device`, for the logs."""
    if torch.device(device).type != "cpu" or int8_gemm_native():
        return "int8 GEMMs"
    return "fp32 GEMMs over the int8 values (no AVX-512 VNNI on this CPU)"


class Int8Linear:
    """x @ w + b with int8 weights (symmetric, per output channel) and an int8 activation whose scale is
    FIXED: `bound / 127`, where `bound` is what |x| cannot exceed (1 for an LSTM's hidden state, a known
    sum of them after residual connections, an embedding's largest entry). The product accumulates in
    int32 through `torch._int_mm` (exact: no rounding, no order to depend on), and the dequantization is
    element-wise, so a row's result depends on that row alone: the same bits whatever else is in the
    batch, and on any device. K and N are padded with zeros to multiples of 8 (cuBLAS's int8 GEMM needs
    them). On a CPU without int8 GEMM kernels the same integers come from fp32 GEMMs (`int8_gemm_native`)."""

    def __init__(self, w_t: torch.Tensor, bias: torch.Tensor, bound: float) -> None:
        K, N = w_t.shape
        w = w_t.float()
        w_scale = (w.abs().amax(0) / 127.0).clamp(min=1e-12)  # (N,)
        q = torch.round(w / w_scale).to(torch.int8)
        self.k, self.n, self.kp = K, N, _pad_to(K)
        self.in_scale = 127.0 / bound
        self.out_scale = (w_scale * (bound / 127.0)).float()  # (N,): per column, activation x weight scale
        self.bias = bias.detach().float().contiguous()
        # int8 kernels multiply the int8 weights (`_set_int8`); a CPU without them, the same weights as fp32 in row
        # blocks whose products are exact in fp32, and no int8 copy (`to` makes one for a GPU)
        self.w = self.w_cols = None
        self.w_float = None if int8_gemm_native() else [c.contiguous() for c in q.float().split(EXACT_FP32_K, 0)]
        if self.w_float is None:
            self._set_int8(q)

    def _set_int8(self, q: torch.Tensor) -> None:
        """The (K, N) int8 weights, padded to (Kp, Np), and the same column-major ((Np, Kp) stored): oneDNN's
        small-batch GEMM is 2-3x faster on those (each output a dot product over a contiguous row), and cuBLAS's
        int8 GEMM takes them as torchao does."""
        self.w = torch.nn.functional.pad(q, (0, _pad_to(self.n) - self.n, 0, self.kp - self.k)).contiguous()
        self.w_cols = self.w.t().contiguous().t()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, K) float with |x| <= bound -> (B, Kp) int8 (one rounding per element, so exact anywhere)."""
        q = torch.round(x.float() * self.in_scale).to(torch.int8)  # |x| <= bound: no clamp needed
        return q if self.k == self.kp else torch.nn.functional.pad(q, (0, self.kp - self.k))

    def acc(self, q: torch.Tensor) -> torch.Tensor:
        """(B, Kp) int8 -> (B, N) int32, exact."""
        B = q.size(0)
        if self.w_float is not None:
            return self._float_acc(q[:, : self.k].float()).to(torch.int32)
        if q.is_cuda and B <= 16:  # cuBLAS's int8 GEMM wants more than 16 rows: zero rows, cut after
            q = torch.nn.functional.pad(q, (0, 0, 0, 17 - B))
        # either layout gives the same integers; the choice only moves time
        out = torch._int_mm(q, self.w_cols if q.is_cuda or B <= SMALL_BATCH else self.w)
        return out[:B, : self.n]

    def _float_acc(self, q: torch.Tensor) -> torch.Tensor:
        """`acc` through fp32 GEMMs: q (B, K) holds int8 values as fp32. Each block's sums are integers below 2^24,
        exact in any order of summation; several blocks add in int32. So these are torch._int_mm's integers to the
        bit, in fp32 for one block (exactly) and in int32 for more."""
        if len(self.w_float) == 1:
            return torch.mm(q, self.w_float[0])
        out, start = None, 0
        for w in self.w_float:
            part = torch.mm(q[:, start: start + w.size(0)], w).to(torch.int32)
            out = part if out is None else out.add_(part)
            start += w.size(0)
        return out

    def __call__(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """x @ w + (add if given, else the bias); `add` (B, N) replaces the bias (a table row holding it)."""
        # addcmul with a broadcast (N,) operand iterates row by row: the same operations for every row
        # (the int32 products convert to float inside it, exactly: |products| < 2^24)
        if self.w_float is not None:  # the same integers, as fp32 (no int8 kernels on this CPU)
            acc = self._float_acc(torch.round(x.float() * self.in_scale))
        else:
            acc = self.acc(self.quantize(x))
        return torch.addcmul(self.bias if add is None else add, acc, self.out_scale)

    def to(self, device: torch.device) -> Int8Linear:
        self.out_scale, self.bias = self.out_scale.to(device), self.bias.to(device)
        if self.w_float is not None and torch.device(device).type == "cpu":
            self.w_float = [w.to(device) for w in self.w_float]
            return self
        # int8 weights on the device; a GPU multiplies int8 in int8, so fp32 ones become int8 (integers held exactly)
        q = self.w[: self.k, : self.n] if self.w_float is None else torch.cat(self.w_float).to(torch.int8)
        self.w_float = None
        self._set_int8(q.to(device))
        return self


class Int8LSTMStep(LSTMStep):
    """The folded step with its GEMMs in int8 at fixed activation scales (`Int8Linear`): exact integer
    products, so a row's logits and state are the same bits alone or in any batch (with one intra-op
    thread: several threads split element-wise loops at points that move with the batch size). Weights
    per output channel. Layer 0's input part stays a table lookup in fp32 while the table is small.
    The activation bounds come from the model's shape and weights at load: a hidden state is in [-1, 1]; a
    residual stack's input to layer i sums i of them; the embedding's rows are bounded by its largest
    entry. Quality is checked per model (`rnnserve evaluate --int8`)."""

    def __init__(self, model: RNNLanguageModel, max_table_bytes: int = MAX_TABLE_BYTES) -> None:
        super().__init__(model, max_table_bytes)
        H = self.hidden
        if self.table is None:  # layer 0 as one GEMM over [embedding, h]
            bound = max(1.0, float(self.embed.abs().max()))
            self.q0 = Int8Linear(torch.cat([self.w_ih0, self.w_hh0], 0), self.bias0, bound)
        else:
            self.q0 = Int8Linear(self.w_hh0, torch.zeros(4 * H), 1.0)
        # layer i >= 1 reads [x, h]: x is layer i-1's output, plus i-1 earlier ones with residual connections
        self.q = [Int8Linear(w, b, float(i) if self.residual else 1.0)
                  for i, (w, b) in enumerate(zip(self.w, self.b), 1)]
        top = float(len(self.w) + 1) if self.residual and self.w else 1.0
        self.q_head = Int8Linear(self.head_w, self.head_b, top)
        if self.table is not None:  # fp32 even for a half-precision model: added to fp32 products
            self.table = self.table.float()
        device = self.embed.device
        for lin in [self.q0, *self.q, self.q_head]:
            lin.to(device)
        # the fp32 weights are not used by this step
        self.w_ih0 = self.w_hh0 = self.head_w = None  # type: ignore[assignment]
        self.w = []

    def _cell8(self, gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`_cell`, in place over the gates (B, 4H), whose blocks (i, f, o, g) end as (c_new, tanh(c_new), o, h): no
        other buffer per call. Every element-wise op runs on row-strided views, which torch iterates row by row,
        so no row's result depends on where the batch's vectorised loop ends."""
        H = self.hidden
        s = gates[:, : 3 * H].sigmoid_()
        g = gates[:, 3 * H:].tanh_()
        i, f, o = s[:, :H], s[:, H: 2 * H], s[:, 2 * H:]
        c_new = torch.addcmul(f.mul_(c), i, g, out=i)
        return torch.mul(o, torch.tanh(c_new, out=f), out=g), c_new

    def __call__(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        (h, c) = state[0]
        h0 = h[0].float()
        if self.table is not None:
            gates = self.q0(h0, self.table.index_select(0, tokens))
        else:
            gates = self.q0(torch.cat([self.embed.index_select(0, tokens).float(), h0], 1))
        x, c = self._cell8(gates, c[0].float())
        dtype = h.dtype
        new_state: State = [(x.unsqueeze(0).to(dtype), c.unsqueeze(0).to(dtype))]
        for (h, c), lin in zip(state[1:], self.q, strict=True):
            out, c = self._cell8(lin(torch.cat([x, h[0].float()], 1)), c[0].float())
            new_state.append((out.unsqueeze(0).to(dtype), c.unsqueeze(0).to(dtype)))
            x = out + x if self.residual else out
        return self.q_head(x), new_state


def module_step(model: RNNLanguageModel) -> StepFn:
    """A decode step through the model's own modules."""
    def step(tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        logits, _, state = model(tokens.unsqueeze(1), state)
        return logits[:, -1], state

    return step


def decode_step(model: RNNLanguageModel, int8: bool = False) -> StepFn:
    """The fastest decode step this model has: folded weights for LSTM (in int8 when asked), the modules
    otherwise."""
    if model.config.cell != "lstm":
        return module_step(model)
    return Int8LSTMStep(model) if int8 else LSTMStep(model)
