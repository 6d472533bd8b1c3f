"""Several decode tokens per CUDA graph replay: sampling, logprobs and the model step, n times over.

`GraphedStep` (graphs.py) graphs the model step alone; sampling then runs eagerly after it, dozens of
small kernels per token, each bound by the host's dispatch on a GPU. `GraphedDecode` records the
engine's whole per-token work for `n` tokens (the counter-based draw, temperature, top-k, top-p,
the chosen token's logprob and the top alternatives, then the step) into one graph per bucket of
batch sizes, so a step of n tokens is one replay and one read. Padding works as in graphs.py: rows
past the batch run greedy on whatever an earlier batch left there, and rows never mix.

Graphs are captured only for CUDA tensors with CUDA available; otherwise the same code runs eagerly on
the same padded buffers (what the CPU tests compare with the engine's own loop).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from rnnserve.engine.sampling import sample_rows
from rnnserve.models.decode import StepFn
from rnnserve.models.graphs import WARMUP_STEPS, _flatten, _unflatten, buckets_upto
from rnnserve.models.lm import State

log = logging.getLogger(__name__)


@dataclass
class DecodeOut:
    tokens: torch.Tensor  # (B, n) long
    chosen: torch.Tensor  # (B, n) float: log-probability of each chosen token
    top_values: torch.Tensor | None  # (B, n, top)
    top_ids: torch.Tensor | None
    logits: torch.Tensor  # (B, V): after the last token
    state: State


@dataclass
class _Buffers:
    inputs: list[torch.Tensor]  # logits, temperature, top_k, top_p, seeds, positions, then the state's tensors
    graph: torch.cuda.CUDAGraph | None = None
    outputs: list[torch.Tensor] | None = None


class GraphedDecode:
    def __init__(self, step: StepFn, max_batch: int, n: int, top: int, capture: bool = True) -> None:
        self.step, self.n, self.top, self.capture = step, n, top, capture
        self.buckets = buckets_upto(max_batch)
        self._buffers: dict[int, _Buffers] = {}
        self._failed: set[int] = set()

    def bucket(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def loop(self, logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
             seeds: torch.Tensor, positions: torch.Tensor, state: State) -> list[torch.Tensor]:
        """The engine's per-token work, n times: [tokens, chosen, top values, top ids, logits, *state]."""
        tokens, chosen, values, ids = [], [], [], []
        for j in range(self.n):
            t = sample_rows(logits, temperature, top_k, top_p, seeds, positions + j)
            lp = torch.log_softmax(logits.float(), -1)
            chosen.append(lp.gather(1, t.unsqueeze(1)).squeeze(1))
            if self.top:
                v, i = lp.topk(self.top, dim=-1)
                values.append(v)
                ids.append(i)
            logits, state = self.step(t, state)
            tokens.append(t)
        empty = torch.empty(0, device=logits.device)
        return [torch.stack(tokens, 1), torch.stack(chosen, 1), torch.stack(values, 1) if values else empty,
                torch.stack(ids, 1) if ids else empty, logits, *_flatten(state)]

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 seeds: torch.Tensor, positions: torch.Tensor, state: State) -> DecodeOut:
        B = logits.size(0)
        size = self.bucket(B)
        inputs = [logits, temperature, top_k, top_p, seeds, positions, *_flatten(state)]
        buf = None if size is None or size in self._failed else (self._buffers.get(size) or
                                                                  self._make(size, inputs, state))
        if buf is None:
            return self._out(self.loop(logits, temperature, top_k, top_p, seeds, positions, state), B, state)
        for static, t in zip(buf.inputs, inputs, strict=True):
            if static.dim() == 3:  # a state tensor (1, bucket, H)
                static[:, :B].copy_(t)
            else:
                static[:B].copy_(t)
        if buf.graph is not None:
            with torch.cuda.device(logits.device):
                buf.graph.replay()
            outputs = buf.outputs
        else:
            outputs = self._run(buf, state)
        return self._out(outputs, B, state)

    def _run(self, buf: _Buffers, like: State) -> list[torch.Tensor]:
        lg, temp, k, p, seeds, pos, *flat = buf.inputs
        return self.loop(lg, temp, k, p, seeds, pos, _unflatten(flat, like))

    def _out(self, outputs: list[torch.Tensor], B: int, like: State) -> DecodeOut:
        # clones: the next replay overwrites the static outputs
        tokens, chosen, values, ids, logits, *flat = outputs
        has_top = values.numel() > 0
        return DecodeOut(tokens[:B].clone(), chosen[:B].clone(), values[:B].clone() if has_top else None,
                         ids[:B].clone() if has_top else None, logits[:B].clone(),
                         _unflatten([t[:, :B].clone() for t in flat], like))

    def _make(self, size: int, inputs: list[torch.Tensor], like: State) -> _Buffers | None:
        def padded(t: torch.Tensor) -> torch.Tensor:
            if t.dim() == 3:
                return torch.zeros(1, size, t.size(2), dtype=t.dtype, device=t.device)
            return torch.zeros(size, *t.shape[1:], dtype=t.dtype, device=t.device)

        buf = _Buffers([padded(t) for t in inputs])
        buf.inputs[3].fill_(1.0)  # top_p of the padding rows (temperature 0: they run greedy)
        device = inputs[0].device
        if self.capture and device.type == "cuda" and torch.cuda.is_available():
            try:
                with torch.cuda.device(device):
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        for _ in range(WARMUP_STEPS):
                            self._run(buf, like)
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        buf.outputs = self._run(buf, like)
                buf.graph = graph
            except RuntimeError:  # an op the graph cannot hold: this bucket decodes eagerly
                log.warning("CUDA graph capture of the decode loop failed at batch %d", size, exc_info=True)
                self._failed.add(size)
                return None
        self._buffers[size] = buf
        return buf
