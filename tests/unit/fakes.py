"""A fake TorchServe context and a fake continuous-batching frontend that drive handlers as
ContinuousBatching.java does: each call re-sends the requests in flight with an empty payload and
adds the new ones."""
import json


class FakeContext:
    def __init__(self, model_dir, handler_cfg=None):
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.model_yaml_config = {"handler": handler_cfg or {"max_batch_size": 8, "target_step_ms": 5}}
        self.request_ids = {}
        self.stopping_criteria = None


class Frontend:
    def __init__(self, handler, ctx):
        self.h, self.ctx = handler, ctx
        self.inflight: list[str] = []
        self.new: dict[str, dict] = {}
        self.frames: dict[str, list[dict]] = {}
        self.left_out: list[str] = []  # requests the last call gave no frame

    def submit(self, rid, body):
        self.new[rid] = body

    def step(self, settle: bool = True):
        """One call; `settle` then waits for the long step it started (False: the next call may meet it running)."""
        ids = self.inflight + list(self.new)
        batch = [{"body": {}} for _ in self.inflight] + [{"body": b} for b in self.new.values()]
        self.new = {}
        self.ctx.request_ids = dict(enumerate(ids))
        out = self.h.handle(batch, self.ctx)
        if settle:
            self.h.settle()  # the step started by this call has run: engine state can be inspected
        assert len(out) == len(ids)
        self.inflight = []
        answered = set(self.ctx.request_ids)  # TorchServe answers the indexes the handler left in request_ids
        self.left_out = []
        for i, (rid, frame) in enumerate(zip(ids, out)):
            if i not in answered:  # no frame this call; the request stays in flight
                self.left_out.append(rid)
                self.inflight.append(rid)
                continue
            assert frame.endswith("\n") and frame.count("\n") == 1
            self.frames.setdefault(rid, []).append(json.loads(frame))
            if not self.ctx.stopping_criteria[i](frame):
                self.inflight.append(rid)

    def drain(self):
        while self.inflight or self.new:
            self.step()


