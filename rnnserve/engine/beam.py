"""Batched greedy and beam-search decoding of whole batches (evaluation, tests).

A thin wrapper over TranslationEngine, so that evaluation measures exactly what is served.
"""
from __future__ import annotations

import torch

from rnnserve.engine.translation_engine import SentenceResult, TranslationEngine, TranslationParams
from rnnserve.models.seq2seq import Seq2Seq


@torch.inference_mode()
def beam_search(model: Seq2Seq, src: torch.Tensor, src_len: torch.Tensor, beam_size: int = 4,
                max_len: int | None = None, alpha: float = 0.6, return_attention: bool = False) -> list[SentenceResult]:
    """src (B, S) padded ids, src_len (B,) -> the best hypothesis per sentence (beam_size 1 = greedy)."""
    sources = [src[i, : int(n)].tolist() for i, n in enumerate(src_len)]
    engine = TranslationEngine(model, max_rows=len(sources) * beam_size,
                               max_tokens_limit=max(256, max_len or 0), max_source_tokens=max(256, src.size(1)),
                               device=src.device)
    engine.add("batch", sources, TranslationParams(beam_size, max_len, alpha, return_attention))
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                return out.results
    raise RuntimeError("engine stopped without finishing")
