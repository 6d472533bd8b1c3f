"""Continuous-batching generation for recurrent language models, in plain torch.

A recurrent model's whole per-request memory is a fixed-size hidden (and cell) vector, so the
engine keeps one batch of rows for all running requests: `step()` prefills requests that arrived,
advances every row by up to `num_tokens` tokens in one batched call per token, and retires rows
that finished or were aborted. With `prefill_chunk`, a step reads at most that many tokens of each
prompt: a recurrent prefill costs about one timestep per token of its longest prompt, whatever the
batch, so a long prompt is read across several steps (its state carried between them) while the
running rows keep decoding, and short prompts arriving meanwhile are read at once beside it. Texts to
score are read the same way: at most `prefill_chunk` tokens of each and at most MAX_SCORE_TEXTS texts per
step, their states carried between steps, so a step's scoring work is bounded whatever is queued.
Nothing here knows about TorchServe or HTTP.
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from rnnserve.engine.sampling import RowSampler, SamplingParams, random_seed, uniforms
from rnnserve.engine.state import LMState
from rnnserve.models.decode import Int8LSTMStep, decode_step, module_step
from rnnserve.models.graphed_decode import GraphedDecode
from rnnserve.models.graphs import GraphedStep
from rnnserve.models.lm import RNNLanguageModel, State, concat_rows, select_rows
from rnnserve.tokenizer import CharTokenizer

log = logging.getLogger(__name__)

# A character model has no beginning-of-text token: an empty prompt starts after a newline, where
# speeches in the corpus start.
EMPTY_PROMPT = "\n"
MAX_LOGPROBS = 5  # alternatives per token, as OpenAI's completions allow
MAX_SCORE_TEXTS = 16  # texts per scoring request, and texts read per step (one chunk each)
SCORE_CHUNK_VALUES = 2**25  # logits computed at once while scoring (rows x positions x vocabulary)


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
class TokenLogprob:
    """A token of the text, its natural-log probability under the model (before temperature, top-k and
    top-p), and the most likely tokens at its place when asked. The first token of a fresh prompt has
    nothing before it: its logprob is None."""
    token: str
    logprob: float | None
    top: list[tuple[str, float]] | None = None


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
    logprobs: list[TokenLogprob] | None = None  # the tokens of `text`, when asked
    prompt_logprobs: list[TokenLogprob] | None = None  # echo: the prompt's tokens, in the first output
    cumulative_logprob: float | None = None  # the whole generation's, when finished with logprobs asked
    state: LMState | None = None  # when finished and asked for: the state to continue from
    scores: list[dict] | None = None  # a scoring request's answer, one per text
    # token_logprobs of a scoring request, as its texts are read: (text index, the entries read this step)
    score_logprobs: list[tuple[int, list[TokenLogprob]]] | None = None


def merge_outputs(first: StepOutput, second: StepOutput) -> StepOutput:
    """Two consecutive outputs of one request as one (second is the later)."""
    def join(a, b):
        return None if a is None and b is None else (a or []) + (b or [])

    return replace(second, text=first.text + second.text, logprobs=join(first.logprobs, second.logprobs),
                   prompt_logprobs=join(first.prompt_logprobs, second.prompt_logprobs),
                   score_logprobs=join(first.score_logprobs, second.score_logprobs))


@dataclass
class _Score:
    """A scoring request, read chunk by chunk: each text is `context + its tokens`; position p's logits give
    token p + 1's logprob, so a text is read up to its last-but-one position."""
    request_id: str
    texts: list[str]
    seqs: list[list[int]]  # context + the text's tokens
    context: int  # tokens of context before each text
    token_logprobs: bool
    read: list[int] = field(default_factory=list)  # positions of each sequence read by earlier steps
    states: list[State | None] = field(default_factory=list)  # the state after them
    totals: list[float] = field(default_factory=list)

    def left(self, i: int) -> int:
        return len(self.seqs[i]) - 1 - self.read[i]


