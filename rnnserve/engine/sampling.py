"""Batched sampling where every row has its own temperature, top-k, top-p and random numbers.

A row's uniform number is a hash of its request's seed and the token's position (counter-based, as
in Philox): the whole batch draws in a few vectorised integer operations on the device, with no
per-row generator, kernel or host sync. The rest is a deterministic function of that row's logits,
so a seeded request gives the same text whoever shares its batch. A request without a seed gets a
fresh one from the OS.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import torch

M32 = 0xFFFFFFFF


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


def random_seed() -> int:
    """A seed for a request that gave none, from the OS's entropy."""
    return secrets.randbits(63)


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finaliser on 32-bit values held in int64 (products wrap; the mask keeps 32 bits)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def uniforms(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """seeds (B,) int64 in [0, 2^63), positions (B,) int64 -> (B,) float64 in (0, 1), a function of each
    (seed, position) pair alone. On a GPU: a few vectorised integer kernels, no sync. On the CPU, where a
    tensor op costs microseconds of overhead and reading values back costs nothing: plain Python."""
    if seeds.device.type == "cpu":
        return torch.tensor([_uniform(s, p) for s, p in zip(seeds.tolist(), positions.tolist())],
                            dtype=torch.float64)
    return uniforms_vectorised(seeds, positions)


def uniforms_vectorised(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`uniforms` as tensor operations on any device (equal to the Python path, bit for bit)."""
    h = _fmix32((positions & M32) ^ 0x9E3779B9)
    h = _fmix32(h ^ (seeds & M32))
    h = _fmix32(h ^ ((seeds >> 32) & M32))
    return (h.double() + 0.5) / 2.0**32


def _mix(x: int) -> int:
    """_fmix32 on one Python int."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def _uniform(seed: int, position: int) -> float:
    h = _mix((position & M32) ^ 0x9E3779B9)
    h = _mix(h ^ (seed & M32))
    h = _mix(h ^ ((seed >> 32) & M32))
    return (h + 0.5) / 2.0**32


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """logits (B, V) float; temperature/top_p (B,) float; top_k, seeds, positions (B,) long -> token ids (B,).

    Rows with temperature 0 take the argmax. No host sync: the caller reads the tokens once.
    """
    return sample_with(logits, temperature, top_k, top_p, lambda: uniforms(seeds, positions))


def sample_with(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                draw) -> torch.Tensor:
    """`sample_rows` with the rows' uniform numbers from `draw()` ((B,) in (0, 1), called only when a row
    samples)."""
    B, V = logits.shape
    greedy = temperature <= 0
    out = logits.argmax(-1)
    if logits.device.type == "cpu" and bool(greedy.all()):  # a free check on the CPU; skipped on a GPU
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
    u = draw().to(cdf.dtype) * cdf[:, -1]
    choice = torch.searchsorted(cdf, u.unsqueeze(1), right=True).clamp_(max=V - 1)
    sampled = sorted_idx.gather(1, choice).squeeze(1)
    return torch.where(greedy, out, sampled)
