"""The translation decoder's step in exact int8 at fixed activation scales (CPU serving).

`Decoder.step` (models/seq2seq.py) runs five GEMMs per step in fp32: the attention's query W s, the
GRU cell's input and hidden GEMMs, pre_out over [h; context; e] and the tied output projection. Each
rounds by the batch's shape, so a sentence's scores move with its neighbours. `Int8GRUDecoderStep`
runs every one of them through `Int8Linear` (models/decode.py): int8 weights per output channel,
int8 activations at a scale fixed by construction, products exact in int32. The scales:
- the hidden state: a GRU's is a convex mix of tanh outputs and of the start state tanh(bridge(..)),
  so it lies in [-1, 1] (1/127);
- the context: a weighted mean of the encoder's outputs, GRU states too, so in [-1, 1] (1/127);
- the embedding: where its projections fit in a table (`MAX_TABLE_BYTES`), looked up in fp32 with
  the biases folded in (no GEMM at all); else int8 at the scale of its largest entry, known at load;
- pre_out's tanh, which feeds the output projection: [-1, 1] (1/127).
Parts with the same scale share one GEMM: [W_hh | W_attn] over the old state, [W_ih,context | W_pre,context]
over the context. The gate arithmetic, the attention's tanh, softmax and weighted sum stay in fp32:
element-wise or reductions along one row of one row's data, the same bits in any batch
(tests/unit/test_seq2seq_int8.py) and with any padding of the source (`_attend`). It holds with one intra-op
thread (the served setting). Encoder outputs must be the same bits too: `Int8GRUEncoder` encodes in the
same arithmetic, all of a step's new sentences in one call.
"""
from __future__ import annotations

import torch

from rnnserve.models.decode import MAX_TABLE_BYTES, Int8Linear
from rnnserve.models.seq2seq import PAD, Decoder, Seq2Seq


TAIL = 32  # elements per iteration of torch's vectorised CPU loops (two AVX-512 vectors of fp32); the rest is scalar