@dataclass
class _Sequence:
    request_id: str
    params: SamplingParams
    prompt_ids: list[int]
    seed: int  # the request's, or a random one: with the token's position, it makes the token's random number
    decoder: Any  # the tokenizer's text of each new token (CharDecoder, SubwordDecoder, WordDecoder)
    prompt_tokens: int = 0  # the caller's prompt length (an empty prompt counts 0)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already returned
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    init: LMState | None = None  # continue from this state instead of zeros
    logprobs: int | None = None  # None: no logprobs; n: the chosen token's and n alternatives
    echo: bool = False
    return_state: bool = False
    at_line_start: bool = True  # everything read so far ends a line
    entries: list[TokenLogprob] = field(default_factory=list)  # logprobs of token_ids
    entry_ends: list[int] = field(default_factory=list)  # len(text) after each of them
    entries_sent: int = 0
    prompt_entries: list[TokenLogprob] | None = None  # echo, until sent
    final_state: LMState | None = None
    read: int = 0  # prompt tokens read by earlier steps (a prompt read in chunks)
    partial: State | None = None  # the state after them, while the rest waits


def check_generation(ids: set[str], request_id: str, prompt: object, params: SamplingParams,
                     max_prompt_chars: int, max_tokens_limit: int) -> None:
    """The checks every engine makes of a generation request before it queues anything (ValueError)."""
    if request_id in ids:
        raise ValueError(f"duplicate request id {request_id!r}")
    if not isinstance(prompt, str):
        raise ValueError("prompt must be a string")
    if len(prompt) > max_prompt_chars:
        raise ValueError(f"prompt must be at most {max_prompt_chars} characters")
    params.validate(max_tokens_limit)


