"""Batched sampling where every row has its own temperature, top-k, top-p and random numbers.

A row's uniform number is a hash of its request's seed and the token's position (counter-based, as
in Philox): the whole batch draws in a few vectorised integer operations on the device, with no
per-row generator, kernel or host sync. The rest is a deterministic function of that row's logits,
so a seeded request gives the same text whoever shares its batch. A request without a seed gets a
fresh one from the OS. On the CPU the same arithmetic runs mostly in numpy (cheaper calls on small
arrays), bit for bit equal to the torch path a GPU runs.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import numpy as np
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


def _fmix32(x):
    """MurmurHash3's finaliser on 32-bit values held in int64 (products wrap; the mask keeps 32 bits)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & M32
    return x ^ (x >> 16)


def uniforms(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """seeds int64 in [0, 2^63), positions int64 (any shapes that broadcast) -> float64 in (0, 1), a function
    of each (seed, position) pair alone. On a GPU: a few vectorised integer kernels, no sync. On the CPU the
    same integer operations run in numpy, whose calls cost about a microsecond where a torch op costs
    several: a whole step's draws, (B, tokens), cost about what one token's cost."""
    if seeds.device.type == "cpu":
        return torch.from_numpy((_hash(seeds.numpy(), positions.numpy()).astype(np.float64) + 0.5) / 2.0**32)
    return uniforms_vectorised(seeds, positions)


def uniforms_vectorised(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`uniforms` as tensor operations on any device (equal to the numpy path, bit for bit)."""
    return (_hash(seeds, positions).double() + 0.5) / 2.0**32


def _hash(seeds, positions):
    """MurmurHash3's finaliser over (position, seed's low half, seed's high half): int64 torch tensors or
    numpy arrays alike (products wrap in either; the masks keep 32 bits)."""
    h = _fmix32((positions & M32) ^ 0x9E3779B9)
    h = _fmix32(h ^ (seeds & M32))
    return _fmix32(h ^ ((seeds >> 32) & M32))


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
    return RowSampler(temperature, top_k, top_p)(logits, draw)


class RowSampler:
    """The rows' sampling parameters, prepared once for the several tokens of an engine step.

    On the CPU, what the parameters settle is settled here, once: whether every row is greedy, or none is
    (then no argmax), whether every temperature is 1 (then no division: x / 1 is x), which ranks top-k
    cuts. On a GPU nothing is read back (the engine's step may be captured in a CUDA graph)."""

    def __init__(self, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> None:
        self.top_k, self.top_p = top_k, top_p
        self.greedy = temperature <= 0
        self.t = torch.where(self.greedy, torch.ones_like(temperature), temperature).unsqueeze(1)
        self.cpu = temperature.device.type == "cpu"
        if self.cpu:
            self.all_greedy, self.any_greedy = bool(self.greedy.all()), bool(self.greedy.any())
            self.divide = not bool((self.t == 1).all())
            self.top_p_col = top_p.numpy()[:, None]
            self._cut: dict[int, np.ndarray | None] = {}  # per vocabulary size: (B, V) ranks top-k drops

    def __call__(self, logits: torch.Tensor, draw) -> torch.Tensor:
        if not self.cpu:
            out = logits.argmax(-1)
            probs = torch.softmax(logits.float() / self.t, dim=-1)
            return torch.where(self.greedy, out, _pick(probs, self.top_k, self.top_p, draw()))
        if self.all_greedy:
            return logits.argmax(-1)
        logits = logits.float()
        probs = torch.softmax(logits / self.t if self.divide else logits, dim=-1)
        sampled = self._pick_cpu(probs, draw())
        return torch.where(self.greedy, logits.argmax(-1), sampled) if self.any_greedy else sampled

    def _top_k_cut(self, V: int) -> np.ndarray | None:
        if V not in self._cut:
            k = self.top_k.numpy()[:, None]
            self._cut[V] = ((k > 0) & (np.arange(V) >= k)) if (k > 0).any() else None
        return self._cut[V]

    def _pick_cpu(self, probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """`_pick` on the CPU, the same bits in a fraction of the time: a numpy call on a (B, V) array costs
        about a microsecond where a torch op costs several, and sorting int64 keys (minus a probability's
        bits, which order as its value since p >= 0, then its index) is several times faster than torch.sort.
        The cumulative sums stay torch's (it accumulates in double). A row with two equal probabilities (or a
        NaN) goes through `_pick`: the order torch.sort gives equal values is its own, and decides which of
        them a draw lands on."""
        p = probs.numpy()
        B, V = p.shape
        keys = np.sort(np.arange(V) - (p.view(np.int32).astype(np.int64) << 32), axis=1)  # p falling
        bits = (-(keys >> 32)).astype(np.int32)
        sorted_p = bits.view(np.float32)
        cs = torch.from_numpy(sorted_p).cumsum(-1).numpy()
        # nucleus: drop a token once the mass before it already reaches top_p (the first always stays)
        drop = (cs - sorted_p) >= self.top_p_col
        cut = self._top_k_cut(V)
        if cut is not None:
            drop |= cut
        cdf = torch.from_numpy(np.where(drop, np.float32(0.0), sorted_p)).cumsum(-1).numpy() if drop.any() else cs
        x = u.numpy().astype(np.float32) * cdf[:, -1]
        choice = np.minimum((cdf <= x[:, None]).sum(1), V - 1)  # searchsorted(right=True): a cdf never falls
        picked = keys[np.arange(B), choice] & 0xFFFFFFFF
        odd = (bits[:, 1:] == bits[:, :-1]).any(1) | np.isnan(cs[:, -1])  # a NaN makes its row's sum NaN
        if odd.any():
            rows = torch.from_numpy(np.flatnonzero(odd))
            picked[rows.numpy()] = _pick(probs[rows], self.top_k[rows], self.top_p[rows], u[rows]).numpy()
        return torch.from_numpy(picked)


def _pick(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs (B, V) -> (B,): each row's tokens by falling probability, cut by top-k and top-p, then the
    first whose cumulative probability passes u times the mass kept."""
    V = probs.size(1)
    sorted_p, sorted_idx = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(V, device=probs.device).unsqueeze(0)
    drop = (top_k.unsqueeze(1) > 0) & (ranks >= top_k.unsqueeze(1))
    # nucleus: drop a token once the mass before it already reaches top_p (the first always stays)
    drop |= (sorted_p.cumsum(-1) - sorted_p) >= top_p.unsqueeze(1)
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    cdf = sorted_p.cumsum(-1)
    u = u.to(cdf.dtype) * cdf[:, -1]
    choice = torch.searchsorted(cdf, u.unsqueeze(1), right=True).clamp_(max=V - 1)
    return sorted_idx.gather(1, choice).squeeze(1)
