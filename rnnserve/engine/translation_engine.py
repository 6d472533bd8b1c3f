"""Continuous-batching beam search for the attention encoder-decoder, in plain torch.

Every sentence of every request owns `beam_size` consecutive rows of one running batch (greedy is
a beam of one). `step()` encodes the sentences that arrived, advances all rows by one token with a
single decoder call, picks each sentence's next beams (sentences with the same beam width are
ranked together, vectorised), reorders the rows and retires finished sentences. Sentences of
different source lengths share the batch: encoder outputs are right-padded and masked.

A finished beam keeps its score and extends only with padding, so it competes until the sentence
ends; the best hypothesis is chosen by score / ((5 + length) / 6) ** alpha (GNMT length penalty).

The search stays on the device: a step reads back one packed tensor (each row's source beam, token,
score and length), and the host keeps the token histories and settles which sentences are done from
those numbers. The row layout of each beam width is cached between admissions and retirements, so a
step copies nothing from the host either.
"""
from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rnnserve.engine.lm_engine import mkldnn_enabled
from rnnserve.models.seq2seq import BOS, EOS, PAD, Seq2Seq
from rnnserve.models.seq2seq_decode import Int8GRUDecoderStep, Int8GRUEncoder, int8_supported

log = logging.getLogger(__name__)

MAX_BEAM = 8
SCORE_STEP_VALUES = 2**25  # logits of one step's forced decoding (rows x positions x vocabulary)


@dataclass
class TranslationParams:
    beam_size: int = 4
    max_tokens: int | None = None  # None: 2 * source length + 10
    length_penalty: float = 0.6
    return_attention: bool = False
    n_best: int = 1  # hypotheses returned per sentence, best first (at most beam_size)
    return_alignment: bool = False  # the most-attended source token of each output token

    def validate(self, max_tokens_limit: int) -> None:
        if not isinstance(self.beam_size, int) or not 1 <= self.beam_size <= MAX_BEAM:
            raise ValueError(f"beam_size must be between 1 and {MAX_BEAM}")
        if not isinstance(self.n_best, int) or not 1 <= self.n_best <= self.beam_size:
            raise ValueError("n_best must be between 1 and beam_size")
        if self.max_tokens is not None and not (isinstance(self.max_tokens, int)
                                                and 1 <= self.max_tokens <= max_tokens_limit):
            raise ValueError(f"max_tokens must be between 1 and {max_tokens_limit}")
        if not 0.0 <= float(self.length_penalty) <= 2.0:
            raise ValueError("length_penalty must be between 0 and 2")


@dataclass
class Hypothesis:
    tokens: list[int]  # without <bos>/<eos>
    logprob: float  # natural log of P(tokens, <eos> when finished | source)
    score: float  # logprob / GNMT length penalty: what ranks the hypotheses


@dataclass
class SentenceResult:
    tokens: list[int]  # best hypothesis, without <bos>/<eos>
    score: float
    finish_reason: str  # "stop" (ended with <eos>) | "length"
    attention: list[list[float]] | None = None
    hypotheses: list[Hypothesis] | None = None  # n_best > 1: the best first
    alignment: list[int] | None = None  # per output token, the index of its most-attended source token


def length_penalty(length: int | torch.Tensor, alpha: float):
    """GNMT's ((5 + length) / 6) ** alpha: the score of a hypothesis is its logprob divided by this."""
    return ((5.0 + length) / 6.0) ** alpha


@dataclass
class TranslationOutput:
    request_id: str
    new_tokens: dict[int, list[int]]  # sentence index -> tokens now certain (shared by every beam)
    finished: bool = False
    results: list[SentenceResult] | None = None  # when finished, in input order
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_size: int = 0  # rows (beams of all sentences) decoded together in this step
    scores: list[dict] | None = None  # a scoring request's answer, one per candidate


def merge_outputs(a: TranslationOutput, b: TranslationOutput) -> TranslationOutput:
    """Two consecutive steps' outputs of one request as one (b is the later)."""
    tokens = {i: list(t) for i, t in a.new_tokens.items()}
    for i, t in b.new_tokens.items():
        tokens.setdefault(i, []).extend(t)
    return TranslationOutput(a.request_id, tokens, b.finished, b.results, b.prompt_tokens, b.completion_tokens,
                             max(a.batch_size, b.batch_size), b.scores)


