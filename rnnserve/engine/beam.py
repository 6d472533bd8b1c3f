"""Batched greedy and beam-search decoding for the attention encoder-decoder.

B sentences x K beams are decoded as one batch of B*K rows. A finished beam keeps its score and
only extends with padding, so it competes with the open ones until the end. Hypotheses are ranked
by log-probability divided by the GNMT length penalty ((5 + length) / 6) ** alpha.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rnnserve.models.seq2seq import BOS, EOS, PAD, Seq2Seq


@dataclass
class Hypothesis:
    tokens: list[int]  # without <bos>/<eos>
    score: float  # sum of log-probabilities
    attention: list[list[float]] | None = None  # per output token, weights over the source tokens


def length_penalty(length: torch.Tensor, alpha: float) -> torch.Tensor:
    return ((5.0 + length.float()) / 6.0) ** alpha


def _reorder(state, index: torch.Tensor):
    return tuple(s.index_select(0, index) for s in state) if isinstance(state, tuple) else state.index_select(0, index)


@torch.inference_mode()
def beam_search(model: Seq2Seq, src: torch.Tensor, src_len: torch.Tensor, beam_size: int = 4,
                max_len: int | None = None, alpha: float = 0.6, return_attention: bool = False) -> list[Hypothesis]:
    """src (B, S) padded ids, src_len (B,) -> the best hypothesis per sentence (beam_size 1 = greedy)."""
    model.eval()
    B, S = src.shape
    K = beam_size
    dev = src.device
    max_len = max_len or int(src_len.max()) * 2 + 10
    enc, keys, mask, state = model.encode(src, src_len)
    rows = torch.arange(B, device=dev).repeat_interleave(K)
    enc, keys, mask, state = enc[rows], keys[rows], mask[rows], _reorder(state, rows)

    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start identical: keep one so the first step does not pick duplicates
    prev = torch.full((B * K,), BOS, dtype=torch.long, device=dev)
    finished = torch.zeros(B * K, dtype=torch.bool, device=dev)
    lengths = torch.zeros(B * K, dtype=torch.long, device=dev)
    history = torch.empty(B * K, 0, dtype=torch.long, device=dev)
    attn_hist = torch.empty(B * K, 0, S, device=dev) if return_attention else None
    base = (torch.arange(B, device=dev) * K).unsqueeze(1)

    for _ in range(max_len):
        logits, state, weights = model.decoder.step(prev, state, keys, enc, mask)
        logp = torch.log_softmax(logits.float(), dim=-1)
        # a finished beam may only add padding, at no cost
        logp[finished] = float("-inf")
        logp[finished, PAD] = 0.0
        V = logp.size(-1)
        cand = (scores.view(-1, 1) + logp).view(B, K * V)
        scores, flat = cand.topk(K, dim=-1)  # (B, K)
        beam = flat // V
        token = flat % V
        index = (base + beam).view(-1)
        state = _reorder(state, index)
        finished = finished[index]
        lengths = lengths[index] + (~finished).long()
        token = token.view(-1)
        history = torch.cat([history[index], token.unsqueeze(1)], 1)
        if return_attention:
            attn_hist = torch.cat([attn_hist[index], weights[index].unsqueeze(1)], 1)
        finished = finished | (token == EOS)
        prev = token
        if bool(finished.all()):
            break

    # rank by length-normalised score; lengths count <eos>, as it was predicted too
    final = scores.view(-1) / length_penalty(lengths, alpha)
    best = final.view(B, K).argmax(-1) + torch.arange(B, device=dev) * K
    out = []
    for b, row in enumerate(best.tolist()):
        toks = history[row].tolist()
        n = toks.index(EOS) if EOS in toks else len(toks)
        attention = attn_hist[row, :n, : int(src_len[b])].tolist() if return_attention else None
        out.append(Hypothesis([t for t in toks[:n] if t != PAD], float(scores.view(-1)[row]), attention))
    return out
