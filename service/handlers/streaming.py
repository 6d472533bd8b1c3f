"""The continuous-batching protocol of TorchServe 0.12, shared by the model handlers.

Each call of `handle` is one engine step. The frontend (ContinuousBatching.java) re-sends every
request still in flight with an empty payload and adds new ones; the handler answers at most one
NDJSON frame per request and marks last frames through `ctx.stopping_criteria`. A request missing from
a call was dropped by the frontend because its client went away: its engine state is freed before
the next step. Subclasses say how to admit a request, run a step and abort; they hold no protocol.

Overlap: TorchServe's round trip between two calls (frames out to the clients, the next batch in)
costs ~10 ms at 32 streams, during which the worker would idle. So all engine work runs on one engine
thread: a call hands it the batch and waits only for that call's outputs; the engine thread drops the
requests that left, admits the new ones, runs their short step (prefill, first token) so that their
first tokens leave with the call that admitted them, publishes the outputs, and goes straight on with
the next long step while the call renders its frames and TorchServe relays them; the next call
collects that step. The engine thread never waits for the calling thread to wake up, which on a busy
machine costs several milliseconds per call. The long step after an admitting call is cut by the share
of new requests in the batch, because a burst brings more of them with the next calls; and a call that
brings new requests cuts the running long step the same way (at once when they are most of the batch),
so that a new request waits about one token for it, not a whole step. Where a first token is worth
little (a translation is read whole, and its first piece is rarely agreed by every beam),
`step_on_admit: false` leaves the new requests to the long step: the call returns at once and the
round trip overlaps their prefill instead of waiting for it. Requests that reach an idle engine may wait
for the rest of their burst (`admit_gather_ms`): the calls that bring it return at once, answering nothing
for them, and one prefill then reads them all (`_gathers`). The engine is touched by its thread only.

Frames: every frame costs TorchServe's frontend and the gateway about the same, whatever it carries, so a
stream gets a frame only once its frame interval (`frame_interval_s`, grown with the streams in flight) has
passed since its last one (give or take half a step), or when it ends; its first frame never waits. What the
steps made for a stream not yet due is held on the engine thread and goes out with its next frame. Steps
stay as long as at the interval's floor whatever its growth, so that a new request, which waits in
TorchServe for the running step, gets its first token as soon; the calls between two frames of a stream
carry the other streams' frames, or the new requests' first ones. Only while every row is taken, when no
new request can join before a stream ends, does a step last the grown interval (`step_length_s`), ended
by the first stream to finish: one call per frame of each stream. A stream with nothing to send is left
out of the call's answer: TorchServe 0.12 answers the indexes left in `ctx.request_ids` (its
ts/service.py encodes the answer from that very dict) and keeps every other job in flight for the next call.
"""
from __future__ import annotations