@dataclass
class _Sentence:
    request_id: str
    index: int
    src: list[int]
    K: int
    max_len: int
    alpha: float
    attention: bool  # keep attention weights (asked for them, or for alignments)
    return_attention: bool = False
    n_best: int = 1
    alignment: bool = False
    prefix: list[int] = field(default_factory=list)  # target tokens the output must start with
    steps: int = 0
    emitted: int = 0
    done: bool = False
    result: SentenceResult | None = None


@dataclass
class _Request:
    request_id: str
    sentences: list[_Sentence]


@dataclass
class _Score:
    request_id: str
    source: list[int]
    candidates: list[list[int]]
    alpha: float
    token_logprobs: bool


class TranslationEngine:
    def __init__(self, model: Seq2Seq, max_rows: int = 256, max_tokens_limit: int = 256,
                 max_source_tokens: int = 256, device: torch.device | str = "cpu", int8: bool = False) -> None:
        self.model = model.eval()
        self.max_rows = max_rows
        self.max_tokens_limit = max_tokens_limit
        self.max_source_tokens = max_source_tokens
        self.device = torch.device(device)
        # int8: the encoder and the decoder step in exact int8 (models/seq2seq_decode.py), on CPU, for a GRU
        # model with a bidirectional encoder, so a row's numbers are the same bits in any batch
        self.int8 = int8 and self.device.type == "cpu" and int8_supported(model)
        if int8 and not self.int8:
            log.warning("int8 needs a GRU model on CPU: translating in %s instead",
                        next(model.parameters()).dtype)
        self._decode = Int8GRUDecoderStep(model.decoder) if self.int8 else model.decoder.step
        self._encode = Int8GRUEncoder(model) if self.int8 else model.encode
        self._requests: dict[str, _Request] = {}
        self._queue: list[_Sentence] = []  # sentences waiting for rows, in arrival order
        self._running: list[_Sentence] = []  # each owns K consecutive rows, in this order
        self._ready: set[str] = set()  # requests finished without decoding (only empty texts)
        self._scoring: list[_Score] = []
        self._last_rows = 0
        # per-row tensors
        self._enc = self._keys = self._mask = self._state = self._prev = None
        self._scores = self._finished = self._lengths = None
        self._hist: list[list[int]] = []
        self._attn: list[list[torch.Tensor]] = []
        self._groups: list[tuple[int, torch.Tensor]] | None = None  # (K, rows) per beam width; None: stale
        self._masks: dict[int, torch.Tensor] = {}  # vocab size -> the log-probs of a finished beam

    # -- admission -----------------------------------------------------------------------------
    def add(self, request_id: str, sources: list[list[int]], params: TranslationParams,
            prefixes: list[list[int]] | None = None) -> None:
        """Queue sentences to translate; `prefixes` (one per sentence) force the start of each output."""
        if request_id in self._requests or request_id in self._scoring_ids():
            raise ValueError(f"duplicate request id {request_id!r}")
        params.validate(self.max_tokens_limit)
        if not sources:
            raise ValueError("at least one text is needed")
        if params.beam_size > self.max_rows:
            raise ValueError("beam_size exceeds the engine's rows")
        if prefixes is not None and len(prefixes) != len(sources):
            raise ValueError("one target prefix per text is needed")
        sents = []
        for i, src in enumerate(sources):
            if len(src) > self.max_source_tokens:
                raise ValueError(f"text {i} has {len(src)} tokens; at most {self.max_source_tokens} are allowed")
            prefix = list(prefixes[i]) if prefixes is not None else []
            if any(t in (PAD, BOS, EOS) for t in prefix):
                raise ValueError("a target prefix holds only tokens of the output")
            max_len = len(prefix) + (params.max_tokens or min(self.max_tokens_limit, 2 * len(src) + 10))
            s = _Sentence(request_id, i, list(src), params.beam_size, max_len, float(params.length_penalty),
                          params.return_attention or params.return_alignment, params.return_attention,
                          params.n_best, params.return_alignment, prefix)
            if not src and prefix:
                raise ValueError("a target prefix needs a text to translate")
            if not src:  # nothing to translate: done without decoding
                s.done, s.result = True, SentenceResult(
                    [], 0.0, "stop", [] if params.return_attention else None,
                    [Hypothesis([], 0.0, 0.0)] if params.n_best > 1 else None, [] if params.return_alignment else None)
            sents.append(s)
        self._requests[request_id] = _Request(request_id, sents)
        self._queue.extend(s for s in sents if not s.done)
        if all(s.done for s in sents):
            self._ready.add(request_id)

    def add_score(self, request_id: str, source: list[int], candidates: list[list[int]],
                  length_penalty: float = 0.6, token_logprobs: bool = False) -> None:
        """Queue forced decoding: log P(candidate, <eos> | source) of each candidate, by the same model
        arithmetic as beam search. All scoring requests of a step run in one batch."""
        if request_id in self._requests or request_id in self._scoring_ids():
            raise ValueError(f"duplicate request id {request_id!r}")
        if not candidates:
            raise ValueError("at least one candidate is needed")
        if len(source) > self.max_source_tokens or any(len(c) > self.max_tokens_limit for c in candidates):
            raise ValueError(f"texts must be at most {self.max_source_tokens} source and {self.max_tokens_limit} "
                             "target tokens")
        if not 0.0 <= float(length_penalty) <= 2.0:
            raise ValueError("length_penalty must be between 0 and 2")
        self._scoring.append(_Score(request_id, list(source), [list(c) for c in candidates], float(length_penalty),
                                    bool(token_logprobs)))

    def _scoring_ids(self) -> set[str]:
        return {j.request_id for j in self._scoring}

    def abort(self, request_id: str) -> bool:
        if request_id in self._scoring_ids():
            self._scoring = [j for j in self._scoring if j.request_id != request_id]
            return True
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        self._queue = [s for s in self._queue if s.request_id != request_id]
        self._ready.discard(request_id)
        if any(s.request_id == request_id for s in self._running):
            self._retire(lambda s: s.request_id == request_id)
        return True

    def request_ids(self) -> list[str]:
        return list(self._requests) + [j.request_id for j in self._scoring]

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests or request_id in self._scoring_ids()

    def has_work(self) -> bool:
        return bool(self._running or self._queue or self._ready or self._scoring)

    @property
    def num_rows(self) -> int:
        return len(self._hist)

    # -- stepping ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[TranslationOutput]:
        scored = self._score()
        self._admit()
        ready, self._ready = self._ready, set()
        if not self._running:
            return scored + [self._output(self._requests[rid], {}) for rid in ready]
        touched = list(dict.fromkeys(s.request_id for s in self._running)) + list(ready)
        self._last_rows = len(self._hist)
        # torch._int_mm needs oneDNN (without it, a reference path several times slower)
        with mkldnn_enabled(True) if self.int8 else nullcontext():
            logits, state, weights = self._decode(self._prev, self._state, self._keys, self._enc, self._mask)
        logp = F.log_softmax(logits.float(), dim=-1)
        logp[:, PAD] = logp[:, BOS] = float("-inf")  # never words of the output
        # a finished beam only extends with padding, at no cost. On the CPU a boolean index writes just
        # those rows; elsewhere it would sync (its row count), so the whole tensor is selected instead
        if self.device.type == "cpu":
            logp[self._finished] = self._finished_row(logp.size(-1))
        else:
            logp = torch.where(self._finished.unsqueeze(1), self._finished_row(logp.size(-1)), logp)
        self._force_prefixes(logp)
        index, tokens = self._select(logp)
        self._state = tuple(s[index] for s in state) if isinstance(state, tuple) else state[index]
        self._finished = self._finished[index]
        self._lengths = self._lengths[index] + (~self._finished).long()
        self._finished = self._finished | (tokens == EOS)
        self._prev = tokens
        # the step's one sync: float64 holds the ids and lengths exactly and the float32 scores too
        idx, toks, scores, lengths = torch.stack([index.double(), tokens.double(), self._scores.double(),
                                                  self._lengths.double()]).tolist()
        idx, toks = [int(i) for i in idx], [int(t) for t in toks]
        self._hist = [self._hist[i] + [t] for i, t in zip(idx, toks)]
        if any(s.attention for s in self._running):
            w = weights.float()
            self._attn = [self._attn[i] + [w[i]] for i in idx]
        self._advance(scores, lengths)
        positions, row = {}, 0
        for s in self._running:
            positions[id(s)] = row
            row += s.K
        return scored + [self._output(self._requests[rid], positions) for rid in touched if rid in self._requests]

    def _finished_row(self, V: int) -> torch.Tensor:
        """(V,) log-probs of a finished beam: padding at no cost, nothing else."""
        if V not in self._masks:
            row = torch.full((V,), float("-inf"), device=self.device)
            row[PAD] = 0.0
            self._masks[V] = row
        return self._masks[V]

    def _force_prefixes(self, logp: torch.Tensor) -> None:
        """A sentence still inside its target prefix may only take the prefix's next token (at its own
        logprob, so that scores stay log-probabilities)."""
        row = 0
        for s in self._running:
            if s.steps < len(s.prefix):
                token = s.prefix[s.steps]
                keep = logp[row: row + s.K, token].clone()
                logp[row: row + s.K] = float("-inf")
                logp[row: row + s.K, token] = keep
            row += s.K

    def _score(self) -> list[TranslationOutput]:
        """Forced decoding of the queued scoring requests, in arrival order, as many as keep the step's
        logits within SCORE_STEP_VALUES (at least one request): a step's scoring work is bounded however
        many requests are queued; the others wait for the next steps."""
        if not self._scoring:
            return []
        V = self.model.config.tgt_vocab
        take, rows, longest = 0, 0, 0
        for job in self._scoring:
            T = max(len(c) for c in job.candidates) + 2
            if take and (rows + len(job.candidates)) * max(longest, T) * V > SCORE_STEP_VALUES:
                break
            take, rows, longest = take + 1, rows + len(job.candidates), max(longest, T)
        jobs, self._scoring = self._scoring[:take], self._scoring[take:]
        pairs = [(j, c) for j, job in enumerate(jobs) for c in range(len(job.candidates))]
        S = max(len(jobs[j].source) for j, _ in pairs) or 1
        T = max(len(jobs[j].candidates[c]) for j, c in pairs) + 2
        src = torch.full((len(pairs), S), PAD, dtype=torch.long, device=self.device)
        tgt = torch.full((len(pairs), T), PAD, dtype=torch.long, device=self.device)
        for r, (j, c) in enumerate(pairs):
            source, cand = jobs[j].source, jobs[j].candidates[c]
            src[r, : len(source)] = torch.tensor(source, dtype=torch.long)
            tgt[r, : len(cand) + 2] = torch.tensor([BOS, *cand, EOS], dtype=torch.long)
        lengths = torch.tensor([max(1, len(jobs[j].source)) for j, _ in pairs], device=self.device)
        with mkldnn_enabled(True) if self.int8 else nullcontext():
            enc, keys, mask, state = self._encode(src, lengths)
            if self.int8:  # through the served step, so a candidate scores as the beam search scored it
                steps = []
                for t in range(T - 1):
                    step_logits, state, _ = self._decode(tgt[:, t], state, keys, enc, mask)
                    steps.append(step_logits)
                logits = torch.stack(steps, 1)
            else:
                logits = self.model._teacher_forced(tgt, state, keys, enc, mask)
        lp = F.log_softmax(logits.float(), -1).gather(2, tgt[:, 1:].unsqueeze(2)).squeeze(2)  # (R, T-1)
        outputs = []
        results: dict[int, list[dict]] = {}
        for r, (j, c) in enumerate(pairs):
            n = len(jobs[j].candidates[c]) + 1  # the candidate's tokens and <eos>
            token_lps = lp[r, :n].tolist()
            total = sum(token_lps)
            item = {"logprob": total, "tokens": n - 1, "score": total / length_penalty(n, jobs[j].alpha)}
            if jobs[j].token_logprobs:
                item["token_logprobs"] = token_lps
            results.setdefault(j, []).append(item)
        for j, job in enumerate(jobs):
            outputs.append(TranslationOutput(job.request_id, {}, True, [], prompt_tokens=len(job.source),
                                             batch_size=len(pairs), scores=results[j]))
        return outputs

    def _select(self, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next beams of every sentence; sentences with the same width are ranked in one topk."""
        V = logp.size(-1)
        index = torch.empty(len(self._hist), dtype=torch.long, device=self.device)
        tokens = torch.empty_like(index)
        scores = torch.empty_like(self._scores)
        for K, rows in self._beam_groups():
            n = rows.numel() // K
            cand = (self._scores[rows].unsqueeze(1) + logp[rows]).view(n, K * V)
            top, flat = cand.topk(K, dim=-1)  # (n, K)
            src_rows = rows.view(n, K).gather(1, flat // V)
            index[rows] = src_rows.view(-1)
            tokens[rows] = (flat % V).view(-1)
            scores[rows] = top.view(-1)
        self._scores = scores
        return index, tokens

    def _beam_groups(self) -> list[tuple[int, torch.Tensor]]:
        """(K, the rows of every sentence of beam width K, sentence by sentence): the same until the next
        admission or retirement, so built once on the device and kept."""
        if self._groups is None:
            firsts: dict[int, list[int]] = {}
            row = 0
            for s in self._running:
                firsts.setdefault(s.K, []).append(row)
                row += s.K
            self._groups = [(K, (torch.tensor(f, device=self.device).unsqueeze(1)
                                 + torch.arange(K, device=self.device)).view(-1)) for K, f in firsts.items()]
        return self._groups

    def _advance(self, scores: list[float], lengths: list[float]) -> None:
        """Settle which sentences ended, from the host's copy of this step's numbers."""
        row = 0
        for s in self._running:
            s.steps += 1
            if all(EOS in h for h in self._hist[row: row + s.K]) or s.steps >= s.max_len:  # every beam ended
                s.done = True
                s.result = self._best(s, row, scores[row: row + s.K], lengths[row: row + s.K])
            row += s.K
        if any(s.done for s in self._running):
            self._retire(lambda s: s.done)

    def _best(self, s: _Sentence, row: int, beam_scores: list[float], beam_lengths: list[float]) -> SentenceResult:
        # the same float32 arithmetic as the device's, on the numbers it sent
        scores = torch.tensor(beam_scores, dtype=torch.float32)
        norm = scores / length_penalty(torch.tensor(beam_lengths, dtype=torch.float32), s.alpha)
        order = [i for i in norm.argsort(descending=True).tolist() if math.isfinite(norm[i])]
        b = row + order[0]
        tokens, finish = self._tokens(b)
        attention = alignment = None
        if s.attention:
            n = len(self._hist[b]) if finish == "length" else self._hist[b].index(EOS)
            weights = [w[: len(s.src)] for w in self._attn[b][:n]]
            if s.return_attention:
                attention = [w.tolist() for w in weights]
            if s.alignment:
                alignment = [int(w.argmax()) for w in weights]
        hypotheses = None
        if s.n_best > 1:
            hypotheses = [Hypothesis(self._tokens(row + i)[0], float(scores[i]), float(norm[i]))
                          for i in order[: s.n_best]]
        return SentenceResult(tokens, float(scores[order[0]]), finish, attention, hypotheses, alignment)

    def _tokens(self, row: int) -> tuple[list[int], str]:
        hist = self._hist[row]
        n = hist.index(EOS) if EOS in hist else len(hist)
        return [t for t in hist[:n] if t != PAD], "stop" if EOS in hist else "length"

    def _stable_prefix(self, s: _Sentence, row: int) -> list[int]:
        """Tokens every beam of the sentence agrees on: no later step can change them."""
        beams = self._hist[row: row + s.K]
        prefix = []
        for column in zip(*beams):
            if len(set(column)) != 1 or column[0] in (EOS, PAD):
                break
            prefix.append(column[0])
        return prefix

    def _output(self, req: _Request, positions: dict[int, int]) -> TranslationOutput:
        """What the request gained this step; `positions` maps running sentences to their first row."""
        new: dict[int, list[int]] = {}
        for s in req.sentences:
            if s.done:
                toks = s.result.tokens
            elif id(s) in positions:
                toks = self._stable_prefix(s, positions[id(s)])
            else:
                continue
            if len(toks) > s.emitted:
                new[s.index] = toks[s.emitted:]
                s.emitted = len(toks)
        finished = all(s.done for s in req.sentences)
        out = TranslationOutput(req.request_id, new, finished,
                                prompt_tokens=sum(len(s.src) for s in req.sentences),
                                completion_tokens=sum(len(s.result.tokens) for s in req.sentences if s.done),
                                batch_size=self._last_rows)
        if finished:
            out.results = [s.result for s in req.sentences]
            del self._requests[req.request_id]
        return out

    # -- rows ----------------------------------------------------------------------------------
    def _admit(self) -> None:
        free = self.max_rows - len(self._hist)
        new: list[_Sentence] = []
        while self._queue and self._queue[0].K <= free:
            s = self._queue.pop(0)
            free -= s.K
            new.append(s)
        if not new:
            return
        S = max(len(s.src) for s in new)
        src = torch.full((len(new), S), PAD, dtype=torch.long, device=self.device)
        for i, s in enumerate(new):
            src[i, : len(s.src)] = torch.tensor(s.src, device=self.device)
        lengths = torch.tensor([len(s.src) for s in new], device=self.device)
        with mkldnn_enabled(True) if self.int8 else nullcontext():
            enc, keys, mask, state = self._encode(src, lengths)
        rows = torch.tensor([i for i, s in enumerate(new) for _ in range(s.K)], device=self.device)
        first = torch.tensor([j == 0 for s in new for j in range(s.K)], device=self.device)
        parts = {
            "_enc": enc[rows], "_keys": keys[rows], "_mask": mask[rows],
            "_state": tuple(x[rows] for x in state) if isinstance(state, tuple) else state[rows],
            "_prev": torch.full((len(rows),), BOS, dtype=torch.long, device=self.device),
            # identical beams at the start: only the first is live, so the first step picks K distinct tokens
            "_scores": torch.where(first, 0.0, float("-inf")),
            "_finished": torch.zeros(len(rows), dtype=torch.bool, device=self.device),
            "_lengths": torch.zeros(len(rows), dtype=torch.long, device=self.device),
        }
        for name, value in parts.items():
            setattr(self, name, value if getattr(self, name) is None else _cat(getattr(self, name), value))
        self._hist += [[] for _ in range(len(rows))]
        self._attn += [[] for _ in range(len(rows))]
        self._running += new
        self._groups = None

    def _retire(self, gone) -> None:
        keep_rows, keep = [], []
        row = 0
        for s in self._running:
            if not gone(s):
                keep.append(s)
                keep_rows.extend(range(row, row + s.K))
            row += s.K
        self._running = keep
        self._groups = None
        if not keep_rows:
            self._enc = self._keys = self._mask = self._state = self._prev = None
            self._scores = self._finished = self._lengths = None
            self._hist, self._attn = [], []
            return
        index = torch.tensor(keep_rows, dtype=torch.long, device=self.device)
        S = max(len(s.src) for s in keep)  # drop padding columns no remaining row needs (read on the host)
        self._enc = self._enc[index, :S]
        self._keys = self._keys[index, :S]
        self._mask = self._mask[index, :S]
        self._state = tuple(x[index] for x in self._state) if isinstance(self._state, tuple) else self._state[index]
        for name in ("_prev", "_scores", "_finished", "_lengths"):
            setattr(self, name, getattr(self, name)[index])
        self._hist = [self._hist[i] for i in keep_rows]
        self._attn = [self._attn[i] for i in keep_rows]


def _cat(a, b):
    """Append rows; encoder tensors of different source lengths are right-padded to the longer."""
    if isinstance(a, tuple):
        return tuple(_cat(x, y) for x, y in zip(a, b))
    if a.dim() >= 2 and a.size(1) != b.size(1):  # (R, S, ...) encoder tensors; states share H
        S = max(a.size(1), b.size(1))
        a, b = _pad_to(a, S), _pad_to(b, S)
    return torch.cat([a, b], 0)


def _pad_to(x: torch.Tensor, S: int) -> torch.Tensor:
    if x.size(1) == S:
        return x
    pad = [0, 0] * (x.dim() - 2) + [0, S - x.size(1)]
    return F.pad(x, pad, value=False if x.dtype == torch.bool else 0.0)
