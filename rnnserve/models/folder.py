"""A model folder: the unit that training writes, `rnnserve archive` packs and handlers load.

    config.json        {"task": "lm", "model": {...LMConfig...}, ...}
    tokenizer.json     vocabulary (JSON, no pickle)
    model.safetensors  weights, fp16 to keep the repository small
    metrics.json, loss.png  written by training

Weights are read with safetensors, which cannot execute code, so a folder from an untrusted
place can at worst hold wrong numbers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from rnnserve.models.lm import LMConfig, RNNLanguageModel
from rnnserve.models.seq2seq import Seq2Seq, Seq2SeqConfig
from rnnserve.tokenizer import CharTokenizer, WordTokenizer

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
WEIGHTS_FILE = "model.safetensors"
FILES = (CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE)


@dataclass
class LoadedLM:
    model: RNNLanguageModel
    tokenizer: CharTokenizer
    meta: dict


def save_lm(folder: str | Path, model: RNNLanguageModel, tokenizer: CharTokenizer,
            meta: dict | None = None, dtype: torch.dtype = torch.float16) -> Path:
    return _save(folder, "lm", model, RNNLanguageModel(model.config), tokenizer.to_dict(), meta, dtype)


def load_lm(folder: str | Path, device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.float32) -> LoadedLM:
    folder, meta = Path(folder), _meta(folder, "lm", "a language model")
    model = RNNLanguageModel(LMConfig(**meta["model"]))
    _load_weights(folder, model, device, dtype)
    return LoadedLM(model, CharTokenizer.load(folder / TOKENIZER_FILE), meta)


@dataclass
class LoadedTranslation:
    model: Seq2Seq
    src: WordTokenizer
    tgt: WordTokenizer
    meta: dict


def _save(folder: str | Path, task: str, model: torch.nn.Module, copy: torch.nn.Module, tokenizer: dict,
          meta: dict | None, dtype: torch.dtype) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"task": task, "model": model.config.to_dict(), **(meta or {})}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    (folder / TOKENIZER_FILE).write_text(json.dumps(tokenizer, ensure_ascii=False, indent=None))
    # a converted copy is saved so that the live model keeps its training dtype
    copy.load_state_dict(model.state_dict())
    save_model(copy.to(dtype), str(folder / WEIGHTS_FILE))
    return folder


def _meta(folder: str | Path, task: str, what: str) -> dict:
    meta = json.loads((Path(folder) / CONFIG_FILE).read_text())
    if meta.get("task") != task:
        raise ValueError(f"{folder} holds a {meta.get('task')!r} model, not {what}")
    return meta


def _load_weights(folder: Path, model: torch.nn.Module, device, dtype: torch.dtype) -> None:
    weights = str(folder / WEIGHTS_FILE)
    with safe_open(weights, "pt") as f:  # load in the stored dtype, then convert
        stored = f.get_tensor(next(iter(f.keys()))).dtype
    model.to(stored)
    load_model(model, weights, strict=True)
    model.to(device=device, dtype=dtype).eval()


def save_translation(folder: str | Path, model: Seq2Seq, src: WordTokenizer, tgt: WordTokenizer,
                     meta: dict | None = None, dtype: torch.dtype = torch.float16) -> Path:
    tokenizer = {"type": "seq2seq", "src": src.to_dict(), "tgt": tgt.to_dict()}
    return _save(folder, "translation", model, Seq2Seq(model.config), tokenizer, meta, dtype)


def load_translation(folder: str | Path, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> LoadedTranslation:
    folder, meta = Path(folder), _meta(folder, "translation", "a translation model")
    model = Seq2Seq(Seq2SeqConfig(**meta["model"]))
    _load_weights(folder, model, device, dtype)
    tok = json.loads((folder / TOKENIZER_FILE).read_text())
    return LoadedTranslation(model, WordTokenizer.from_dict(tok["src"]), WordTokenizer.from_dict(tok["tgt"]), meta)
