"""CUDA graphs for the decode step, at bucketed batch sizes.

On a GPU one LSTM step for hundreds of rows is tens of microseconds of arithmetic, and launching its
dozen-odd kernels one by one from Python can cost more than that. A CUDA graph records the step's
kernels once and replays them with one launch. A graph has fixed shapes and fixed addresses, so
`GraphedStep` keeps one per bucket of batch sizes (1, 2, 4, ... up to the engine's largest batch): a
batch of B rows is copied into the first B rows of the smallest bucket >= B, the graph replays, and
the first B rows of its outputs are cloned out, because the next replay overwrites them and the engine
keeps states across steps (and snapshots them for returned states).

Rows past B hold token 0 and zeros at first, later what an earlier batch left there: real states,
as finite as the real rows. A recurrent step never mixes rows (lookups, row-wise GEMMs, element-wise
gates), so they cost arithmetic only. Batches above the largest bucket run the plain step.

Graphs are captured only for CUDA tensors with CUDA available; otherwise (or with `capture=False`) the
same buffers and padding run eagerly, which is what the unit tests check on CPU.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rnnserve.models.decode import StepFn
from rnnserve.models.lm import State

log = logging.getLogger(__name__)

# One graph per bucket, each holding its own memory; past 1,024 rows the arithmetic of a step dwarfs
# its launches, and the largest batch is 1,024.
MAX_BUCKET = 1024
WARMUP_STEPS = 3  # torch's docs warm up on a side stream before capture (cuBLAS handles, lazy init)


def buckets_upto(max_batch: int) -> list[int]:
    """Powers of two below the largest batch, then the largest batch (at most MAX_BUCKET) itself."""
    top = min(max_batch, MAX_BUCKET)
    out, b = [], 1
    while b < top:
        out.append(b)
        b *= 2
    return out + [top]


def _flatten(state: State) -> list[torch.Tensor]:
    """A state's tensors in order: (h, c) per LSTM layer, h per GRU/RNN layer; each (1, B, H)."""
    return [t for layer in state for t in (layer if isinstance(layer, tuple) else (layer,))]


def _unflatten(flat: list[torch.Tensor], like: State) -> State:
    it = iter(flat)
    return [tuple(next(it) for _ in layer) if isinstance(layer, tuple) else next(it) for layer in like]


def _layout(tokens: torch.Tensor, state: State) -> tuple:
    """What a bucket's buffers were made for: a call with another layout runs the plain step."""
    shape = tuple(len(layer) if isinstance(layer, tuple) else 0 for layer in state)
    return (tokens.device, tokens.dtype, shape,
            tuple((t.size(0), t.size(2), t.dtype, t.device) for t in _flatten(state)))


@dataclass
class _Bucket:
    tokens: torch.Tensor  # (bucket,) long: the step's static input
    state: list[torch.Tensor]  # flattened, each (1, bucket, H)
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # (bucket, V): the graph's static outputs
    out_state: list[torch.Tensor] | None = None


class GraphedStep:
    """A StepFn that runs `step` padded to bucketed batch sizes, through a CUDA graph per bucket where
    it can (`capture` and CUDA tensors), eagerly otherwise. Outputs never alias its buffers."""

    def __init__(self, step: StepFn, max_batch: int, capture: bool = True) -> None:
        self.step = step
        self.buckets = buckets_upto(max_batch)
        self.capture = capture
        self._buckets: dict[int, _Bucket] = {}
        self._layout: tuple | None = None
        self._failed: set[int] = set()  # buckets whose capture failed: they run the plain step

    def bucket(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def graphed(self, tokens: torch.Tensor) -> bool:
        return self.capture and tokens.device.type == "cuda" and torch.cuda.is_available()

    @torch.inference_mode()  # buffers made in inference mode are only written to in it
    def __call__(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        B = tokens.size(0)
        size = self.bucket(B)
        layout = _layout(tokens, state)
        if self._layout is None:
            self._layout = layout
        if size is None or size in self._failed or layout != self._layout:
            return self.step(tokens, state)
        buf = self._buckets.get(size) or self._make(size, tokens, state)
        if buf is None:
            return self.step(tokens, state)
        buf.tokens[:B].copy_(tokens)
        for static, t in zip(buf.state, _flatten(state), strict=True):
            static[:, :B].copy_(t)
        if buf.graph is not None:
            with torch.cuda.device(tokens.device):
                buf.graph.replay()
            logits, out_state = buf.logits, buf.out_state
        else:
            logits, new_state = self.step(buf.tokens, _unflatten(buf.state, state))
            out_state = _flatten(new_state)
        # clones: the next call overwrites the static outputs (and a slice would keep the padding alive)
        return logits[:B].clone(), _unflatten([t[:, :B].clone() for t in out_state], state)

    def warm(self, init_state: Callable[[int], State], device: torch.device) -> None:
        """Capture every bucket now (at load), so that no request waits for a capture."""
        if not (self.capture and device.type == "cuda" and torch.cuda.is_available()):
            return
        with torch.inference_mode():
            for size in self.buckets:
                self(torch.zeros(size, dtype=torch.long, device=device), init_state(size))
        log.info("CUDA graphs captured for batch sizes %s (failed: %s)", self.buckets, sorted(self._failed) or "none")

    def _make(self, size: int, tokens: torch.Tensor, state: State) -> _Bucket | None:
        buf = _Bucket(torch.zeros(size, dtype=tokens.dtype, device=tokens.device),
                      [torch.zeros(1, size, t.size(2), dtype=t.dtype, device=t.device) for t in _flatten(state)])
        if self.graphed(tokens):
            try:
                self._capture(buf, state)
            except RuntimeError:  # an op the graph cannot hold (e.g. a host sync): this bucket stays eager
                log.warning("CUDA graph capture failed at batch %d; it runs the plain step", size, exc_info=True)
                self._failed.add(size)
                return None
        self._buckets[size] = buf
        return buf

    def _capture(self, buf: _Bucket, like: State) -> None:
        def run() -> tuple[torch.Tensor, State]:
            return self.step(buf.tokens, _unflatten(buf.state, like))

        with torch.cuda.device(buf.tokens.device):  # the worker's GPU, not necessarily the current one
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits, new_state = run()
        buf.graph, buf.logits, buf.out_state = graph, logits, _flatten(new_state)
