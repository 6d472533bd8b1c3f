"""Continuous-batching generation for recurrent language models, in plain torch.

A recurrent model's whole per-request memory is a fixed-size hidden (and cell) vector, so the
engine keeps one batch of rows for all running requests: `step()` prefills requests that arrived,
advances every row by up to `num_tokens` tokens in one batched call per token, and retires rows
that finished or were aborted. Nothing here knows about TorchServe or HTTP.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from rnnserve.engine.sampling import SamplingParams, make_generator, sample_rows
from rnnserve.models.decode import decode_step, module_step
from rnnserve.models.lm import RNNLanguageModel, State, concat_rows, select_rows
from rnnserve.tokenizer import CharTokenizer

log = logging.getLogger(__name__)

# A character model has no beginning-of-text token: an empty prompt starts after a newline, where
# speeches in the corpus start.
EMPTY_PROMPT = "\n"


@contextmanager
def mkldnn_enabled(enabled: bool):
    """Switch oneDNN for the block (torch.backends.mkldnn.flags also touches TF32 and warns on CPU)."""
    before = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(enabled)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(before)


@dataclass
class StepOutput:
    """What one request produced in one engine step."""
    request_id: str
    text: str  # new text since the previous output (stop-string look-ahead held back)
    finished: bool = False
    finish_reason: str | None = None  # "length" | "stop" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_size: int = 0  # sequences decoded together in this step


@dataclass
class _Sequence:
    request_id: str
    params: SamplingParams
    prompt_ids: list[int]
    generator: torch.Generator
    decoder: Any  # the tokenizer's text of each new token (CharDecoder, SubwordDecoder, WordDecoder)
    prompt_tokens: int = 0  # the caller's prompt length (an empty prompt counts 0)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already returned
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.monotonic)


class LMEngine:
    def __init__(self, model: RNNLanguageModel, tokenizer: CharTokenizer, max_batch_size: int = 64,
                 max_tokens_limit: int = 2048, max_prompt_chars: int = 8192,
                 device: torch.device | str = "cpu", mkldnn_min_batch: int | None = None,
                 folded_step: bool = True) -> None:
        self.model = model.eval()
        # folded weights make a decode step a few GEMMs (models/decode.py); False steps the modules
        self._decode = decode_step(self.model) if folded_step else module_step(self.model)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_tokens_limit = max_tokens_limit
        self.max_prompt_chars = max_prompt_chars
        self.device = torch.device(device)
        # oneDNN's recurrent kernels cost a fixed overhead per call that dominates small batches on
        # CPU; below this batch size decode steps run on torch's native kernels (BENCHMARKS.md).
        self.mkldnn_min_batch = mkldnn_min_batch
        self._waiting: list[_Sequence] = []
        self._running: list[_Sequence] = []  # row i of the batch state belongs to _running[i]
        self._state: State | None = None
        self._logits: torch.Tensor | None = None  # (B, V) next-token logits of each running row
        self._ids: set[str] = set()

    # -- admission -----------------------------------------------------------------------------
    def add(self, request_id: str, prompt: str, params: SamplingParams) -> None:
        """Queue a request; raises ValueError (and keeps nothing) when its parameters are invalid."""
        if request_id in self._ids:
            raise ValueError(f"duplicate request id {request_id!r}")
        if not isinstance(prompt, str):
            raise ValueError("prompt must be a string")
        if len(prompt) > self.max_prompt_chars:
            raise ValueError(f"prompt must be at most {self.max_prompt_chars} characters")
        params.validate(self.max_tokens_limit)
        ids = self.tokenizer.encode(prompt or EMPTY_PROMPT)
        if not ids:  # a prompt of nothing the vocabulary can spell (a word model's unknown words)
            ids = self.tokenizer.encode(EMPTY_PROMPT)
        decoder = self.tokenizer.decoder(line_start=not prompt or prompt.endswith("\n"))
        seq = _Sequence(request_id, params, ids, make_generator(params.seed, self.device), decoder,
                        prompt_tokens=len(ids) if prompt else 0)
        self._waiting.append(seq)
        self._ids.add(request_id)

    def abort(self, request_id: str) -> bool:
        """Forget a request (client gone); its batch row is freed at once."""
        if request_id not in self._ids:
            return False
        self._ids.discard(request_id)
        self._waiting = [s for s in self._waiting if s.request_id != request_id]
        keep = [i for i, s in enumerate(self._running) if s.request_id != request_id]
        if len(keep) != len(self._running):
            self._keep_rows(keep)
        return True

    def request_ids(self) -> list[str]:
        return list(self._ids)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._ids

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    # -- stepping ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, num_tokens: int = 1, budget_s: float | None = None) -> list[StepOutput]:
        """Admit waiting requests, then decode up to `num_tokens` tokens for every running request.

        With `budget_s`, decoding also stops once the step (prefill included) has lasted that long,
        after at least one token. A clock, not a per-token estimate, because one token's cost moves
        with the batch size, and a step that prefilled new prompts should release their first tokens
        without adding a full budget of decoding on top.
        """
        t0 = time.perf_counter()
        self._admit()
        if not self._running:
            return []
        for _ in range(num_tokens):
            self._decode_one()
            if all(s.finish_reason for s in self._running):
                break
            if budget_s is not None and time.perf_counter() - t0 >= budget_s:
                break
        outputs = [self._output(s) for s in self._running]
        alive = [i for i, s in enumerate(self._running) if not s.finish_reason]
        if len(alive) != len(self._running):
            for s in self._running:
                if s.finish_reason:
                    self._ids.discard(s.request_id)
            self._keep_rows(alive)
        return outputs

    def _admit(self) -> None:
        room = self.max_batch_size - len(self._running)
        if room <= 0 or not self._waiting:
            return
        new, self._waiting = self._waiting[:room], self._waiting[room:]
        with mkldnn_enabled(self._use_mkldnn(len(new))):
            new_logits, state = self.model.prefill([seq.prompt_ids for seq in new])
        if self._state is None:
            self._state, self._logits = state, new_logits
        else:
            self._state = concat_rows(self._state, state)
            self._logits = torch.cat([self._logits, new_logits], 0)
        self._running.extend(new)

    def _decode_one(self) -> None:
        seqs = self._running
        dev = self.device
        temperature = torch.tensor([s.params.temperature for s in seqs], device=dev)
        top_k = torch.tensor([s.params.top_k for s in seqs], dtype=torch.long, device=dev)
        top_p = torch.tensor([s.params.top_p for s in seqs], device=dev)
        tokens = sample_rows(self._logits, temperature, top_k, top_p, [s.generator for s in seqs])
        for s, tok in zip(seqs, tokens.tolist()):
            if s.finish_reason:  # finished earlier in this step; its row idles until retired
                continue
            s.token_ids.append(tok)
            new = s.decoder.add(tok)
            s.text += new
            self._check_stop(s, len(new))
        with mkldnn_enabled(self._use_mkldnn(len(seqs))):
            self._logits, self._state = self._decode(tokens, self._state)

    def _use_mkldnn(self, batch: int) -> bool:
        return self.mkldnn_min_batch is not None and batch >= self.mkldnn_min_batch

    def _check_stop(self, s: _Sequence, added: int) -> None:
        for stop in s.params.stop:
            # only the tail can hold a new match: a stop string ending in the text the token added
            start = max(0, len(s.text) - len(stop) - added + 1)
            pos = s.text.find(stop, start)
            if pos != -1:
                s.text = s.text[:pos]
                s.finish_reason = "stop"
                return
        if len(s.token_ids) >= s.params.max_tokens:
            s.finish_reason = "length"

    def _output(self, s: _Sequence) -> StepOutput:
        if s.finish_reason:
            end = len(s.text)
        else:  # hold back what could be the start of a stop string
            hold = max((len(x) - 1 for x in s.params.stop), default=0)
            end = max(s.emitted, len(s.text) - hold)
        text, s.emitted = s.text[s.emitted:end], end
        return StepOutput(s.request_id, text, bool(s.finish_reason), s.finish_reason,
                          prompt_tokens=s.prompt_tokens, completion_tokens=len(s.token_ids),
                          batch_size=len(self._running))

    def _keep_rows(self, keep: list[int]) -> None:
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._state, self._logits = None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._state = select_rows(self._state, index)
        self._logits = self._logits.index_select(0, index)
