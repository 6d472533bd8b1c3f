"""A language-model engine that costs nothing per token, for measuring the serving path alone.

`SyntheticEngine` speaks `LMEngine`'s interface (add, step, abort, request_ids, has_work) and produces
deterministic text without any model arithmetic: each request's completion is a fixed passage read from
an offset given by its seed (0 without one), one character per token. A decode step of the whole batch
takes `token_ms` of wall time (slept, not computed: like a GPU, whatever the batch), so a step with a
budget makes as many tokens as fit in it, as `LMEngine` does, and the handler, TorchServe's frontend, the
gateway and the client are all that costs CPU. `token_ms` 0 gives `num_tokens` tokens at once. Stop strings
and max_tokens end a request exactly as in `LMEngine` (the text stops before the stop string; a possible stop
string's start is held back until it is known).

A model folder is served with this engine when its config.json says `"engine": "synthetic"`, with
`"synthetic_token_ms"` its step time (`rnnserve bench serving` makes one from lm-shakespeare).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from rnnserve.engine.lm_engine import StepOutput, check_generation
from rnnserve.engine.sampling import SamplingParams

PASSAGE = ("Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds "
           "that lour'd upon our house in the deep bosom of the ocean buried.\n")


@dataclass
class _Stream:
    request_id: str
    params: SamplingParams
    prompt_tokens: int
    offset: int
    tokens: int = 0
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None


class SyntheticEngine:
    def __init__(self, max_batch_size: int = 64, max_tokens_limit: int = 2048, max_prompt_chars: int = 8192,
                 token_ms: float = 0.0) -> None:
        self.token_s = token_ms / 1000
        self.max_batch_size = max_batch_size
        self.max_tokens_limit = max_tokens_limit
        self.max_prompt_chars = max_prompt_chars
        self._waiting: list[_Stream] = []
        self._running: list[_Stream] = []
        self._ids: set[str] = set()

    def add(self, request_id: str, prompt: str, params: SamplingParams, *, logprobs: int | None = None,
            echo: bool = False, state=None, return_state: bool = False) -> None:
        """Queue a request; ValueError for what this engine cannot do or the caller got wrong."""
        check_generation(self._ids, request_id, prompt, params, self.max_prompt_chars, self.max_tokens_limit)
        if logprobs is not None or echo or state is not None or return_state:
            raise ValueError("the synthetic engine has no logprobs, echo or states")
        offset = (params.seed or 0) % len(PASSAGE)
        self._waiting.append(_Stream(request_id, params, len(prompt), offset))
        self._ids.add(request_id)

    def add_score(self, request_id: str, texts: list[str], token_logprobs: bool = False) -> None:
        raise ValueError("the synthetic engine does not score texts")

    def abort(self, request_id: str) -> bool:
        if request_id not in self._ids:
            return False
        self._ids.discard(request_id)
        self._waiting = [s for s in self._waiting if s.request_id != request_id]
        self._running = [s for s in self._running if s.request_id != request_id]
        return True

    def request_ids(self) -> list[str]:
        return list(self._ids)

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def step(self, num_tokens: int = 1, budget_s: float | None = None,
             stop: Callable[[], bool] | None = None) -> list[StepOutput]:
        """Admit waiting requests up to the batch size, then give each running one up to `num_tokens` tokens:
        as many as `budget_s` holds at `token_ms` each (at least one), fewer where `stop`, asked after each
        token, says so (as LMEngine.step)."""
        room = self.max_batch_size - len(self._running)
        if room > 0 and self._waiting:
            self._running += self._waiting[:room]
            del self._waiting[:room]
        if not self._running:
            return []
        if self.token_s:
            if budget_s is not None:
                num_tokens = max(1, min(num_tokens, int(budget_s / self.token_s)))
            num_tokens = min(num_tokens, max(s.params.max_tokens - s.tokens for s in self._running))
            if stop is None:
                time.sleep(num_tokens * self.token_s)
            else:  # token by token, on absolute times so that the checks add no drift
                start, done = time.monotonic(), 0
                while done < num_tokens:
                    done += 1
                    time.sleep(max(0.0, start + done * self.token_s - time.monotonic()))
                    if stop():
                        break
                num_tokens = done
        outputs = []
        for s in self._running:
            self._extend(s, min(num_tokens, s.params.max_tokens - s.tokens))
            outputs.append(self._output(s, len(self._running)))
        if any(s.finish_reason for s in self._running):
            for s in self._running:
                if s.finish_reason:
                    self._ids.discard(s.request_id)
            self._running = [s for s in self._running if not s.finish_reason]
        return outputs

    @staticmethod
    def _extend(s: _Stream, n: int) -> None:
        start = (s.offset + s.tokens) % len(PASSAGE)
        new = (PASSAGE[start:] + PASSAGE * (1 + n // len(PASSAGE)))[:n]
        before = len(s.text)
        s.text += new
        s.tokens += n
        for stop in s.params.stop:  # only the tail can hold a new match
            pos = s.text.find(stop, max(0, before - len(stop) + 1))
            if pos != -1:
                s.text = s.text[:pos]
                s.finish_reason = "stop"
                return
        if s.tokens >= s.params.max_tokens:
            s.finish_reason = "length"

    @staticmethod
    def _output(s: _Stream, batch: int) -> StepOutput:
        if s.finish_reason:
            end = len(s.text)
        else:  # hold back what could be the start of a stop string
            end = max(s.emitted, len(s.text) - max((len(x) - 1 for x in s.params.stop), default=0))
        text, s.emitted = s.text[s.emitted:end], end
        return StepOutput(s.request_id, text, bool(s.finish_reason), s.finish_reason, prompt_tokens=s.prompt_tokens,
                          completion_tokens=s.tokens, batch_size=batch)