import logging
import math
import time
from collections import deque
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
        # the engine's one thread: every call's engine work runs there, then the long step after it
        self._stepper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
        self._running: Future | None = None  # the engine thread's work for the last call, its long step included
        self._carried: dict[str, Any] = {}  # outputs of the long step, for the next call
        self.clock = time.monotonic  # the clock of steps and cuts (tests count in steps with their own)
        self.step_s = 0.0  # a long step's length at scale 1 (the model handler's)
        # the running long step: its start, length and rows, and the time new requests cut it at
        self._step_t0, self._step_len, self._step_rows, self._cut = 0.0, 0.0, 0, math.inf
        self._joined: deque[tuple[float, int]] = deque()  # (when, how many) requests joined within a step
        # requests that reach an idle engine wait this long at most for the rest of their burst (model-config
        # `admit_gather_ms`; 0: none), and since when the rows admitted meanwhile have waited
        self.admit_gather_s = 0.0
        self._gather_since: float | None = None
        self._gather_calls = 0  # calls of the running gather
        # per-stream frames (engine thread): when each stream's last frame went out, and what was held since
        self._last_frame: dict[str, float] = {}
        self._held: dict[str, Any] = {}

    def setup(self, ctx) -> tuple[str, dict, torch.device, torch.dtype]:
        """frames.handler_setup, and the overlap setting this class reads."""
        model_dir, cfg, device, dtype = handler_setup(ctx)
        self.overlap = bool(cfg.get("overlap_steps", True))
        self.step_on_admit = bool(cfg.get("step_on_admit", True))
        self.admit_gather_s = float(cfg.get("admit_gather_ms", 0)) / 1000
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

    def frame_interval_s(self) -> float:
        """The least time between two frames of a stream now (0: a frame per call). Asked on the engine thread."""
        return 0.0

    def step_length_s(self) -> float:
        """A long step's length at scale 1 now (see run_step). Asked on the engine thread."""
        return self.step_s

    def batch_full(self) -> bool:
        """Whether every row is taken (no request can join before one ends). Asked on the engine thread."""
        return False

    def finished(self, output: Any) -> bool:
        """Whether an output is its request's last (its frame never waits)."""
        return bool(getattr(output, "finished", False))

    # -- the protocol ---------------------------------------------------------------------------
    def settle(self) -> None:
        """Wait until the engine thread is idle: the last call's work and the step after it (tests)."""
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

    def cut_reached(self) -> bool:
        """Whether the running step should end now: new requests cut it short (see handle). Asked by run_step
        after each token."""
        return self.clock() >= self._cut

    def _hurry(self, fresh: int) -> None:
        """`fresh` new requests wait for the running step: it ends once it has run (1 - their share of the
        batch) of its length (at once for a burst, nearly whole for one arrival in a full batch)."""
        share = fresh / (self._step_rows + fresh)
        self._cut = min(self._cut, self._step_t0 + (1.0 - share) * self._step_len)

    def _due(self, outputs: dict[str, Any], present: set[str]) -> dict[str, Any]:
        """The outputs whose frames go out with this call: a stream's first, its last, an error, and those of
        streams whose frame interval ends within half a step (the next call comes about a step later); the others
        are held for a later call. Calls come once a step whatever the interval: a held stream never makes one."""
        held, self._held = {r: o for r, o in self._held.items() if r in present}, {}
        outputs = self._merge(held, outputs)
        self._last_frame = {r: t for r, t in self._last_frame.items() if r in present}
        interval, now = self.frame_interval_s(), self.clock()
        if interval > 0:
            for rid in list(outputs):
                out, last = outputs[rid], self._last_frame.get(rid)
                if last is not None and now - last < interval - self.step_s / 2 and not isinstance(out, str) \
                        and not self.finished(out):
                    self._held[rid] = outputs.pop(rid)
        for rid in outputs:
            self._last_frame[rid] = now
        return outputs

    def _at_boundary(self, ids: list[str], data: list[dict], known: set[str], published: Future) -> None:
        """The engine's side of a call, on the engine thread between two steps: drop the requests that left,
        admit the new ones (and run their short step), publish the outputs to the call, then go straight on
        with the next long step, without waiting for the call to render and return."""
        try:
            present = set(ids)
            outputs, self._carried = {r: o for r, o in self._carried.items() if r in present}, {}
            for rid in [r for r in self.engine_ids() if r not in present]:
                self.abort(rid)
                self.aborted += 1
                log.info("request %s left the batch (client gone); its rows are free", rid)
            errors: dict[str, tuple[str, bool]] = {}
            engine_ids = set(self.engine_ids())
            n_admitted = 0
            for i, rid in enumerate(ids):
                if rid in known or rid in engine_ids or rid in outputs:
                    continue
                try:
                    self.admit(rid, data[i].get("body") or data[i].get("data"))
                    n_admitted += 1
                except ValueError as e:
                    errors[rid] = (error_frame(str(e), "invalid_request_error", 400, getattr(e, "param", None)), True)
                except Exception:  # one bad request must not end the others' streams
                    log.exception("request %s could not be admitted", rid)
                    errors[rid] = (error_frame("internal error while admitting the request", "internal_error", 500),
                                   True)
            if self._gathers(n_admitted, bool(engine_ids)):
                # no step: the call returns at once, and the next brings the burst's other requests
                self._joined.append((self.clock(), n_admitted))
                self._gather_calls += 1
                # the last long step's outputs still go out (with what was held for them), as they would have
                published.set_result((self._due(outputs, present), errors, set(self.engine_ids())))
                return
            gathered = self._gather_since is not None
            if gathered:
                # the engine was idle when the gather began: its requests now are the gathered ones
                log.info("one prefill for %d requests gathered over %d calls in %.1f ms", len(self.engine_ids()),
                         self._gather_calls + 1, 1000 * (self.clock() - self._gather_since))
                self._gather_since, self._gather_calls = None, 0
            if ((n_admitted or gathered) and self.step_on_admit) or not self.overlap:
                outputs = self._merge(outputs, self._step(short=n_admitted > 0 or gathered))
            outputs = self._due(outputs, present)
            scale = None
            now = self.clock()
            if n_admitted:
                self._joined.append((now, n_admitted))
            while self._joined and now - self._joined[0][0] >= self.step_s:
                self._joined.popleft()
            if self.overlap and self.has_work():
                # A batch whose rows joined within the last step is likely in a burst whose other requests come
                # with the next calls: the next step is cut shorter the larger the young share of the batch (each
                # row weighed by how recently it joined), so that they wait less for a call. A steady trickle (a
                # few new requests in a full batch) keeps nearly whole steps and their throughput.
                self._step_rows = len(self.engine_ids())
                young = (sum(n * (1.0 - (now - t) / self.step_s) for t, n in self._joined) if self.step_s
                         else n_admitted)
                scale = 1.0 - min(young, self._step_rows) / max(1, self._step_rows)
                # set before the call can return: its next call may cut this step (_hurry)
                self._step_t0, self._step_len, self._cut = self.clock(), scale * self.step_length_s(), math.inf
        except BaseException as e:  # the call fails as a whole, as it would have in the calling thread
            published.set_exception(e)
            return
        published.set_result((outputs, errors, set()))
        if scale is not None:
            self._carried = self._step(False, scale)

    def _gathers(self, n_admitted: int, was_running: bool) -> bool:
        """Whether the requests just admitted wait for the next call before their prefill. A burst reaches an idle
        engine over several calls: prefilling the first call's few requests at once makes the others wait for that
        prefill (a recurrent prefill costs about the same for one prompt as for 64), then pay their own, so the
        burst runs in waves. So an idle engine's new requests wait (the call returns at once, answering nothing for
        them) while each call brings more, until a call brings none, every row is taken, or `admit_gather_ms` has
        passed since the first; then one prefill reads them all. A lone request waits one round trip."""
        if not (self.admit_gather_s and self.overlap and self.step_on_admit and n_admitted):
            return False
        if self._gather_since is None:
            if was_running:
                return False  # running rows keep stepping; the young share shortens their steps instead
            self._gather_since = self.clock()
        return self.clock() - self._gather_since < self.admit_gather_s and not self.batch_full()

    def handle(self, data: list[dict], ctx) -> list[str]:
        ids = [ctx.request_ids[i] for i in range(len(data))]
        present = set(ids)
        self.started &= present
        self.pending = {r: f for r, f in self.pending.items() if r in present}
        known = self.started | set(self.pending)
        fresh = sum(1 for rid in ids if rid not in known)
        if fresh and self.overlap:
            self._hurry(fresh)
        published: Future = Future()
        self._running = self._stepper.submit(self._at_boundary, ids, data, known, published)
        outputs, frames, waiting = published.result()
        for rid in ids:
            if rid in self.pending:
                frames[rid] = (self.pending.pop(rid), True)
        for rid, out in outputs.items():
            frames[rid] = (out, True) if isinstance(out, str) else self.render(rid, out)

        result, stops, left_out = [], [], []
        for i, rid in enumerate(ids):
            if rid not in frames and (rid in self.started or rid in waiting):  # nothing new: no frame (module doc)
                left_out.append(i)
                result.append("")
                stops.append(False)
                continue
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
        for i in left_out:
            del ctx.request_ids[i]
        return result
