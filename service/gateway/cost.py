"""What a request costs its model, in tokens: what it reads, scores and decodes. Admission (admission.py)
holds each model's requests in flight to a budget of these (RNNSERVE_MAX_TOKENS_IN_FLIGHT_PER_MODEL), so
one request of sixteen 8,192-character texts counts as the 131,072 tokens it makes the model read, not as
one request. Characters stand for tokens: a character model reads one token per character, and a subword
model fewer."""
from __future__ import annotations


def generation_cost(prompt: str, max_tokens: int, echo: bool = False) -> int:
    """A prompt read (twice with echo: once more for its logprobs) and `max_tokens` decoded."""
    return len(prompt) * (2 if echo else 1) + max_tokens


def score_cost(texts: list[str]) -> int:
    return sum(len(t) for t in texts)


def translation_cost(texts: list[str], beam_size: int, max_tokens: int | None, max_tokens_limit: int,
                     target_prefix: str | None = None) -> int:
    """Each text and its target prefix read, and `beam_size` rows decoding up to its max_tokens (by default
    2 x its length + 10, capped by the model's limit)."""
    prefix = len(target_prefix or "")
    return sum(len(t) + prefix + beam_size * (max_tokens or min(max_tokens_limit, 2 * len(t) + 10)) for t in texts)


def translation_score_cost(source: str, candidates: list[str]) -> int:
    """The source is encoded once per candidate, and each candidate read."""
    return sum(len(source) + len(c) for c in candidates)
