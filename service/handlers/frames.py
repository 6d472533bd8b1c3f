"""Helpers of the TorchServe handlers (kept out of the handler modules, which may hold one class each).

Wire format between TorchServe and the gateway: one JSON object per line (NDJSON), one line per
request per engine step; a failure is {"error": {"message", "type", "code"}} as the last line.
Generation: {"text": "..."} per step; last: {"text", "finish_reason", "usage"}.
Scoring (language model): {"text": "", "score_logprobs": [{"index", "logprobs"}]} as texts are read (with
token_logprobs); last: "scores" (text, logprob, tokens per text), "finish_reason", "usage".
Translation: {"deltas": [{"index", "text"}]} per step; last adds "finish_reason", "translations"
(text, tokens, source_tokens, finish_reason, attention when asked) and "usage".
"""
from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from rnnserve.engine.lm_engine import StepOutput
from rnnserve.engine.sampling import SamplingParams
from rnnserve.engine.translation_engine import TranslationOutput, TranslationParams
from rnnserve.service.affinity import free_worker
from rnnserve.service.handlers import worker_io

GENERATE_FIELDS = {"prompt", "max_tokens", "temperature", "top_k", "top_p", "stop", "seed", "logprobs", "echo",
                   "state", "return_state"}
SCORE_FIELDS = {"task", "texts", "token_logprobs"}
STATE_DTYPES = ("float16", "float32")
MAX_STATE_BYTES = 1 << 20  # far above any state of a served model; the engine checks the exact size


def _object(body: Any, fields: set[str]) -> dict:
    """The request body as a dict with only known fields; ValueError otherwise."""
    try:
        if isinstance(body, (bytes, bytearray)):
            body = body.decode("utf-8")
        if isinstance(body, str):
            body = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    unknown = set(body) - fields
    if unknown:
        raise ValueError(f"unknown fields: {sorted(unknown)}")
    return body


@dataclass
class GenerateOptions:
    """What a generation asks for beyond sampling (rnnserve.engine.lm_engine.LMEngine.add)."""
    logprobs: int | None = None
    echo: bool = False
    state: bytes | None = None  # a state's bytes (the gateway checked its signature)
    return_state: str | None = None  # "float16" | "float32"


def decode_body(body: Any) -> dict:
    """The request body as a dict, decoded once per request; the parsers below then check its fields.
    Scoring and generation share a handler: a scoring body says `"task": "score"`."""
    return _object(body, GENERATE_FIELDS | SCORE_FIELDS | TRANSLATE_FIELDS | TRANSLATE_SCORE_FIELDS)


def parse_score_body(body: Any) -> tuple[list[str], bool]:
    d = _object(body, SCORE_FIELDS)
    texts = d.get("texts")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty list of strings")
    return texts, bool(d.get("token_logprobs", False))


