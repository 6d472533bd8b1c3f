"""Baseline for `rnnserve bench`: the usual TorchServe streaming example, one request at a time.

batchSize 1, no continuous batching: the request's tokens are decoded one by one and each is sent
with send_intermediate_predict_response. Same model, same engine code, threads and frames as the
served handler, so the benchmark compares serving designs, not kernels. The `lm-naive-modules`
archive steps the model's modules instead of the folded weights (`folded_step: false`), as the
usual example calls the model's forward. Not used in production.
"""
from __future__ import annotations

import logging

from rnnserve.engine.lm_engine import LMEngine
from rnnserve.models.folder import load_lm
from rnnserve.service.handlers.frames import error_frame, handler_setup, output_frame, parse_generate_body

log = logging.getLogger(__name__)


class NaiveLanguageModelHandler:
    def __init__(self) -> None:
        self.initialized = False

    def initialize(self, ctx) -> None:
        model_dir, cfg, device, dtype = handler_setup(ctx)
        loaded = load_lm(model_dir, device=device, dtype=dtype)
        self.engine = LMEngine(loaded.model, loaded.tokenizer, max_batch_size=1, device=device,
                               folded_step=bool(cfg.get("folded_step", True)))
        self.initialized = True

    def handle(self, data: list[dict], ctx) -> list[str]:
        from ts.handler_utils.utils import send_intermediate_predict_response

        rid = ctx.request_ids[0]
        try:
            prompt, params, _ = parse_generate_body(data[0].get("body") or data[0].get("data"))
            self.engine.add(rid, prompt, params)
        except ValueError as e:
            return [error_frame(str(e), "invalid_request_error", 400)]
        while True:
            (out,) = self.engine.step(1)
            if out.finished:
                return [output_frame(out)]
            send_intermediate_predict_response([output_frame(out)], ctx.request_ids, "Intermediate response", 200, ctx)
