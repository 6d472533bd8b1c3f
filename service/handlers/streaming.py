"""The continuous-batching protocol of TorchServe 0.12, shared by the model handlers.

Each call of `handle` is one engine step. The frontend (ContinuousBatching.java) re-sends every
request still in flight with an empty payload and adds new ones; the handler answers one NDJSON
frame per request and marks last frames through `ctx.stopping_criteria`. A request missing from
a call was dropped by the frontend because its client went away: its engine state is freed before
the next step. Subclasses say how to admit a request, run a step and abort; they hold no protocol.

Overlap: TorchServe's round trip between two calls (frames out to the clients, the next batch in)
costs ~10 ms at 32 streams, during which the worker would idle. So the long step of a call runs in a
background thread after the call has returned, and the next call collects it. A call that admits
requests first runs a short step (prefill, first token) itself, so that a new request's first tokens
leave with the call that admitted it; the background step after it is cut by the share of new
requests in the batch, because a burst brings more of them with the next calls. Where a first token
is worth little (a translation is read whole, and its first piece is rarely agreed by every beam),
`step_on_admit: false` leaves the new requests to the background step: the call returns at once and
the round trip overlaps their prefill instead of waiting for it. The engine is
touched by one thread at a time: every call waits for the background step before anything else.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from rnnserve.service.handlers.frames import EMPTY_FRAME, error_frame, handler_setup, split_final

log = logging.getLogger(__name__)


class ContinuousBatchingHandler:
    def __init__(self) -> None:
        self.initialized = False
        self.aborted = 0  # requests dropped because their client went away
        self.started: set[str] = set()  # requests whose first frame went out
        self.pending: dict[str, str] = {}  # last frames held back one step (see handle)
        self.overlap = True  # run steps in the background between calls (model-config `overlap_steps`)
        self.step_on_admit = True  # a call that admits runs a short step itself (model-config `step_on_admit`)
        self._stepper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
        self._running: Future | None = None  # the step started at the end of the previous call
        # set by a call that brings new requests while the background step runs: a step that keeps stepping to
        # fill a frame interval (lm_handler.py) stops at once. TorchServe sends the next call as soon as a call
        # returns, so new requests queue during one step and, without this, would wait for the next one too
        self.newcomers = threading.Event()

    def setup(self, ctx) -> tuple[str, dict, torch.device, torch.dtype]:
        """frames.handler_setup, and the overlap setting this class reads."""
        model_dir, cfg, device, dtype = handler_setup(ctx)
        self.overlap = bool(cfg.get("overlap_steps", True))
        self.step_on_admit = bool(cfg.get("step_on_admit", True))
        return model_dir, cfg, device, dtype

    # -- what a model handler provides ---------------------------------------------------------
    def engine_ids(self) -> list[str]:
        raise NotImplementedError

    def has_work(self) -> bool:
        raise NotImplementedError

    def admit(self, request_id: str, body) -> None:
        """Queue a new request; ValueError for the caller's mistakes."""
        raise NotImplementedError

    def run_step(self, short: bool, scale: float = 1.0) -> dict[str, Any]:
        """One engine step -> {request id: output} for the requests that advanced. A short step admits the
        waiting requests and gives them a first token; a long one decodes for `scale` x the step budget."""
        raise NotImplementedError

    def merge(self, first: Any, second: Any) -> Any:
        """Two consecutive outputs of one request as one."""
        raise NotImplementedError

    def render(self, request_id: str, output: Any) -> tuple[str, bool]:
        """An output as a frame, and whether it is the request's last."""
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    # -- the protocol ---------------------------------------------------------------------------
    def wait(self) -> dict[str, Any]:
        """Wait for the step running in the background, if any, and return its outputs."""
        running, self._running = self._running, None
        return running.result() if running is not None else {}

    def settle(self) -> None:
        """Wait for the background step to finish, leaving its outputs to the next call (tests)."""
        if self._running is not None:
            self._running.result()

    def _step(self, short: bool, scale: float = 1.0) -> dict[str, Any]:
        """run_step; when it fails, every running request ends with an error frame (a str output)."""
        try:
            return self.run_step(short, scale)
        except Exception:
            log.exception("engine step failed; ending the running requests")
            ids = self.engine_ids()
            for rid in ids:
                self.abort(rid)
            return {rid: error_frame("internal error during generation", "internal_error", 500) for rid in ids}

    def _merge(self, outputs: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
        for rid, out in more.items():
            if rid not in outputs:
                outputs[rid] = out
            elif not isinstance(outputs[rid], str):  # an error frame stays the last word
                outputs[rid] = out if isinstance(out, str) else self.merge(outputs[rid], out)
        return outputs

    def handle(self, data: list[dict], ctx) -> list[str]:
        ids = [ctx.request_ids[i] for i in range(len(data))]
        present = set(ids)
        if any(rid not in self.started and rid not in self.pending for rid in ids):
            self.newcomers.set()
        stepped = self.wait()  # from here on this thread alone touches the engine
        self.newcomers.clear()
        for rid in [r for r in self.engine_ids() if r not in present]:
            self.abort(rid)
            self.aborted += 1
            log.info("request %s left the batch (client gone); its rows are free", rid)
        self.started &= present
        self.pending = {r: f for r, f in self.pending.items() if r in present}
        outputs = {r: o for r, o in stepped.items() if r in present}

        frames: dict[str, tuple[str, bool]] = {}
        engine_ids = set(self.engine_ids())
        n_admitted = 0
        for i, rid in enumerate(ids):
            if rid in self.pending:
                frames[rid] = (self.pending.pop(rid), True)
            elif rid not in engine_ids and rid not in self.started and rid not in outputs:
                try:
                    self.admit(rid, data[i].get("body") or data[i].get("data"))
                    n_admitted += 1
                except ValueError as e:
                    frames[rid] = (error_frame(str(e), "invalid_request_error", 400, getattr(e, "param", None)), True)
                except Exception:  # one bad request must not end the others' streams
                    log.exception("request %s could not be admitted", rid)
                    frames[rid] = (error_frame("internal error while admitting the request", "internal_error", 500),
                                   True)
        if (n_admitted and self.step_on_admit) or not self.overlap:
            outputs = self._merge(outputs, self._step(short=n_admitted > 0))
        if self.overlap and self.has_work():
            # A call that admitted many requests, against the batch, is likely one of a burst whose other
            # requests come with the next calls: the next step is cut shorter the larger the new share,
            # so that they wait less. A steady trickle (a few new requests in a full batch) keeps
            # nearly whole steps and their throughput.
            fresh = n_admitted / max(1, len(self.engine_ids()))
            self._running = self._stepper.submit(self._step, False, 1.0 - fresh)
        for rid, out in outputs.items():
            frames[rid] = (out, True) if isinstance(out, str) else self.render(rid, out)

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
