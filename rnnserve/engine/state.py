"""A language model's whole memory of a text as a few kilobytes: what sessions store and clients hold.

A recurrent model's memory of everything it has read is its per-layer hidden (and cell) vectors. A
state holds them as they were before the model read the last token of the text, plus that token:
continuing then runs exactly the step that a single longer request would have run next. Nothing of
the text itself is kept.

A state asked for in float16 (the compact form clients hold) is written in float32 when a number is past
float16's range (65,504): an LSTM's cell can grow that far over a long text, and every state written must
be one that `from_bytes` accepts.

Bytes (little-endian), read with `struct` and numpy, never unpickled:
    magic b"RNNS" | version u8 | dtype u8 (1 float16, 2 float32) | flags u8 (bit 0: at a line start) |
    reserved u8 | pending token u32 | tokens read u32 | weights fingerprint 16 bytes |
    then every layer's h (and c for LSTM), each `hidden_size` values, layer by layer.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rnnserve.models.lm import RNNLanguageModel, State

MAGIC = b"RNNS"
VERSION = 1
HEADER = struct.Struct("<4sBBBxII16s")
DTYPES = {1: np.float16, 2: np.float32}
DTYPE_CODES = {"float16": 1, "float32": 2}
LINE_START = 1


class StateError(ValueError):
    """A state that cannot be continued on this model (malformed, truncated, other weights)."""


def fingerprint(weights_file: str | Path) -> bytes:
    """16 bytes that change with every retraining: a state is only valid for the weights that made it."""
    h = hashlib.sha256()
    with open(weights_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.digest()[:16]


@dataclass
class LMState:
    layers: State  # batch-1 tensors, (1, 1, H) each, in the model's format
    pending: int  # the last token of the text, not yet read by `layers`
    tokens: int  # tokens the state has read (prompts and generations), for information
    line_start: bool  # the text so far ends a line (decoders drop the space before a first word)

    def to_bytes(self, weights: bytes, dtype: str = "float32") -> bytes:
        code = DTYPE_CODES[dtype]
        tensors = [t for layer in self.layers for t in (layer if isinstance(layer, tuple) else (layer,))]
        exact = torch.cat([t.reshape(-1).float().cpu() for t in tensors]).numpy()
        with np.errstate(over="ignore"):
            payload = exact.astype(DTYPES[code])
        if not np.isfinite(payload).all() and np.isfinite(exact).all():  # past float16's range
            code, payload = DTYPE_CODES["float32"], exact
        flags = LINE_START if self.line_start else 0
        return HEADER.pack(MAGIC, VERSION, code, flags, self.pending, min(self.tokens, 2**32 - 1),
                           weights) + payload.tobytes()


def _values(model: RNNLanguageModel) -> int:
    """Numbers in one state of this model: h (and c for LSTM) of every layer."""
    cfg = model.config
    return cfg.num_layers * (2 if cfg.cell == "lstm" else 1) * cfg.hidden_size


def state_size(model: RNNLanguageModel, dtype: str = "float32") -> int:
    """Bytes of one state of this model."""
    return HEADER.size + _values(model) * np.dtype(DTYPES[DTYPE_CODES[dtype]]).itemsize


def from_bytes(blob: bytes, model: RNNLanguageModel, weights: bytes, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> LMState:
    """Parse and check a state for this model; StateError says what is wrong with it."""
    if len(blob) < HEADER.size:
        raise StateError("state is truncated")
    magic, version, code, flags, pending, tokens, made_by = HEADER.unpack_from(blob)
    if magic != MAGIC or version != VERSION or code not in DTYPES:
        raise StateError("state is not a state of this server's format")
    if made_by != weights:
        raise StateError("state was made by other weights than this model's")
    cfg = model.config
    n = _values(model)
    values = np.frombuffer(blob, dtype=DTYPES[code], offset=HEADER.size)
    if len(blob) - HEADER.size != n * values.itemsize:
        raise StateError(f"state has {len(blob) - HEADER.size} bytes of layers; this model's have "
                         f"{n * values.itemsize}")
    if not np.isfinite(values).all():
        raise StateError("state holds values that are not finite")
    if pending >= cfg.vocab_size:
        raise StateError("state's pending token is outside the vocabulary")
    flat = torch.from_numpy(values.astype(np.float32)).to(device=device, dtype=dtype)
    chunks = iter(flat.view(-1, 1, 1, cfg.hidden_size))
    lstm = cfg.cell == "lstm"
    layers: State = [(next(chunks), next(chunks)) if lstm else next(chunks) for _ in range(cfg.num_layers)]
    return LMState(layers, pending, tokens, bool(flags & LINE_START))
