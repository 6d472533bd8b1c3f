"""Encoder-decoder translation model with additive (Bahdanau) attention.

Encoder: embedding -> bidirectional multi-layer RNN over packed sequences (padding never enters
the recurrence) -> per-token annotations (B, S, 2H) and a decoder start state.
Decoder: one step at a time (attention needs the previous state), an RNN cell fed with
[embedding of the previous token; attention context], and an output layer over
[state; context; embedding] projected to the embedding size and tied to the target embedding.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]

RNN_TYPES = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
CELL_TYPES = {"rnn": nn.RNNCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}


@dataclass
class Seq2SeqConfig:
    src_vocab: int
    tgt_vocab: int
    cell: str = "gru"
    embed_dim: int = 256
    enc_hidden: int = 256  # per direction
    dec_hidden: int = 512
    attn_dim: int = 256
    enc_layers: int = 2
    dropout: float = 0.3

    def to_dict(self) -> dict:
        return asdict(self)


class Encoder(nn.Module):
    def __init__(self, c: Seq2SeqConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(c.src_vocab, c.embed_dim, padding_idx=PAD)
        self.rnn = RNN_TYPES[c.cell](c.embed_dim, c.enc_hidden, num_layers=c.enc_layers, bidirectional=True,
                                     batch_first=True, dropout=c.dropout if c.enc_layers > 1 else 0.0)
        self.bridge = nn.Linear(2 * c.enc_hidden, c.dec_hidden)
        self.drop = nn.Dropout(c.dropout)
        self.cell = c.cell

    def forward(self, src: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B, S) padded, lengths (B,) -> annotations (B, S, 2H), decoder start state (B, Hd)."""
        x = self.drop(self.embed(src))
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, h = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=src.size(1))
        if self.cell == "lstm":
            h = h[0]
        last = torch.cat([h[-2], h[-1]], dim=-1)  # last layer, forward and backward: (B, 2H)
        return out, torch.tanh(self.bridge(last))


class AdditiveAttention(nn.Module):
    """score(s, h_j) = v^T tanh(W s + U h_j); the U h_j part is computed once per source."""

    def __init__(self, dec_hidden: int, enc_dim: int, attn_dim: int) -> None:
        super().__init__()
        self.W = nn.Linear(dec_hidden, attn_dim, bias=False)
        self.U = nn.Linear(enc_dim, attn_dim)
        self.v = nn.Linear(attn_dim, 1, bias=False)

    def keys(self, enc: torch.Tensor) -> torch.Tensor:
        return self.U(enc)  # (B, S, A)

    def forward(self, s: torch.Tensor, keys: torch.Tensor, enc: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """s (B, Hd), keys (B, S, A), enc (B, S, E), mask (B, S) True on real tokens -> context, weights."""
        scores = self.v(torch.tanh(keys + self.W(s).unsqueeze(1))).squeeze(-1)  # (B, S)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        return torch.bmm(weights.unsqueeze(1), enc).squeeze(1), weights


class Decoder(nn.Module):
    def __init__(self, c: Seq2SeqConfig) -> None:
        super().__init__()
        enc_dim = 2 * c.enc_hidden
        self.embed = nn.Embedding(c.tgt_vocab, c.embed_dim, padding_idx=PAD)
        self.attn = AdditiveAttention(c.dec_hidden, enc_dim, c.attn_dim)
        self.cell = CELL_TYPES[c.cell](c.embed_dim + enc_dim, c.dec_hidden)
        self.pre_out = nn.Linear(c.dec_hidden + enc_dim + c.embed_dim, c.embed_dim)
        self.out = nn.Linear(c.embed_dim, c.tgt_vocab)
        self.out.weight = self.embed.weight  # tied: fewer parameters, better rare-word estimates
        self.drop = nn.Dropout(c.dropout)
        self.lstm = c.cell == "lstm"

    def init_state(self, start: torch.Tensor):
        return (start, torch.zeros_like(start)) if self.lstm else start

    @staticmethod
    def hidden(state) -> torch.Tensor:
        return state[0] if isinstance(state, tuple) else state

    def step(self, prev: torch.Tensor, state, keys: torch.Tensor, enc: torch.Tensor,
             mask: torch.Tensor):
        """prev (B,) token ids -> logits (B, V), new state, attention weights (B, S)."""
        e = self.drop(self.embed(prev))
        context, weights = self.attn(self.hidden(state), keys, enc, mask)
        state = self.cell(torch.cat([e, context], -1), state)
        h = self.hidden(state)
        logits = self.out(self.drop(torch.tanh(self.pre_out(torch.cat([h, context, e], -1)))))
        return logits, state, weights


class Seq2Seq(nn.Module):
    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # N(0, 1) embeddings would make the tied output layer's first logits huge
        for emb in (self.encoder.embed, self.decoder.embed):
            nn.init.normal_(emb.weight, std=config.embed_dim ** -0.5)
            emb.weight.data[PAD].zero_()

    def encode(self, src: torch.Tensor, lengths: torch.Tensor):
        enc, start = self.encoder(src, lengths)
        mask = src != PAD
        return enc, self.decoder.attn.keys(enc), mask, self.decoder.init_state(start)

    def forward(self, src: torch.Tensor, src_len: torch.Tensor, tgt: torch.Tensor,
                teacher_forcing: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """tgt (B, T) = <bos> y1 .. yn <eos> <pad>.. -> logits (B, T-1, V), mean cross-entropy.

        With teacher_forcing < 1 each step feeds, per sentence, the model's own previous
        prediction with probability 1 - teacher_forcing (scheduled sampling).
        """
        enc, keys, mask, state = self.encode(src, src_len)
        if teacher_forcing >= 1.0:
            logits = self._teacher_forced(tgt, state, keys, enc, mask)
        else:
            logits = self._scheduled_sampling(tgt, state, keys, enc, mask, teacher_forcing)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt[:, 1:].reshape(-1), ignore_index=PAD)
        return logits, loss

    def _teacher_forced(self, tgt, state, keys, enc, mask) -> torch.Tensor:
        """Only attention and the cell need the step loop; the output layer then runs once over all
        steps, which is several times faster on CPU than projecting step by step."""
        d = self.decoder
        emb = d.drop(d.embed(tgt[:, :-1]))  # (B, T-1, E)
        hs, contexts = [], []
        for t in range(emb.size(1)):
            context, _ = d.attn(d.hidden(state), keys, enc, mask)
            state = d.cell(torch.cat([emb[:, t], context], -1), state)
            hs.append(d.hidden(state))
            contexts.append(context)
        h, c = torch.stack(hs, 1), torch.stack(contexts, 1)
        return d.out(d.drop(torch.tanh(d.pre_out(torch.cat([h, c, emb], -1)))))

    def _scheduled_sampling(self, tgt, state, keys, enc, mask, teacher_forcing: float) -> torch.Tensor:
        prev = tgt[:, 0]
        steps = []
        for t in range(1, tgt.size(1)):
            logits, state, _ = self.decoder.step(prev, state, keys, enc, mask)
            steps.append(logits)
            prev = tgt[:, t]
            own = logits.argmax(-1)
            use_own = torch.rand(prev.shape, device=prev.device) >= teacher_forcing
            prev = torch.where(use_own, own, prev)
        return torch.stack(steps, 1)