def _padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Int8GRUDecoderStep:
    """`Decoder.step` of a GRU decoder with its GEMMs in int8 at fixed activation scales: called as
    (prev (B,), state (B, Hd), keys, enc, mask) -> (logits (B, V) fp32, new state (B, Hd) fp32, attention
    weights (B, S)). Built from the weights at load: rebuild it after changing them."""

    def __init__(self, decoder: Decoder, max_table_bytes: int = MAX_TABLE_BYTES) -> None:
        if decoder.lstm or not isinstance(decoder.cell, torch.nn.GRUCell):
            raise ValueError("the int8 decoder step needs a GRU decoder")
        d = decoder
        self.attn = d.attn
        self.v = d.attn.v.weight.detach().float()[0]  # (A,)
        H = self.hidden = d.cell.hidden_size
        E = self.embed_dim = d.embed.embedding_dim
        A = d.attn.W.out_features
        w = {k: v.detach().float() for k, v in d.state_dict().items()}
        w_ih, w_hh = w["cell.weight_ih"], w["cell.weight_hh"]  # (3H, E + C), (3H, H): gates r, z, n
        w_pre = w["pre_out.weight"]  # (E, H + C + E) over [h; context; e]
        C = w_ih.size(1) - E
        embed = w["embed.weight"]
        # the old state: the GRU's hidden gates (with b_hh: r * (W_hn h + b_hn) needs it inside) and the query
        self.q_h = Int8Linear(torch.cat([w_hh, w["attn.W.weight"]], 0).t(), torch.cat([w["cell.bias_hh"],
                                                                                        torch.zeros(A)]), 1.0)
        # the context: its part of the GRU's input gates and of pre_out
        self.q_c = Int8Linear(torch.cat([w_ih[:, E:], w_pre[:, H: H + C]], 0).t(), torch.zeros(3 * H + E), 1.0)
        # the previous token's embedding: its part of both, with their biases
        w_e = torch.cat([w_ih[:, :E], w_pre[:, H + C:]], 0).t()  # (E, 3H + E)
        b_e = torch.cat([w["cell.bias_ih"], w["pre_out.bias"]])
        if embed.size(0) * w_e.size(1) * 4 <= max_table_bytes:
            self.table: torch.Tensor | None = torch.addmm(b_e, embed, w_e).contiguous()
            self.q_e = None
        else:
            self.table, self.embed = None, embed
            self.q_e = Int8Linear(w_e, b_e, max(1e-6, float(embed.abs().max())))
        self.q_p = Int8Linear(w_pre[:, :H].t(), torch.zeros(E), 1.0)  # the new state's part of pre_out
        self.q_out = Int8Linear(w["out.weight"].t(), w["out.bias"], 1.0)  # over tanh(pre_out): in [-1, 1]

    def _embedded(self, prev: torch.Tensor) -> torch.Tensor:
        """(B, 3H + E): the previous token's part of the GRU's input gates and of pre_out, biases included."""
        if self.table is not None:
            return self.table.index_select(0, prev)
        return self.q_e(self.embed.index_select(0, prev))

    def _attend(self, query: torch.Tensor, keys: torch.Tensor, enc: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """AdditiveAttention with the query W s already computed (in int8), in an arithmetic where a row's
        numbers depend neither on the other rows nor on how far the batch's longest source pads it:
        - tanh(keys + query) runs row by row along the attention's width (a padded row stride when that
          width is not a multiple of TAIL, so no row's elements fall in a vectorised loop's scalar tail);
        - the score's dot product with v is a sum along each (row, position), not a GEMM over rows x
          positions (which would round by their count);
        - the softmax's exp runs over positions padded to a multiple of TAIL (padding: -inf, exp 0), its
          sum and the context's weighted sum run position by position, so padding adds exact zeros last."""
        B, S, A = keys.shape
        t = _rows(B, S, A)
        torch.add(keys, query.unsqueeze(1), out=t).tanh_()
        scores = torch.full((B, _padded(S, TAIL)), float("-inf"))
        scores[:, :S] = t.mul_(self.v).sum(-1).masked_fill_(~mask, float("-inf"))
        scores.sub_(scores.amax(-1, keepdim=True)).exp_()
        weights = scores.div_(scores.cumsum(-1)[:, -1:])[:, :S]
        context = weights[:, :1] * enc[:, 0]
        for j in range(1, S):
            context.addcmul_(weights[:, j: j + 1], enc[:, j])
        return context, weights

    def __call__(self, prev: torch.Tensor, state: torch.Tensor, keys: torch.Tensor, enc: torch.Tensor,
                 mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        H = self.hidden
        h = state.float()
        g = self.q_h(h)  # (B, 3H + A)
        context, weights = self._attend(g[:, 3 * H:], keys.float(), enc.float(), mask)
        c = self.q_c(context, self._embedded(prev))  # (B, 3H + E): input gates, then pre_out's part
        # the gates in place on row-strided views of c: torch iterates them row by row, so no row's result
        # depends on where a vectorised loop over the whole batch would end
        gi, gh = c[:, : 3 * H], g[:, : 3 * H]
        rz = gi[:, : 2 * H]
        torch.add(rz, gh[:, : 2 * H], out=rz).sigmoid_()
        n = gi[:, 2 * H:]
        torch.addcmul(n, rz[:, :H], gh[:, 2 * H:], out=n).tanh_()
        h_new = torch.addcmul(n, rz[:, H:], h - n)  # (1 - z) n + z h
        pre = c[:, 3 * H:]
        torch.addcmul(pre, self.q_p.acc(self.q_p.quantize(h_new)), self.q_p.out_scale, out=pre).tanh_()
        return self.q_out(pre), h_new, weights


def int8_supported(model: Seq2Seq) -> bool:
    """Whether the model has the int8 encoder and decoder step: a GRU model (its encoder is bidirectional)."""
    return model.config.cell == "gru"


class Int8GRUEncoder:
    """`Seq2Seq.encode` of a bidirectional GRU encoder with its GEMMs in int8 at fixed activation scales:
    (src (B, S) right-padded, lengths (B,)) -> (annotations (B, S, 2H), keys (B, S, A), mask (B, S), decoder
    start state (B, Hd)), each row's numbers the same bits alone or with any other sentences and padding, so
    the engine encodes every step's new sentences in one call. The GRU runs step by step over the positions:
    - layer 0's input gates are a table over the vocabulary (the embedding's projection, its bias folded in)
      where it fits (`MAX_TABLE_BYTES`), else int8 at the embedding's largest entry;
    - later layers' inputs, the hidden states and so the annotations are GRU states, in [-1, 1] (1/127), as
      are the attention keys' and the bridge's inputs;
    - a position past a sentence's end keeps its state (forward) or its zero start (backward) and gives zeros,
      as packed sequences do."""

    def __init__(self, model: Seq2Seq, max_table_bytes: int = MAX_TABLE_BYTES) -> None:
        e = model.encoder
        if not isinstance(e.rnn, torch.nn.GRU) or not e.rnn.bidirectional:
            raise ValueError("the int8 encoder needs a bidirectional GRU encoder")
        self.hidden = H = e.rnn.hidden_size
        w = {k: v.detach().float() for k, v in e.rnn.state_dict().items()}
        embed = e.embed.weight.detach().float()
        self.layers: list[list[tuple[torch.Tensor | Int8Linear, Int8Linear]]] = []
        for layer in range(e.rnn.num_layers):
            directions = []
            for sfx in ("", "_reverse"):
                w_ih, b_ih = w[f"weight_ih_l{layer}{sfx}"], w[f"bias_ih_l{layer}{sfx}"]
                if layer > 0:
                    inp: torch.Tensor | Int8Linear = Int8Linear(w_ih.t(), b_ih, 1.0)
                elif embed.size(0) * 3 * H * 4 <= max_table_bytes:
                    inp = torch.addmm(b_ih, embed, w_ih.t()).contiguous()
                else:
                    inp = Int8Linear(w_ih.t(), b_ih, max(1e-6, float(embed.abs().max())))
                hh = Int8Linear(w[f"weight_hh_l{layer}{sfx}"].t(), w[f"bias_hh_l{layer}{sfx}"], 1.0)
                directions.append((inp, hh))
            self.layers.append(directions)
        self.embed = embed
        u = model.decoder.attn.U
        self.keys = Int8Linear(u.weight.detach().float().t(), u.bias.detach().float(), 1.0)
        b = e.bridge
        self.bridge = Int8Linear(b.weight.detach().float().t(), b.bias.detach().float(), 1.0)
        self.init_state = model.decoder.init_state

    def _inputs(self, inp: torch.Tensor | Int8Linear, src: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        """(B, S, 3H): every position's input gates, biases included."""
        B, S = src.shape
        if x is not None:
            return inp(x.reshape(B * S, -1)).view(B, S, -1)
        if isinstance(inp, torch.Tensor):
            return inp.index_select(0, src.reshape(-1)).view(B, S, -1)
        return inp(self.embed.index_select(0, src.reshape(-1))).view(B, S, -1)

    def _run(self, gi: torch.Tensor, hh: Int8Linear, mask: torch.Tensor, backward: bool) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
        B, S, _ = gi.shape
        H = self.hidden
        h = torch.zeros(B, H)
        out = torch.zeros(B, S, H)
        for t in (range(S - 1, -1, -1) if backward else range(S)):
            gh = hh(h)  # (B, 3H), b_hh included: r * (W_hn h + b_hn) needs it inside
            # the gates on row-strided buffers (_rows): torch iterates them row by row
            rz = torch.add(gi[:, t, : 2 * H], gh[:, : 2 * H], out=_rows(B, 2 * H)).sigmoid_()
            n = torch.addcmul(gi[:, t, 2 * H:], rz[:, :H], gh[:, 2 * H:], out=_rows(B, H)).tanh_()
            h_new = torch.addcmul(n, rz[:, H:], h - n, out=_rows(B, H))  # (1 - z) n + z h
            keep = mask[:, t: t + 1]
            h = torch.where(keep, h_new, h)
            out[:, t] = torch.where(keep, h, 0.0)
        return out, h

    def __call__(self, src: torch.Tensor, lengths: torch.Tensor):
        mask = src != PAD
        x = None
        finals: list[torch.Tensor] = []
        for directions in self.layers:
            outs = []
            for d, (inp, hh) in enumerate(directions):
                out, h = self._run(self._inputs(inp, src, x), hh, mask, backward=d == 1)
                outs.append(out)
                finals.append(h)
            x = torch.cat(outs, -1)  # (B, S, 2H)
        B, S, _ = x.shape
        bridged = self.bridge(torch.cat(finals[-2:], -1))
        start = torch.tanh(bridged, out=_rows(B, bridged.size(1))).contiguous()
        keys = self.keys(x.reshape(B * S, -1)).view(B, S, -1)
        return x, keys, mask, self.init_state(start)


def _rows(*shape: int) -> torch.Tensor:
    """An empty buffer whose rows (the last dimension, W) lie TAIL-aligned apart when W is not a multiple of
    TAIL: an element-wise loop over it runs row by row, so no row's elements fall in a vectorised loop's scalar
    tail whose position would depend on the batch's size."""
    *outer, W = shape
    return torch.empty(*outer, _padded(W, TAIL))[..., :W] if W % TAIL else torch.empty(*shape)