def parse_generate_body(body: Any) -> tuple[str, SamplingParams, GenerateOptions]:
    """Body (already validated by the gateway; checked again for direct callers) -> prompt, params, options."""
    d = _object(body, GENERATE_FIELDS)
    prompt = d.get("prompt", "")
    if not isinstance(prompt, str):
        raise ValueError("prompt must be a string")
    stop = d.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    try:
        params = SamplingParams(max_tokens=d.get("max_tokens", 128), temperature=float(d.get("temperature", 1.0)),
                                top_k=d.get("top_k", 0), top_p=float(d.get("top_p", 1.0)), stop=list(stop),
                                seed=d.get("seed"))
    except (TypeError, ValueError):
        raise ValueError("temperature and top_p must be numbers") from None
    options = GenerateOptions(logprobs=d.get("logprobs"), echo=bool(d.get("echo", False)),
                              return_state=d.get("return_state"))
    if options.return_state is not None and options.return_state not in STATE_DTYPES:
        raise ValueError(f"return_state must be one of {list(STATE_DTYPES)}")
    if d.get("state") is not None:
        state = d["state"]
        if not isinstance(state, str) or len(state) > 2 * MAX_STATE_BYTES:
            raise ValueError("state must be a base64 string")
        try:
            options.state = base64.b64decode(state, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("state must be a base64 string") from None
    return prompt, params, options


EMPTY_FRAME = json.dumps({"text": ""}) + "\n"
# what a frame adds to the stream; the rest describes its end
PROGRESS_FIELDS = ("text", "deltas", "logprobs", "prompt_logprobs", "score_logprobs")


def _logprobs(entries) -> list[dict]:
    return [{"token": e.token, "logprob": e.logprob, **({"top": e.top} if e.top is not None else {})}
            for e in entries]


_ENCODE = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps builds an encoder per call for ensure_ascii


def output_frame(o: StepOutput, weights: bytes = b"", state_dtype: str | None = None) -> str:
    if not o.finished and o.logprobs is None and o.prompt_logprobs is None and o.score_logprobs is None:
        # most frames: the bytes json.dumps writes for {"text", "batch"}, at a seventh of its cost (the worker's
        # calling thread renders every frame under the engine thread's GIL)
        return '{"text": ' + _ENCODE(o.text) + ', "batch": ' + str(o.batch_size) + '}\n'
    frame: dict[str, Any] = {"text": o.text, "batch": o.batch_size}
    if o.logprobs is not None:
        frame["logprobs"] = _logprobs(o.logprobs)
    if o.prompt_logprobs is not None:
        frame["prompt_logprobs"] = _logprobs(o.prompt_logprobs)
    if o.score_logprobs is not None:  # a scoring request's token logprobs, a chunk per text per step
        frame["score_logprobs"] = [{"index": i, "logprobs": _logprobs(entries)} for i, entries in o.score_logprobs]
    if o.finished:
        frame["finish_reason"] = o.finish_reason
        frame["usage"] = {"prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens}
        if o.cumulative_logprob is not None:
            frame["cumulative_logprob"] = o.cumulative_logprob
        if o.scores is not None:
            frame["scores"] = o.scores
        if o.state is not None and state_dtype:
            blob = o.state.to_bytes(weights, state_dtype)
            frame["state"] = base64.b64encode(blob).decode("ascii")
            frame["state_tokens"] = o.state.tokens
    return _ENCODE(frame) + "\n"


def error_frame(message: str, type_: str, code: int, param: str | None = None) -> str:
    return json.dumps({"error": {"message": message, "type": type_, "code": code,
                                 **({"param": param} if param else {})}}) + "\n"


def split_final(frame: str) -> tuple[str, str]:
    """A last frame -> (its text as a progress frame, the ending without the text)."""
    d = json.loads(frame)
    if "error" in d:
        return EMPTY_FRAME, frame
    progress = {k: d.pop(k) for k in PROGRESS_FIELDS if k in d}
    empty = {k: type(v)() for k, v in progress.items()}
    return (json.dumps(progress or {"text": ""}, ensure_ascii=False) + "\n",
            json.dumps({**empty, **d}, ensure_ascii=False) + "\n")


def pick_device(gpu_id: Any, half: bool) -> tuple[torch.device, torch.dtype]:
    """cuda:{gpu_id} from TorchServe's context when a GPU is there, else CPU (always fp32)."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}"), (torch.float16 if half else torch.float32)
    return torch.device("cpu"), torch.float32


# environment variables (inherited from TorchServe's) override model-config.yaml, to try another value
# without rebuilding the archive
ENV_OVERRIDES = {
    "RNNSERVE_WORKER_THREADS": ("torch_threads", int),
    "RNNSERVE_TARGET_STEP_MS": ("target_step_ms", float),
    "RNNSERVE_ADMIT_STEP_MS": ("admit_step_ms", float),
    "RNNSERVE_OVERLAP_STEPS": ("overlap_steps", lambda v: bool(int(v))),
    "RNNSERVE_STEP_ON_ADMIT": ("step_on_admit", lambda v: bool(int(v))),
    "RNNSERVE_ADMIT_GATHER_MS": ("admit_gather_ms", float),
    "RNNSERVE_FOLDED_STEP": ("folded_step", lambda v: bool(int(v))),
    "RNNSERVE_INT8": ("int8", lambda v: bool(int(v))),
    "RNNSERVE_CUDA_GRAPHS": ("cuda_graphs", lambda v: bool(int(v))),
    "RNNSERVE_MAX_TOKENS_PER_STEP": ("max_tokens_per_step", int),
    "RNNSERVE_MIN_STEP_MS": ("min_step_ms", float),
    "RNNSERVE_FRAME_INTERVAL_MS": ("frame_interval_ms", float),
    "RNNSERVE_FRAME_INTERVAL_PER_STREAM_MS": ("frame_interval_per_stream_ms", float),
    "RNNSERVE_MAX_FRAME_INTERVAL_MS": ("max_frame_interval_ms", float),
    "RNNSERVE_PREFILL_CHUNK_TOKENS": ("prefill_chunk_tokens", int),
    "RNNSERVE_MAX_BATCH_SIZE": ("max_batch_size", int),  # rows decoded at once; more requests wait for a row
    "RNNSERVE_TRIM_WORKER_IO": ("trim_worker_io", lambda v: bool(int(v))),
}


def handler_setup(ctx) -> tuple[str, dict, torch.device, torch.dtype]:
    """Model folder, the model-config.yaml `handler:` section (with ENV_OVERRIDES applied), and the device
    and dtype to load on: cuda:{gpu_id} from TorchServe's context (fp16 when `half_precision`), else CPU
    in fp32. Sets the worker's torch threads from `torch_threads` (0 keeps torch's default), and trims
    TorchServe's own per-call work in the worker unless `trim_worker_io` is false (worker_io.py)."""
    props = ctx.system_properties
    cfg = dict((ctx.model_yaml_config or {}).get("handler", {}))
    for env, (key, parse) in ENV_OVERRIDES.items():
        if os.environ.get(env):
            cfg[key] = parse(os.environ[env])
    if cfg.get("trim_worker_io", True):
        worker_io.install()
    device, dtype = pick_device(props.get("gpu_id"), cfg.get("half_precision", False))
    free_worker()  # every core, where the launcher held TorchServe's frontend to a few (service/affinity.py)
    threads = int(cfg.get("torch_threads", 0))
    if threads and device.type == "cpu":
        torch.set_num_threads(threads)
    return props["model_dir"], cfg, device, dtype


TRANSLATE_FIELDS = {"texts", "beam_size", "max_tokens", "length_penalty", "return_attention", "n_best",
                    "target_prefix", "return_alignment"}
TRANSLATE_SCORE_FIELDS = {"task", "source", "candidates", "length_penalty", "token_logprobs"}


def parse_translate_body(body: Any, max_texts: int,
                         max_chars: int) -> tuple[list[str], TranslationParams, list[str] | None]:
    """-> texts, params, and the target prefix of each text (or None)."""
    d = _object(body, TRANSLATE_FIELDS)
    texts = d.get("texts")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty list of strings")
    if len(texts) > max_texts:
        raise ValueError(f"at most {max_texts} texts per request")
    if any(len(t) > max_chars for t in texts):
        raise ValueError(f"each text must be at most {max_chars} characters")
    length_penalty = d.get("length_penalty", 0.6)
    if not isinstance(length_penalty, (int, float)) or isinstance(length_penalty, bool):
        raise ValueError("length_penalty must be a number")
    prefix = d.get("target_prefix")
    if isinstance(prefix, str):
        prefix = [prefix] * len(texts)
    if prefix is not None and (not isinstance(prefix, list) or len(prefix) != len(texts)
                               or not all(isinstance(p, str) and len(p) <= max_chars for p in prefix)):
        raise ValueError("target_prefix must be a string, or one string per text, each at most "
                         f"{max_chars} characters")
    return texts, TranslationParams(beam_size=d.get("beam_size", 4), max_tokens=d.get("max_tokens"),
                                    length_penalty=float(length_penalty),
                                    return_attention=bool(d.get("return_attention", False)),
                                    n_best=d.get("n_best", 1),
                                    return_alignment=bool(d.get("return_alignment", False))), prefix


def parse_translate_score_body(body: Any, max_chars: int, max_candidates: int) -> tuple[str, list[str], float, bool]:
    d = _object(body, TRANSLATE_SCORE_FIELDS)
    source, candidates = d.get("source"), d.get("candidates")
    if not isinstance(source, str) or len(source) > max_chars:
        raise ValueError(f"source must be a string of at most {max_chars} characters")
    if (not isinstance(candidates, list) or not candidates or len(candidates) > max_candidates
            or not all(isinstance(c, str) and len(c) <= max_chars for c in candidates)):
        raise ValueError(f"candidates must be a list of 1 to {max_candidates} strings of at most {max_chars} "
                         "characters")
    length_penalty = d.get("length_penalty", 0.6)
    if not isinstance(length_penalty, (int, float)) or isinstance(length_penalty, bool):
        raise ValueError("length_penalty must be a number")
    return source, candidates, float(length_penalty), bool(d.get("token_logprobs", False))


class TextStreams:
    """Readable text of each sentence as its tokens arrive: the whole is decoded again and the new tail
    sent. A tail that would not extend what was sent (a character still missing some of its bytes, a
    space the next token may take back) waits for the next tokens; `final` is the whole text."""

    def __init__(self, codec, n: int) -> None:
        self.codec = codec  # encode / decode / pieces (rnnserve.models.folder.TextCodec)
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.text = [""] * n  # what was sent

    def add(self, index: int, ids: list[int]) -> str:
        self.tokens[index] += ids
        whole = self.codec.decode(self.tokens[index]).rstrip("\ufffd")
        sent = self.text[index]
        if not whole.startswith(sent) or len(whole) == len(sent):
            return ""
        self.text[index] = whole
        return whole[len(sent):]

    def final(self, index: int) -> str:
        return self.codec.decode(self.tokens[index])


def translation_frame(out: TranslationOutput, streams: TextStreams, sources: list[list[str]]) -> str:
    deltas = [{"index": i, "text": streams.add(i, toks)} for i, toks in sorted(out.new_tokens.items())]
    frame: dict[str, Any] = {"deltas": [d for d in deltas if d["text"]], "batch": out.batch_size}
    if out.finished:
        reasons = [r.finish_reason for r in out.results]
        frame["finish_reason"] = "length" if "length" in reasons else "stop"
        frame["translations"] = [_translation(r, streams, sources, i) for i, r in enumerate(out.results)]
        frame["usage"] = {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens}
    return json.dumps(frame, ensure_ascii=False) + "\n"


def _translation(r, streams: TextStreams, sources: list[list[str]], i: int) -> dict:
    t = {"text": streams.final(i), "tokens": streams.codec.pieces(r.tokens), "source_tokens": sources[i],
         "finish_reason": r.finish_reason, "logprob": r.score}
    if r.attention is not None:
        t["attention"] = r.attention
    if r.alignment is not None:
        t["alignment"] = r.alignment
    if r.hypotheses is not None:
        t["hypotheses"] = [{"text": streams.codec.decode(h.tokens), "logprob": h.logprob, "score": h.score}
                           for h in r.hypotheses]
    return t


def score_frame(out: TranslationOutput, candidates: list[str], pieces: list[list[str]]) -> str:
    """A scoring request's answer; token logprobs name the target pieces and the closing `</s>`."""
    scores = []
    for text, toks, s in zip(candidates, pieces, out.scores):
        item = {"text": text, **s}
        if "token_logprobs" in s:
            item["token_logprobs"] = [{"token": t, "logprob": lp}
                                      for t, lp in zip(toks + ["</s>"], s["token_logprobs"])]
        scores.append(item)
    return json.dumps({"deltas": [], "batch": out.batch_size, "finish_reason": "stop", "scores": scores,
                       "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": 0}},
                      ensure_ascii=False) + "\n"