class LMEngine:
    def __init__(self, model: RNNLanguageModel, tokenizer: CharTokenizer, max_batch_size: int = 64,
                 max_tokens_limit: int = 2048, max_prompt_chars: int = 8192,
                 device: torch.device | str = "cpu", mkldnn_min_batch: int | None = None,
                 folded_step: bool = True, int8: bool = False, cuda_graphs: bool = False,
                 prefill_chunk: int | None = None, tokens_per_replay: int | None = None) -> None:
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 0):
            raise ValueError("prefill_chunk must be a non-negative integer or None")
        self.model = model.eval()
        # folded weights make a decode step a few GEMMs (models/decode.py); False steps the modules
        self._step = decode_step(self.model, int8) if folded_step else module_step(self.model)
        # an exact step (int8 at fixed scales) also reads prompts, so every row is independent of its batch
        self.exact = isinstance(self._step, Int8LSTMStep)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_tokens_limit = max_tokens_limit
        self.max_prompt_chars = max_prompt_chars
        self.device = torch.device(device)
        # one kernel launch per decode step on a GPU (models/graphs.py); ignored elsewhere
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda" and torch.cuda.is_available()
        # with CUDA graphs and `tokens_per_replay`: a step of that many tokens is one replay of a graph holding
        # sampling, logprobs and the model step for each of them (models/graphed_decode.py)
        self._graphed_decode: GraphedDecode | None = None
        if self.cuda_graphs and tokens_per_replay:
            self._graphed_decode = GraphedDecode(self._step, max_batch_size, tokens_per_replay, MAX_LOGPROBS)
        if self.cuda_graphs:
            self._step = GraphedStep(self._step, max_batch_size)
            dtype = self.model.embed.weight.dtype
            self._step.warm(lambda b: self.model.init_state(b, self.device, dtype), self.device)
        # oneDNN's recurrent kernels cost a fixed overhead per call that dominates small batches on
        # CPU; below this batch size decode steps run on torch's native kernels (BENCHMARKS.md).
        self.mkldnn_min_batch = mkldnn_min_batch
        # tokens of each prompt read per step (None or 0: no limit): bounds how long a long prompt holds
        # up the running rows' next tokens
        self.prefill_chunk = prefill_chunk or None
        self._waiting: list[_Sequence] = []  # in arrival order; a prompt being read in chunks stays here
        self._running: list[_Sequence] = []  # row i of the batch state belongs to _running[i]
        self._state: State | None = None
        self._logits: torch.Tensor | None = None  # (B, V) next-token logits of each running row
        self._ids: set[str] = set()
        self._scoring: list[_Score] = []

    # -- admission -----------------------------------------------------------------------------
    def add(self, request_id: str, prompt: str, params: SamplingParams, *, logprobs: int | None = None,
            echo: bool = False, state: LMState | None = None, return_state: bool = False) -> None:
        """Queue a request; raises ValueError (and keeps nothing) when its parameters are invalid.

        `state` continues a text the model read before (a session, or a state a client returned): the
        prompt is read after it, an empty prompt continues where the text stopped.
        """
        check_generation(self._ids, request_id, prompt, params, self.max_prompt_chars, self.max_tokens_limit)
        if logprobs is not None and not (isinstance(logprobs, int) and 0 <= logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}")
        if state is not None:
            ids = [state.pending] + self.tokenizer.encode(prompt)
            prompt_tokens = len(ids) - 1
            line_start = prompt.endswith("\n") if prompt else state.line_start
        else:
            ids = self.tokenizer.encode(prompt or EMPTY_PROMPT)
            if not ids:  # a prompt of nothing the vocabulary can spell (a word model's unknown words)
                ids = self.tokenizer.encode(EMPTY_PROMPT)
            prompt_tokens = len(ids) if prompt else 0
            line_start = not prompt or prompt.endswith("\n")
        seq = _Sequence(request_id, params, ids, params.seed if params.seed is not None else random_seed(),
                        self.tokenizer.decoder(line_start=line_start), prompt_tokens=prompt_tokens, init=state,
                        logprobs=logprobs, echo=echo, return_state=return_state, at_line_start=line_start)
        self._waiting.append(seq)
        self._ids.add(request_id)

    def add_score(self, request_id: str, texts: list[str], token_logprobs: bool = False) -> None:
        """Queue a scoring request: the log-probability of each text as a whole, read after a line break
        (where the model starts a text). Texts are read in chunks across steps, like prompts (_score)."""
        if request_id in self._ids:
            raise ValueError(f"duplicate request id {request_id!r}")
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a non-empty list of strings")
        if len(texts) > MAX_SCORE_TEXTS:
            raise ValueError(f"at most {MAX_SCORE_TEXTS} texts per scoring request")
        if any(len(t) > self.max_prompt_chars for t in texts):
            raise ValueError(f"each text must be at most {self.max_prompt_chars} characters")
        context = self.tokenizer.encode(EMPTY_PROMPT)
        n = len(texts)
        self._scoring.append(_Score(request_id, list(texts), [context + self.tokenizer.encode(t) for t in texts],
                                    len(context), bool(token_logprobs), [0] * n, [None] * n, [0.0] * n))
        self._ids.add(request_id)

    def abort(self, request_id: str) -> bool:
        """Forget a request (client gone); its batch row is freed at once."""
        if request_id not in self._ids:
            return False
        self._ids.discard(request_id)
        self._waiting = [s for s in self._waiting if s.request_id != request_id]
        self._scoring = [j for j in self._scoring if j.request_id != request_id]
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
        return bool(self._running or self._waiting or self._scoring)

    # -- stepping ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, num_tokens: int = 1, budget_s: float | None = None,
             stop: Callable[[], bool] | None = None) -> list[StepOutput]:
        """Admit waiting requests, then decode up to `num_tokens` tokens for every running request.

        With `budget_s`, decoding also stops once the step (prefill included) has lasted that long,
        after at least one token. A clock, not a per-token estimate, because one token's cost moves
        with the batch size, and a step that prefilled new prompts should release their first tokens
        without adding a full budget of decoding on top. `stop`, asked after each token, ends the step
        early too (after at least one token): a server cuts a step short when new requests arrive.
        """
        t0 = time.perf_counter()
        scored = self._score()
        self._admit()
        if not self._running:
            return scored
        # no row runs past its max_tokens: the step ends where the longest remaining one does
        room = max(s.params.max_tokens - len(s.token_ids) for s in self._running)
        self._decode(min(num_tokens, room), t0, budget_s, stop)
        outputs = [self._output(s) for s in self._running]
        alive = [i for i, s in enumerate(self._running) if not s.finish_reason]
        if len(alive) != len(self._running):
            for s in self._running:
                if s.finish_reason:
                    self._ids.discard(s.request_id)
            self._keep_rows(alive)
        return scored + outputs

    def _admit(self) -> None:
        """Read waiting prompts while rows are free, each up to `prefill_chunk` more tokens, all in one packed
        prefill; a longer prompt goes on next step. Prompts read to their end join the running batch."""
        room = self.max_batch_size - len(self._running)
        if room <= 0 or not self._waiting:
            return
        chunk = self.prefill_chunk
        # an empty prompt after a state is the step a longer request would have run next: run that same
        # decode step, so that continuing is exact; everything else is read by one packed prefill
        stepped: list[_Sequence] = []
        reads: list[tuple[_Sequence, int]] = []  # (sequence, prompt position it is read to)
        for s in self._waiting:
            if len(stepped) + len(reads) >= room:
                break
            if s.init is not None and len(s.prompt_ids) == 1:
                stepped.append(s)  # a decode step, not a prompt: no budget
            else:
                reads.append((s, len(s.prompt_ids) if chunk is None else min(len(s.prompt_ids), s.read + chunk)))
        done = [i for i, (s, end) in enumerate(reads) if end == len(s.prompt_ids)]  # read to the end this step
        read = [reads[i][0] for i in done]
        echo = [(s, s.read, end, self._read_from(s)) for s, end in reads if s.echo and s.logprobs is not None]
        echo += [(s, 0, 1, None) for s in stepped if s.echo and s.logprobs is not None]
        if reads:
            logits, state = self._prefill(reads)
            if len(read) != len(reads):  # the row of a prompt read in part keeps its state for next step
                for i, (s, end) in enumerate(reads):
                    if end < len(s.prompt_ids):
                        s.partial = select_rows(state, torch.tensor([i], device=self.device))
                index = torch.tensor(done, dtype=torch.long, device=self.device)
                logits, state = logits.index_select(0, index), select_rows(state, index)
            for s, end in reads:
                s.read = end
        if echo:
            self._echo(echo)
        for s in read:
            s.partial = None
        if read:
            self._append(read, logits, state)
        if stepped:
            tokens = torch.tensor([s.prompt_ids[0] for s in stepped], dtype=torch.long, device=self.device)
            with mkldnn_enabled(self._use_mkldnn(len(stepped))):
                logits, state = self._step(tokens, _cat_states([s.init.layers for s in stepped]))
            self._append(stepped, logits, state)
        joined = {id(s) for s in read + stepped}
        self._waiting = [s for s in self._waiting if id(s) not in joined]

    def _read_from(self, s: _Sequence) -> State | None:
        """The state the rest of a prompt is read from: after its earlier chunks, else its `init`, else None
        (zeros)."""
        if s.read:
            return s.partial
        return s.init.layers if s.init is not None else None

    def _prefill(self, reads: list[tuple[_Sequence, int]]) -> tuple[torch.Tensor, State]:
        """Read each prompt from where it stopped to `end`, all in one packed batch: logits and state per
        read, in order. Identical fresh prompts read whole are read once and their state copied (n > 1
        and best_of send the same prompt several times)."""
        unique: dict[tuple[int, ...], int] = {}
        prompts, inits, rows = [], [], []
        for s, end in reads:
            whole = s.read == 0 and end == len(s.prompt_ids)
            key = tuple(s.prompt_ids) if whole and s.init is None else None
            if key is not None and key in unique:
                rows.append(unique[key])
                continue
            if key is not None:
                unique[key] = len(prompts)
            rows.append(len(prompts))
            prompts.append(s.prompt_ids[s.read:end])
            inits.append(self._read_from(s))
        initial = None
        if any(i is not None for i in inits):
            dtype = self.model.embed.weight.dtype
            initial = _cat_states([i if i is not None else self.model.init_state(1, self.device, dtype)
                                   for i in inits])
        with mkldnn_enabled(self._use_mkldnn(len(prompts))):
            if self.exact:
                logits, state = self._read_by_steps(prompts, initial)
            else:
                logits, state = self.model.prefill(prompts, initial)
        if len(prompts) != len(reads):
            index = torch.tensor(rows, dtype=torch.long, device=self.device)
            logits, state = logits.index_select(0, index), select_rows(state, index)
        return logits, state

    def _read_by_steps(self, prompts: list[list[int]], initial: State | None) -> tuple[torch.Tensor, State]:
        """Prompts read through the decode step, one token per call, so that a row's state is the same bits
        whichever prompts are read beside it (a packed fp32 prefill's GEMMs round by the batch's shape).
        Longest first, so that the rows still reading are always a prefix of the batch."""
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        lengths = [len(prompts[i]) for i in order]
        dtype = self.model.embed.weight.dtype
        index = torch.tensor(order, dtype=torch.long, device=self.device)
        state = (select_rows(initial, index) if initial is not None
                 else self.model.init_state(len(prompts), self.device, dtype))
        tokens = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
        for r, i in enumerate(order):
            tokens[r, : lengths[r]] = torch.tensor(prompts[i])
        tokens = tokens.to(self.device)
        logits: torch.Tensor | None = None
        for t in range(max(lengths)):
            n = sum(1 for length in lengths if length > t)  # rows whose prompt has a token t
            out, new = self._step(tokens[:n, t], [tuple(x[:, :n] for x in layer) for layer in state])
            if n == len(prompts):
                state, logits = new, out
            else:  # the rows past n keep the state and logits of their last token
                state = [tuple(torch.cat([a, b[:, n:]], 1) for a, b in zip(la, lb)) for la, lb in zip(new, state)]
                logits = torch.cat([out, logits[n:]], 0)
        back = torch.empty_like(index)
        back[index] = torch.arange(len(order), device=self.device)
        return logits.index_select(0, back), select_rows(state, back)

    def _append(self, seqs: list[_Sequence], logits: torch.Tensor, state: State) -> None:
        if self._state is None:
            self._state, self._logits = state, logits
        else:
            self._state = concat_rows(self._state, state)
            self._logits = torch.cat([self._logits, logits], 0)
        self._running.extend(seqs)

    def _echo(self, parts: list[tuple[_Sequence, int, int, State | None]]) -> None:
        """The prompt's own token logprobs (OpenAI's `echo`): each part read this step, prompt_ids[start:end]
        from `initial`, read again with every position's logits, so a prompt read in chunks is echoed chunk
        by chunk. Position i's logits give token i + 1's logprob, up to the prompt's last token."""
        for s, start, end, initial in parts:  # one at a time: echo is rare and prompts differ in length
            ids = s.prompt_ids
            targets = ids[start + 1: end + 1]
            entries = []
            # a fresh prompt's first token has nothing before it; an empty prompt is a line break the caller
            # did not send; after a state, the first token is the pending one, already returned
            if start == 0 and s.init is None and s.prompt_tokens > 0:
                entries.append(TokenLogprob(self.tokenizer.token_text(ids[0]), None, None))
            if targets:
                logits, _ = self.model.prefill([ids[start:end]], initial, every_position=True)
                lp = torch.log_softmax(logits[0, : len(targets)].float(), -1)
                entries += self._entries(lp, targets, s.logprobs or 0)
            s.prompt_entries = (s.prompt_entries or []) + entries

    def _entries(self, lp: torch.Tensor, targets: list[int], top: int) -> list[TokenLogprob]:
        """lp (T, V) log-probabilities, targets (T,) -> a TokenLogprob per target."""
        if not targets:
            return []
        index = torch.tensor(targets, dtype=torch.long, device=lp.device)
        chosen = lp.gather(1, index.unsqueeze(1)).squeeze(1).tolist()
        alts = [None] * len(targets)
        if top:
            values, ids = lp.topk(top, dim=-1)
            alts = [[(self.tokenizer.token_text(i), v) for i, v in zip(row_i, row_v)]
                    for row_i, row_v in zip(ids.tolist(), values.tolist())]
        return [TokenLogprob(self.tokenizer.token_text(t), c, a) for t, c, a in zip(targets, chosen, alts)]

    def _score(self) -> list[StepOutput]:
        """Read the next chunk of queued scoring texts, in arrival order, all in one packed batch: at most
        `prefill_chunk` tokens of each and MAX_SCORE_TEXTS texts (fewer where the logits would pass
        SCORE_CHUNK_VALUES), so a step's scoring costs about what a step's prompt reading costs, however
        many or long the texts queued. A request ends in the step that reads its last text's end."""
        if not self._scoring:
            return []
        V = self.model.config.vocab_size
        chunk = max(1, SCORE_CHUNK_VALUES // V)
        if self.prefill_chunk is not None:
            chunk = min(chunk, self.prefill_chunk)
        reads: list[tuple[_Score, int, int, int]] = []  # (job, text, from, to) positions read this step
        longest = 0
        for job in self._scoring:
            for i in range(len(job.seqs)):
                n = min(job.left(i), chunk)
                if n <= 0:
                    continue
                if reads and (len(reads) >= MAX_SCORE_TEXTS or (len(reads) + 1) * max(longest, n) * V
                              > SCORE_CHUNK_VALUES):
                    break
                longest = max(longest, n)
                reads.append((job, i, job.read[i], job.read[i] + n))
            else:
                continue
            break
        parts: dict[int, list[tuple[int, list[TokenLogprob]]]] = {}  # id(job) -> entries read this step
        if reads:
            inits = [job.states[i] for job, i, _, _ in reads]
            initial = None
            if any(x is not None for x in inits):
                dtype = self.model.embed.weight.dtype
                initial = _cat_states([x if x is not None else self.model.init_state(1, self.device, dtype)
                                       for x in inits])
            with mkldnn_enabled(self._use_mkldnn(len(reads))):
                logits, state = self.model.prefill([job.seqs[i][a:b] for job, i, a, b in reads], initial,
                                                   every_position=True)
            for r, (job, i, a, b) in enumerate(reads):
                first = max(a, job.context - 1)  # the context's own tokens are not scored
                targets = job.seqs[i][first + 1: b + 1]
                entries = []
                if targets:
                    lp = torch.log_softmax(logits[r, first - a: b - a].float(), -1)
                    entries = self._entries(lp, targets, 0)
                job.totals[i] += sum(e.logprob for e in entries)
                job.read[i] = b
                job.states[i] = select_rows(state, torch.tensor([r], device=self.device)) if job.left(i) else None
                if job.token_logprobs and entries:
                    parts.setdefault(id(job), []).append((i, entries))
        outputs, waiting = [], []
        for job in self._scoring:
            done = all(job.left(i) <= 0 for i in range(len(job.seqs)))
            part = parts.get(id(job))
            if not done:
                waiting.append(job)
                if part:
                    outputs.append(StepOutput(job.request_id, "", batch_size=len(reads), score_logprobs=part))
                continue
            self._ids.discard(job.request_id)
            scores = [{"text": t, "logprob": total, "tokens": len(seq) - job.context}
                      for t, seq, total in zip(job.texts, job.seqs, job.totals)]
            outputs.append(StepOutput(job.request_id, "", True, "stop",
                                      prompt_tokens=sum(len(x) - job.context for x in job.seqs),
                                      batch_size=len(reads), scores=scores,
                                      score_logprobs=(part or []) if job.token_logprobs else None))
        self._scoring = waiting
        return outputs

    def _decode(self, num_tokens: int, t0: float, budget_s: float | None,
                stop: Callable[[], bool] | None = None) -> None:
        """Decode up to `num_tokens` tokens for every running row, all on the device, then read them back
        at once: the step's only host sync. Text, stop strings, logprobs and states are then settled on
        the host, token by token. A row that finished inside the step decodes on until the step ends
        (its extra tokens are dropped), which costs less than a sync per token on a GPU."""
        seqs = self._running
        dev = self.device
        temperature = torch.tensor([s.params.temperature for s in seqs], device=dev)
        top_k = torch.tensor([s.params.top_k for s in seqs], dtype=torch.long, device=dev)
        top_p = torch.tensor([s.params.top_p for s in seqs], device=dev)
        seeds = torch.tensor([s.seed for s in seqs], dtype=torch.long, device=dev)
        positions = torch.tensor([len(s.token_ids) for s in seqs], dtype=torch.long, device=dev)
        lp_rows = [i for i, s in enumerate(seqs) if s.logprobs is not None]
        lp_index = torch.tensor(lp_rows, dtype=torch.long, device=dev)
        top_n = max((seqs[i].logprobs for i in lp_rows), default=0)
        state_rows = [i for i, s in enumerate(seqs) if s.return_state]
        state_index = torch.tensor(state_rows, dtype=torch.long, device=dev)
        steps: list[torch.Tensor] = []
        chosen, top_values, top_ids = [], [], []
        states: list[State] = []  # per token, the return_state rows' state before it was read
        graphed = self._graphed_decode
        if graphed is not None and num_tokens == graphed.n and not state_rows:
            with mkldnn_enabled(self._use_mkldnn(len(seqs))):
                out = graphed(self._logits, temperature, top_k, top_p, seeds, positions, self._state)
            self._logits, self._state = out.logits, out.state
            steps = list(out.tokens.unbind(1))
            if lp_rows:
                chosen = list(out.chosen.index_select(0, lp_index).unbind(1))
                if top_n:
                    top_values = list(out.top_values.index_select(0, lp_index)[:, :, :top_n].unbind(1))
                    top_ids = list(out.top_ids.index_select(0, lp_index)[:, :, :top_n].unbind(1))
            num_tokens = 0  # decoded
        # what the rows' parameters settle is settled once per step, and the rows' uniforms for all its tokens
        # are drawn at once (when a row first samples), not token by token
        sampler = RowSampler(temperature, top_k, top_p) if num_tokens else None
        grid: list[torch.Tensor] = []

        def draw(j: int) -> torch.Tensor:
            if not grid:
                grid.append(uniforms(seeds.unsqueeze(1), positions.unsqueeze(1) + torch.arange(num_tokens, device=dev)))
            return grid[0][:, j]

        with mkldnn_enabled(self._use_mkldnn(len(seqs))):
            for j in range(num_tokens):
                tokens = sampler(self._logits, functools.partial(draw, j))
                if lp_rows:
                    lp = torch.log_softmax(self._logits.index_select(0, lp_index).float(), -1)
                    chosen.append(lp.gather(1, tokens.index_select(0, lp_index).unsqueeze(1)).squeeze(1))
                    if top_n:
                        values, ids = lp.topk(top_n, dim=-1)
                        top_values.append(values)
                        top_ids.append(ids)
                if state_rows:
                    states.append(select_rows(self._state, state_index))
                self._logits, self._state = self._step(tokens, self._state)
                steps.append(tokens)
                if (budget_s is not None and time.perf_counter() - t0 >= budget_s) or (stop is not None and stop()):
                    break
        toks = torch.stack(steps, 1).tolist()  # (B, n): the one sync
        lps = torch.stack(chosen, 1).tolist() if chosen else []
        tops = (torch.stack(top_values, 1).tolist(), torch.stack(top_ids, 1).tolist()) if top_values else None
        lp_of = {i: r for r, i in enumerate(lp_rows)}
        state_of = {i: r for r, i in enumerate(state_rows)}
        for i, s in enumerate(seqs):
            if i not in lp_of and not s.params.stop:
                # no logprobs and no stop string: only max_tokens ends the row, so its tokens settle at once
                row = toks[i][: s.params.max_tokens - len(s.token_ids)]
                s.token_ids += row
                new = "".join(map(s.decoder.add, row))
                s.text += new
                if new:
                    s.at_line_start = new.endswith("\n")
                if len(s.token_ids) >= s.params.max_tokens:
                    s.finish_reason = "length"
                    if s.return_state:
                        s.final_state = self._final_state(s, states[len(row) - 1], state_of[i])
                continue
            for j, tok in enumerate(toks[i]):
                s.token_ids.append(tok)
                new = s.decoder.add(tok)
                s.text += new
                if new:
                    s.at_line_start = new.endswith("\n")
                if i in lp_of:
                    r = lp_of[i]
                    top = None
                    if s.logprobs and tops is not None:
                        top = [(self.tokenizer.token_text(t), v)
                               for v, t in zip(tops[0][r][j][: s.logprobs], tops[1][r][j][: s.logprobs])]
                    s.entries.append(TokenLogprob(self.tokenizer.token_text(tok), lps[r][j], top))
                    s.entry_ends.append(len(s.text))
                self._check_stop(s, len(new))
                if s.finish_reason:
                    if s.return_state:
                        s.final_state = self._final_state(s, states[j], state_of[i])
                    break

    def _final_state(self, s: _Sequence, before: State, row: int) -> LMState:
        """The state to continue `s` from: the state before its last token was read (`before`, row `row` of the
        step's return_state rows), that token kept pending."""
        layers = select_rows(before, torch.tensor([row], device=self.device))
        return LMState(layers, s.token_ids[-1], (s.init.tokens if s.init else 0) + len(s.prompt_ids)
                       + len(s.token_ids) - 1, s.at_line_start)

    def _use_mkldnn(self, batch: int) -> bool:
        # the exact step's integer GEMMs run on oneDNN (without it torch._int_mm takes a slow reference path)
        return self.exact or (self.mkldnn_min_batch is not None and batch >= self.mkldnn_min_batch)

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
        out = StepOutput(s.request_id, text, bool(s.finish_reason), s.finish_reason,
                         prompt_tokens=s.prompt_tokens, completion_tokens=len(s.token_ids),
                         batch_size=len(self._running))
        if s.logprobs is not None:
            # the tokens whose text went out; a token cut by a stop string never does
            n = s.entries_sent
            while n < len(s.entries) and s.entry_ends[n] <= end:
                n += 1
            out.logprobs, s.entries_sent = s.entries[s.entries_sent:n], n
            if s.finish_reason:
                out.cumulative_logprob = sum(e.logprob for e in s.entries[:n])
        if s.prompt_entries is not None:
            out.prompt_logprobs, s.prompt_entries = s.prompt_entries, None
        if s.finish_reason:
            out.state = s.final_state
        return out

    def _keep_rows(self, keep: list[int]) -> None:
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._state, self._logits = None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._state = select_rows(self._state, index)
        self._logits = self._logits.index_select(0, index)


def _cat_states(states: list[State]) -> State:
    return functools.reduce(concat_rows, states)
