"""TorchServe handler for the attention encoder-decoder: a thin adapter over `TranslationEngine`.

Texts are tokenized by the model folder's own tokenizer (SentencePiece, or a word vocabulary), every
sentence of every request decodes in one running batch, and each frame carries the text every beam
already agrees on.
"""
from __future__ import annotations

import logging
import os
import time

from rnnserve.engine.translation_engine import TranslationEngine, TranslationOutput, merge_outputs
from rnnserve.models.decode import int8_gemm_path
from rnnserve.models.folder import load_translation
from rnnserve.service.handlers.answer_size import check_translation, token_bytes
from rnnserve.service.handlers.frames import (TextStreams, decode_body, parse_translate_body,
                                              parse_translate_score_body, score_frame, translation_frame)
from rnnserve.service.handlers.streaming import ContinuousBatchingHandler

MAX_CANDIDATES = 16

log = logging.getLogger(__name__)


class TranslationHandler(ContinuousBatchingHandler):
    def __init__(self) -> None:
        super().__init__()
        self.engine: TranslationEngine | None = None
        self.streams: dict[str, tuple[TextStreams, list[list[str]]]] = {}
        self.candidates: dict[str, tuple[list[str], list[list[str]]]] = {}  # scoring requests' texts, pieces

    def initialize(self, ctx) -> None:
        model_dir, cfg, device, dtype = self.setup(ctx)
        loaded = load_translation(model_dir, device=device, dtype=dtype)
        self.src, self.tgt = loaded.src, loaded.tgt
        self.target_step_s = float(cfg.get("target_step_ms", 30)) / 1000
        self.max_texts = int(cfg.get("max_texts", 64))
        self.max_chars = int(cfg.get("max_text_chars", 1000))
        self.engine = TranslationEngine(loaded.model, max_rows=int(cfg.get("max_rows", 256)),
                                        max_tokens_limit=int(cfg.get("max_tokens_limit", 256)),
                                        max_source_tokens=int(cfg.get("max_source_tokens", 256)), device=device,
                                        int8=bool(cfg.get("int8", False)))  # CPU only: the engine ignores it elsewhere
        # the longest token of each vocabulary in JSON: what bounds an answer's size (answer_size.py)
        self.src_token_bytes = token_bytes(self.src.pieces(list(range(self.src.vocab_size))))
        self.tgt_token_bytes = token_bytes(self.tgt.pieces(list(range(self.tgt.vocab_size))))
        self.initialized = True
        step = f"exact int8 steps, {int8_gemm_path(device)}" if self.engine.int8 else "float steps"
        log.info("loaded %s on %s (%s, %s), pid %d", loaded.meta.get("name"), device, dtype, step, os.getpid())

    def engine_ids(self) -> list[str]:
        return self.engine.request_ids()

    def admit(self, request_id: str, body) -> None:
        body = decode_body(body)
        if body.get("task") == "score":
            source, candidates, alpha, token_logprobs = parse_translate_score_body(body, self.max_chars,
                                                                                   MAX_CANDIDATES)
            ids = [self.tgt.encode(c) for c in candidates]
            self.engine.add_score(request_id, self.src.encode(source), ids, alpha, token_logprobs)
            self.candidates[request_id] = (candidates, [self.tgt.pieces(i) for i in ids])
            return
        texts, params, prefixes = parse_translate_body(body, self.max_texts, self.max_chars)
        ids = [self.src.encode(t) for t in texts]
        prefix_ids = [self.tgt.encode(p) for p in prefixes] if prefixes is not None else None
        self.engine.add(request_id, ids, params, prefix_ids)  # only queues it, after checking its fields
        limit = self.engine.max_tokens_limit
        outputs = [len(prefix_ids[i]) if prefix_ids else 0 for i in range(len(ids))]
        outputs = [n + (params.max_tokens or min(limit, 2 * len(src) + 10)) for n, src in zip(outputs, ids)]
        try:
            check_translation([len(src) for src in ids], outputs, params.n_best, params.return_attention,
                              params.return_alignment, params.max_tokens is not None, self.src_token_bytes,
                              self.tgt_token_bytes)
        except ValueError:
            self.engine.abort(request_id)
            raise
        self.streams[request_id] = (TextStreams(self.tgt, len(texts)), [self.src.pieces(i) for i in ids])

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self.streams.pop(request_id, None)
        self.candidates.pop(request_id, None)

    def has_work(self) -> bool:
        return self.engine.has_work()

    def run_step(self, short: bool, scale: float = 1.0) -> dict[str, TranslationOutput]:
        """Decoder steps until `scale` x `target_step_ms` is spent (one, for a short step that admits):
        TorchServe costs a few milliseconds per round trip, more than one decoder step of a small batch."""
        merged: dict[str, TranslationOutput] = {}
        deadline = time.perf_counter() + scale * self.target_step_s
        while self.engine.has_work():
            merged = self._merge(merged, {out.request_id: out for out in self.engine.step()})
            if short or time.perf_counter() >= deadline:
                break
        return merged

    def merge(self, first: TranslationOutput, second: TranslationOutput) -> TranslationOutput:
        return merge_outputs(first, second)

    def render(self, request_id: str, output: TranslationOutput) -> tuple[str, bool]:
        if output.scores is not None:
            return score_frame(output, *self.candidates.pop(request_id)), True
        streams, sources = self.streams[request_id]
        if output.finished:
            del self.streams[request_id]
        return translation_frame(output, streams, sources), output.finished
