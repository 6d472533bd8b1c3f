"""The largest answer a translation request can get, from its fields and its tokens, before any work.

A translation's last frame carries every text's whole result (hypotheses, attention, alignments) in one
message from the worker to TorchServe's frontend, and TorchServe restarts a worker that sends a message
over its `max_response_size` (service/torchserve.py). So a request whose worst case passes
MAX_ANSWER_BYTES, half that limit, is refused with 400 before the engine sees it. The bound counts every
field at its largest: each output token at the longest token of the target vocabulary, each text at its
`max_tokens` (or the default 2 x source tokens + 10), each attention weight at the longest float JSON
writes. Language-model frames need no such rule: each carries one step's tokens, or one chunk of a
prompt or of a scored text (LMEngine), whatever the request asks.
"""
from __future__ import annotations

import json
from collections.abc import Iterable

MAX_ANSWER_BYTES = 8 * 2**20
FLOAT_BYTES = 26  # a float in JSON and its separator: at most 24 characters ("-2.2250738585072014e-308") and ", "
INDEX_BYTES = 8  # an index into the source tokens and its separator
ITEM_BYTES = 512  # a translation's or hypothesis's fixed fields: names, finish_reason, logprob, score


def token_bytes(pieces: Iterable[str]) -> int:
    """The most bytes one of these tokens takes in a JSON list: quoted, escaped, with its separator."""
    return max(len(json.dumps(p, ensure_ascii=False).encode()) for p in pieces) + 2


def translation_bytes(source_tokens: list[int], output_tokens: list[int], n_best: int, attention: bool,
                      alignment: bool, src_token_bytes: int, tgt_token_bytes: int) -> int:
    """An upper bound of the last frame's bytes: per text its source tokens and at most `output_tokens`."""
    total = 1024  # the frame's own fields and usage
    for S, T in zip(source_tokens, output_tokens):
        text = T * tgt_token_bytes  # the text, decoded from at most T tokens
        size = ITEM_BYTES + 2 * text + T * tgt_token_bytes + S * src_token_bytes  # deltas, text, tokens, source
        if alignment:
            size += T * INDEX_BYTES
        if attention:
            size += T * (S * FLOAT_BYTES + 4)
        if n_best > 1:
            size += n_best * (ITEM_BYTES + text)
        total += size
    return total


class AnswerTooLarge(ValueError):
    """A request whose answer could pass MAX_ANSWER_BYTES; `param` names the field to change first."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_translation(source_tokens: list[int], output_tokens: list[int], n_best: int, attention: bool,
                      alignment: bool, max_tokens_given: bool, src_token_bytes: int, tgt_token_bytes: int) -> None:
    """Raise AnswerTooLarge when the answer could pass MAX_ANSWER_BYTES, naming the fields it grows with."""
    if translation_bytes(source_tokens, output_tokens, n_best, attention, alignment, src_token_bytes,
                         tgt_token_bytes) <= MAX_ANSWER_BYTES:
        return
    fields = ["text", "max_tokens"] + (["n_best"] if n_best > 1 else []) + \
        (["return_attention"] if attention else []) + (["return_alignment"] if alignment else [])
    param = ("return_attention" if attention else "n_best" if n_best > 1 else
             "max_tokens" if max_tokens_given else "text")
    raise AnswerTooLarge(f"the answer to this request could exceed {MAX_ANSWER_BYTES // 2**20} MiB, the limit of one "
                         f"answer; it grows with {', '.join(fields)}: send fewer or shorter texts, lower max_tokens "
                         "or n_best, or leave out return_attention", param)
