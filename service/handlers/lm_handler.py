"""TorchServe handler for recurrent language models: a thin adapter over `LMEngine`.

The continuous-batching protocol lives in `ContinuousBatchingHandler`; TorchServe loads the one
class defined in this module. Each step decodes several tokens per request, as many as fit in
`target_step_ms` (prefill included): TorchServe costs a few milliseconds per step round trip whatever
the handler does, and the budget bounds how long a new request waits for the running step.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

from rnnserve.engine.lm_engine import LMEngine, StepOutput
from rnnserve.models.folder import load_lm
from rnnserve.service.handlers.frames import output_frame, parse_generate_body
from rnnserve.service.handlers.streaming import ContinuousBatchingHandler

log = logging.getLogger(__name__)


class LanguageModelHandler(ContinuousBatchingHandler):
    def __init__(self) -> None:
        super().__init__()
        self.engine: LMEngine | None = None

    def initialize(self, ctx) -> None:
        model_dir, cfg, device, dtype = self.setup(ctx)
        loaded = load_lm(model_dir, device=device, dtype=dtype)
        self.engine = LMEngine(
            loaded.model, loaded.tokenizer,
            max_batch_size=int(cfg.get("max_batch_size", 64)),
            max_tokens_limit=int(cfg.get("max_tokens_limit", 2048)),
            max_prompt_chars=int(cfg.get("max_prompt_chars", 8192)),
            device=device,
            mkldnn_min_batch=cfg.get("mkldnn_min_batch"),
            folded_step=bool(cfg.get("folded_step", True)),
        )
        self.target_step_s = float(cfg.get("target_step_ms", 60)) / 1000
        self.admit_step_s = float(cfg.get("admit_step_ms", 0)) / 1000
        self.max_tokens_per_step = int(cfg.get("max_tokens_per_step", 32))
        # a floor on a step's duration: with max_tokens_per_step 1 it paces every stream to at most
        # 1000 / min_step_ms tokens/s whatever the machine's speed (the test suite's slow streams)
        self.min_step_s = float(cfg.get("min_step_ms", 0)) / 1000
        self.initialized = True
        log.info("loaded %s on %s (%s), pid %d", loaded.meta.get("name"), device, dtype, os.getpid())

    def engine_ids(self) -> list[str]:
        return self.engine.request_ids()

    def has_work(self) -> bool:
        return self.engine.has_work()

    def admit(self, request_id: str, body) -> None:
        prompt, params = parse_generate_body(body)
        self.engine.add(request_id, prompt, params)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def run_step(self, short: bool, scale: float = 1.0) -> dict[str, StepOutput]:
        if not self.engine.has_work():
            return {}
        t0 = time.monotonic()
        budget = self.admit_step_s if short else scale * self.target_step_s
        outputs = {o.request_id: o for o in self.engine.step(self.max_tokens_per_step, budget_s=budget)}
        if self.min_step_s:
            time.sleep(max(0.0, self.min_step_s - (time.monotonic() - t0)))
        return outputs

    def merge(self, first: StepOutput, second: StepOutput) -> StepOutput:
        return replace(second, text=first.text + second.text)

    def render(self, request_id: str, output: StepOutput) -> tuple[str, bool]:
        return output_frame(output), output.finished
