"""The continuous-batching protocol of TorchServe 0.12, shared by the model handlers.

Each call of `handle` is one engine step. The frontend (ContinuousBatching.java) re-sends every
request still in flight with an empty payload and adds new ones; the handler answers one NDJSON
frame per request and marks last frames through `ctx.stopping_criteria`. A request missing from
a call was dropped by the frontend because its client went away: its engine state is freed before
the step. Subclasses say how to admit a request, run a step and abort; they hold no protocol.
"""
from __future__ import annotations

import logging
import os

import torch

from rnnserve.service.handlers.frames import EMPTY_FRAME, error_frame, pick_device, split_final

log = logging.getLogger(__name__)


class ContinuousBatchingHandler:
    def __init__(self) -> None:
        self.initialized = False
        self.aborted = 0  # requests dropped because their client went away
        self.started: set[str] = set()  # requests whose first frame went out
        self.pending: dict[str, str] = {}  # last frames held back one step (see handle)

    def setup(self, ctx) -> tuple[str, dict, torch.device, torch.dtype]:
        """Model folder, the model-config.yaml `handler:` section, and the device and dtype to load on:
        cuda:{gpu_id} from TorchServe's context (fp16 when `half_precision`), else CPU in fp32."""
        props = ctx.system_properties
        cfg = dict((ctx.model_yaml_config or {}).get("handler", {}))
        for key in ("target_step_ms", "admit_step_ms"):  # as for threads below: try values without rebuilding
            if os.environ.get(f"RNNSERVE_{key.upper()}"):
                cfg[key] = float(os.environ[f"RNNSERVE_{key.upper()}"])
        device, dtype = pick_device(props.get("gpu_id"), cfg.get("half_precision", False))
        # threads per worker: model-config.yaml, or RNNSERVE_WORKER_THREADS (inherited from TorchServe's
        # environment) to try another value without rebuilding the archive; 0 keeps torch's default
        threads = int(os.environ.get("RNNSERVE_WORKER_THREADS") or cfg.get("torch_threads", 0))
        if threads and device.type == "cpu":
            torch.set_num_threads(threads)
        return props["model_dir"], cfg, device, dtype

    # -- what a model handler provides ---------------------------------------------------------
    def engine_ids(self) -> list[str]:
        raise NotImplementedError

    def admit(self, request_id: str, body) -> None:
        """Queue a new request; ValueError for the caller's mistakes."""
        raise NotImplementedError

    def run_step(self) -> dict[str, tuple[str, bool]]:
        """One engine step -> {request id: (frame, is_last)} for the requests that advanced."""
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    # -- the protocol ---------------------------------------------------------------------------
    def handle(self, data: list[dict], ctx) -> list[str]:
        ids = [ctx.request_ids[i] for i in range(len(data))]
        present = set(ids)
        for rid in [r for r in self.engine_ids() if r not in present]:
            self.abort(rid)
            self.aborted += 1
            log.info("request %s left the batch (client gone); its rows are free", rid)
        self.started &= present
        self.pending = {r: f for r, f in self.pending.items() if r in present}

        frames: dict[str, tuple[str, bool]] = {}
        engine_ids = set(self.engine_ids())
        for i, rid in enumerate(ids):
            if rid in self.pending:
                frames[rid] = (self.pending.pop(rid), True)
            elif rid not in engine_ids and rid not in self.started:
                try:
                    self.admit(rid, data[i].get("body") or data[i].get("data"))
                except ValueError as e:
                    frames[rid] = (error_frame(str(e), "invalid_request_error", 400), True)
                except Exception:  # one bad request must not end the others' streams
                    log.exception("request %s could not be admitted", rid)
                    frames[rid] = (error_frame("internal error while admitting the request", "internal_error", 500),
                                   True)
        try:
            frames.update(self.run_step())
        except Exception:
            log.exception("engine step failed; ending the running requests")
            for rid in self.engine_ids():
                self.abort(rid)
                frames[rid] = (error_frame("internal error during generation", "internal_error", 500), True)

        result, stops = [], []
        for rid in ids:
            frame, last = frames.get(rid, (EMPTY_FRAME, False))
            if last and rid not in self.started:
                # TorchServe 0.12 never sends the HTTP status line when a stream's first frame is
                # also its last (RestJob.responseInference): the client would hang. Send the text
                # now and the ending at the next step.
                frame, self.pending[rid] = split_final(frame)
                last = False
            if last:
                self.started.discard(rid)
            else:
                self.started.add(rid)
            result.append(frame)
            stops.append(last)
        ctx.stopping_criteria = [lambda _res, last=last: last for last in stops]
        return result
