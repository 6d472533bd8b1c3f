"""TorchServe handler for recurrent language models: a thin adapter over `LMEngine`.

Runs with continuous batching (model-config.yaml `continuousBatching: true`): every call of
`handle` is one engine step. The frontend re-sends each in-flight request (empty payload) and adds
new ones; the handler answers one NDJSON frame per request per call and marks the last one through
`ctx.stopping_criteria`. A request missing from a call was dropped by the frontend (its client went
away): its batch row is freed before the step. TorchServe loads one class from this module, so the
helpers live in `rnnserve.service.handlers.frames`.
"""
from __future__ import annotations

import logging
import os
import time

import torch

from rnnserve.engine.lm_engine import LMEngine
from rnnserve.models.folder import load_lm
from rnnserve.service.handlers.frames import (EMPTY_FRAME, error_frame, output_frame, parse_generate_body,
                                              pick_device, split_final, tokens_for_budget)

log = logging.getLogger(__name__)


class LanguageModelHandler:
    def __init__(self) -> None:
        self.engine: LMEngine | None = None
        self.initialized = False
        self.per_token_s = 0.002  # running estimate of one decode step, refined after each call
        self.aborted = 0
        self.started: set[str] = set()  # requests whose first frame went out
        self.pending: dict[str, str] = {}  # last frames held back one step (see handle)

    def initialize(self, ctx) -> None:
        props = ctx.system_properties
        model_dir = props["model_dir"]
        cfg = (ctx.model_yaml_config or {}).get("handler", {})
        device, dtype = pick_device(props.get("gpu_id"), cfg.get("half_precision", False))
        threads = int(cfg.get("torch_threads", 0))
        if threads and device.type == "cpu":
            torch.set_num_threads(threads)
        loaded = load_lm(model_dir, device=device, dtype=dtype)
        self.engine = LMEngine(
            loaded.model, loaded.tokenizer,
            max_batch_size=int(cfg.get("max_batch_size", 64)),
            max_tokens_limit=int(cfg.get("max_tokens_limit", 2048)),
            max_prompt_chars=int(cfg.get("max_prompt_chars", 8192)),
            device=device,
            mkldnn_min_batch=cfg.get("mkldnn_min_batch"),
        )
        self.target_step_s = float(cfg.get("target_step_ms", 30)) / 1000
        self.max_tokens_per_step = int(cfg.get("max_tokens_per_step", 16))
        self.initialized = True
        log.info("loaded %s on %s (%s), pid %d", loaded.meta.get("name"), device, dtype, os.getpid())

    def handle(self, data: list[dict], ctx) -> list[str]:
        engine = self.engine
        ids = [ctx.request_ids[i] for i in range(len(data))]
        present = set(ids)
        for rid in [r for r in engine.request_ids() if r not in present]:
            engine.abort(rid)
            self.aborted += 1
            log.info("request %s left the batch (client gone); row freed", rid)
        self.started &= present
        self.pending = {r: f for r, f in self.pending.items() if r in present}

        frames: dict[str, tuple[str, bool]] = {}
        for i, rid in enumerate(ids):
            if rid in self.pending:
                frames[rid] = (self.pending.pop(rid), True)
            elif rid not in engine and rid not in self.started:
                try:
                    prompt, params = parse_generate_body(data[i].get("body") or data[i].get("data"))
                    engine.add(rid, prompt, params)
                except ValueError as e:
                    frames[rid] = (error_frame(str(e), "invalid_request_error", 400), True)
                except Exception:  # one bad request must not end the others' streams
                    log.exception("request %s could not be admitted", rid)
                    frames[rid] = (error_frame("internal error while admitting the request", "internal_error",
                                               500), True)

        if engine.has_work():
            n_tokens = tokens_for_budget(self.target_step_s, self.per_token_s, self.max_tokens_per_step)
            t0 = time.perf_counter()
            try:
                outputs = engine.step(n_tokens)
            except Exception:
                log.exception("engine step failed; ending the %d running requests", engine.num_running)
                outputs = []
                for rid in engine.request_ids():
                    engine.abort(rid)
                    frames[rid] = (error_frame("internal error during generation", "internal_error", 500), True)
            if outputs:
                self.per_token_s = 0.8 * self.per_token_s + 0.2 * (time.perf_counter() - t0) / n_tokens
            for o in outputs:
                frames[o.request_id] = (output_frame(o), o.finished)

        result, stops = [], []
        for rid in ids:
            frame, last = frames.get(rid, (EMPTY_FRAME, False))
            if last and rid not in self.started:
                # TorchServe 0.12 never sends the HTTP status line when a stream's first frame is
                # also its last (RestJob.responseInference): the client would hang. Send the text
                # now and the ending at the next step.
                text_frame, self.pending[rid] = split_final(frame)
                frame, last = text_frame, False
            self.started.add(rid)
            if last:
                self.started.discard(rid)
            result.append(frame)
            stops.append(last)
        ctx.stopping_criteria = [lambda _res, last=last: last for last in stops]
        return result
