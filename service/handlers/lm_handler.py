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

from pathlib import Path

from rnnserve.engine.lm_engine import LMEngine, StepOutput, merge_outputs
from rnnserve.engine.synthetic import SyntheticEngine
from rnnserve.engine.state import StateError, fingerprint, from_bytes
from rnnserve.models.decode import int8_gemm_path
from rnnserve.models.folder import WEIGHTS_FILE, load_lm
from rnnserve.service.handlers.frame_interval import frame_interval
from rnnserve.service.handlers.frames import (decode_body, output_frame, parse_generate_body, parse_score_body)
from rnnserve.service.handlers.streaming import ContinuousBatchingHandler

log = logging.getLogger(__name__)


class LanguageModelHandler(ContinuousBatchingHandler):
    def __init__(self) -> None:
        super().__init__()
        self.engine: LMEngine | None = None
        self.state_dtype: dict[str, str] = {}  # requests that asked for their final state, and in what

    def initialize(self, ctx) -> None:
        model_dir, cfg, device, dtype = self.setup(ctx)
        loaded = load_lm(model_dir, device=device, dtype=dtype)
        self.model, self.device, self.dtype = loaded.model, device, dtype
        self.weights = fingerprint(Path(model_dir) / WEIGHTS_FILE)  # a state is only valid for these weights
        if loaded.meta.get("engine") == "synthetic":  # benchmarks of the serving path (engine/synthetic.py)
            self.engine = SyntheticEngine(max_batch_size=int(cfg.get("max_batch_size", 64)),
                                          max_tokens_limit=int(cfg.get("max_tokens_limit", 2048)),
                                          max_prompt_chars=int(cfg.get("max_prompt_chars", 8192)),
                                          token_ms=float(loaded.meta.get("synthetic_token_ms", 0)))
        else:
            self.engine = self._engine(loaded, cfg, device)
        self.target_step_s = float(cfg.get("target_step_ms", 60)) / 1000
        self.admit_step_s = float(cfg.get("admit_step_ms", 0)) / 1000
        self.max_tokens_per_step = int(cfg.get("max_tokens_per_step", 32))
        # the least time between two frames of a stream, its first frame excepted (0: one frame per step)
        self.frame_interval_floor_s = float(cfg.get("frame_interval_ms", 0)) / 1000
        # ... and with many streams, this much per stream in flight, up to the most below: every frame costs
        # TorchServe's frontend and the gateway the same, so the frames of all streams together stay at about
        # 1 / frame_interval_per_stream_ms per second whatever their number (frame_interval.py)
        self.frame_interval_per_stream_s = float(cfg.get("frame_interval_per_stream_ms", 0)) / 1000
        self.max_frame_interval_s = float(cfg.get("max_frame_interval_ms", 0)) / 1000
        # a floor on a step's duration: with max_tokens_per_step 1 it paces every stream to at most
        # 1000 / min_step_ms tokens/s whatever the machine's speed (the test suite's slow streams)
        self.min_step_s = float(cfg.get("min_step_ms", 0)) / 1000
        self.step_s = max(self.target_step_s, self.frame_interval_floor_s)  # a long step's length at the floor
        self.initialized = True
        step = f"exact int8 step, {int8_gemm_path(device)}" if getattr(self.engine, "exact", False) else "float step"
        log.info("loaded %s on %s (%s, %s), pid %d", loaded.meta.get("name"), device, dtype, step, os.getpid())

    @staticmethod
    def _engine(loaded, cfg: dict, device) -> LMEngine:
        return LMEngine(
            loaded.model, loaded.tokenizer,
            max_batch_size=int(cfg.get("max_batch_size", 64)),
            max_tokens_limit=int(cfg.get("max_tokens_limit", 2048)),
            max_prompt_chars=int(cfg.get("max_prompt_chars", 8192)),
            device=device,
            mkldnn_min_batch=cfg.get("mkldnn_min_batch"),
            folded_step=bool(cfg.get("folded_step", True)),
            int8=bool(cfg.get("int8", False)),
            cuda_graphs=bool(cfg.get("cuda_graphs", False)),  # used on a GPU only
            # tokens of each prompt read per step (0: no limit): a long prompt is read across steps
            prefill_chunk=int(cfg.get("prefill_chunk_tokens") or 0),
            # with CUDA graphs, a full step's tokens (sampling included) are one graph replay
            tokens_per_replay=int(cfg.get("max_tokens_per_step", 32)),
        )

    def engine_ids(self) -> list[str]:
        return self.engine.request_ids()

    def has_work(self) -> bool:
        return self.engine.has_work()

    def admit(self, request_id: str, body) -> None:
        body = decode_body(body)
        if body.get("task") == "score":
            texts, token_logprobs = parse_score_body(body)
            self.engine.add_score(request_id, texts, token_logprobs)
            return
        prompt, params, options = parse_generate_body(body)
        state = None
        if options.state is not None:
            try:
                state = from_bytes(options.state, self.model, self.weights, self.device, self.dtype)
            except StateError as e:
                raise ValueError(str(e)) from None
        self.engine.add(request_id, prompt, params, logprobs=options.logprobs, echo=options.echo, state=state,
                        return_state=options.return_state is not None)
        if options.return_state is not None:
            self.state_dtype[request_id] = options.return_state

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self.state_dtype.pop(request_id, None)

    def run_step(self, short: bool, scale: float = 1.0) -> dict[str, StepOutput]:
        if not self.engine.has_work():
            return {}
        t0 = time.monotonic()
        if short:
            outputs = {o.request_id: o for o in self.engine.step(self.max_tokens_per_step, budget_s=self.admit_step_s)}
        else:
            start = self.clock()
            # A fast engine fills the step with more engine steps (each at most max_tokens_per_step tokens). The
            # step grows with the frame interval only while every row is taken (step_length_s): otherwise a
            # stream's frame waits for its interval however many calls come between (streaming.py), and a new
            # request waits in TorchServe for the running step. New requests cut the step short (`cut_reached`).
            length = self.step_length_s() if self.frame_interval_floor_s else 0.0  # 0: a frame per engine step
            end, grown = start + scale * length, length > self.step_s
            outputs = {o.request_id: o for o in self.engine.step(self.max_tokens_per_step,
                                                                 budget_s=scale * self.target_step_s,
                                                                 stop=self.cut_reached)}
            while self.engine.has_work() and not self.cut_reached() and (left := end - self.clock()) > 0:
                if grown and any(o.finished for o in outputs.values()):
                    break  # a row is free: its last frame goes out, and a waiting request may take the row
                for o in self.engine.step(self.max_tokens_per_step, budget_s=left, stop=self.cut_reached):
                    earlier = outputs.get(o.request_id)
                    outputs[o.request_id] = o if earlier is None else merge_outputs(earlier, o)
        if self.min_step_s:
            time.sleep(max(0.0, self.min_step_s - (time.monotonic() - t0)))
        return outputs

    def frame_interval_s(self) -> float:
        return frame_interval(self.frame_interval_floor_s, self.frame_interval_per_stream_s,
                              self.max_frame_interval_s, len(self.engine.request_ids()))

    def step_length_s(self) -> float:
        """The step, or the frame interval where longer while every row is taken: no new request can join before a
        stream ends, so the step need not end for one; it ends when a stream finishes (run_step). Each call then
        carries a frame of every stream, where a step shorter than the interval made two or more calls per frame,
        each costing TorchServe's frontend and its worker a round trip with every stream's entry."""
        if self.frame_interval_floor_s and self.batch_full():
            return max(self.step_s, self.frame_interval_s())
        return self.step_s

    def batch_full(self) -> bool:
        return len(self.engine.request_ids()) >= self.engine.max_batch_size

    def merge(self, first: StepOutput, second: StepOutput) -> StepOutput:
        return merge_outputs(first, second)

    def render(self, request_id: str, output: StepOutput) -> tuple[str, bool]:
        dtype = self.state_dtype.pop(request_id, None) if output.finished else None
        return output_frame(output, self.weights, dtype), output.finished
