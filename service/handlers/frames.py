"""Helpers of the TorchServe handlers (kept out of the handler modules, which may hold one class each).

Wire format between TorchServe and the gateway: one JSON object per line (NDJSON), one line per
request per engine step. Progress: {"text": "..."}; last: {"text", "finish_reason", "usage"};
failure: {"error": {"message", "type", "code"}} as the last line.
"""
from __future__ import annotations

import json
from typing import Any

import torch

from rnnserve.engine.lm_engine import StepOutput
from rnnserve.engine.sampling import SamplingParams

GENERATE_FIELDS = {"prompt", "max_tokens", "temperature", "top_k", "top_p", "stop", "seed"}


def _loads(body: Any) -> dict:
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf-8")
    if isinstance(body, str):
        body = json.loads(body)
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    return body


def parse_generate_body(body: Any) -> tuple[str, SamplingParams]:
    """Body (already validated by the gateway; checked again for direct callers) -> prompt, params."""
    try:
        d = _loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"request body is not valid JSON: {e}") from None
    unknown = set(d) - GENERATE_FIELDS
    if unknown:
        raise ValueError(f"unknown fields: {sorted(unknown)}")
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
    return prompt, params


EMPTY_FRAME = json.dumps({"text": ""}) + "\n"


def output_frame(o: StepOutput) -> str:
    frame: dict[str, Any] = {"text": o.text}
    if o.finished:
        frame["finish_reason"] = o.finish_reason
        frame["usage"] = {"prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens}
    return json.dumps(frame, ensure_ascii=False) + "\n"


def error_frame(message: str, type_: str, code: int) -> str:
    return json.dumps({"error": {"message": message, "type": type_, "code": code}}) + "\n"


def split_final(frame: str) -> tuple[str, str]:
    """A last frame -> (its text as a progress frame, the ending without the text)."""
    d = json.loads(frame)
    if "error" in d:
        return EMPTY_FRAME, frame
    text = d.pop("text", "")
    return json.dumps({"text": text}, ensure_ascii=False) + "\n", json.dumps({"text": "", **d}) + "\n"


def tokens_for_budget(target_s: float, per_token_s: float, max_tokens: int) -> int:
    """Tokens to decode in one step so that a step lasts about `target_s`.

    TorchServe costs a few milliseconds per step round trip whatever the handler does; decoding
    several tokens per step amortises that, and the budget bounds how long a new request waits
    to join the batch (its time to first token).
    """
    return max(1, min(max_tokens, int(target_s / max(per_token_s, 1e-6))))


def pick_device(gpu_id: Any, half: bool) -> tuple[torch.device, torch.dtype]:
    """cuda:{gpu_id} from TorchServe's context when a GPU is there, else CPU (always fp32)."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}"), (torch.float16 if half else torch.float32)
    return torch.device("cpu"), torch.float32
