"""Batched sampling where every row has its own temperature, top-k, top-p and random generator.

Each row draws its uniform number from its own `torch.Generator`, and the rest is a deterministic
function of that row's logits, so a seeded request gives the same text whoever shares its batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def validate(self, max_tokens_limit: int | None = None) -> None:
        """Raise ValueError naming the bad field; the gateway checks the same bounds first."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError("max_tokens must be a positive integer")
        if max_tokens_limit is not None and self.max_tokens > max_tokens_limit:
            raise ValueError(f"max_tokens must be at most {max_tokens_limit}")
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 5.0):
            raise ValueError("temperature must be between 0 and 5")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError("top_k must be a non-negative integer")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError("top_p must be in (0, 1]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise ValueError("seed must be a non-negative 64-bit integer")


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()  # fresh entropy from the OS
    else:
        g.manual_seed(seed)
    return g


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                generators: list[torch.Generator]) -> torch.Tensor:
    """logits (B, V) float; temperature/top_p (B,) float; top_k (B,) long -> token ids (B,).

    Rows with temperature 0 take the argmax and draw no random number.
    """
    B, V = logits.shape
    greedy = temperature <= 0
    out = logits.argmax(-1)
    if bool(greedy.all()):
        return out
    logits = logits.float()
    t = torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(1)
    probs = torch.softmax(logits / t, dim=-1)
    sorted_p, sorted_idx = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(V, device=logits.device).unsqueeze(0)
    drop = (top_k.unsqueeze(1) > 0) & (ranks >= top_k.unsqueeze(1))
    # nucleus: drop a token once the mass before it already reaches top_p (the first always stays)
    drop |= (sorted_p.cumsum(-1) - sorted_p) >= top_p.unsqueeze(1)
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    cdf = sorted_p.cumsum(-1)
    u = torch.stack([torch.rand((), generator=g, device=logits.device) if not greedy[i] else
                     torch.zeros((), device=logits.device) for i, g in enumerate(generators)])
    u = u.to(cdf.dtype) * cdf[:, -1]
    choice = torch.searchsorted(cdf, u.unsqueeze(1), right=True).clamp_(max=V - 1)
    sampled = sorted_idx.gather(1, choice).squeeze(1)
    return torch.where(greedy, out, sampled)
