"""A model folder: the unit that training writes, `rnnserve archive` packs and handlers load.

    config.json        {"task": "lm", "model": {...LMConfig...}, "tokenizer": {...}, "languages", "limits", ...}
    model.safetensors  weights, fp16 to keep the repository small
    tokenizer files    source.model + target.model (translation) or tokenizer.model (LM): SentencePiece's
                       own format; or tokenizer.json: a character or word vocabulary (JSON)
    README.md          the model card: languages, data and its terms, the command, the metrics
    metrics.json, loss.png  written by training

Weights are read with safetensors, which cannot execute code, so a folder from an untrusted
place can at worst hold wrong numbers.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from rnnserve.models.lm import LMConfig, RNNLanguageModel
from rnnserve.models.seq2seq import Seq2Seq, Seq2SeqConfig
from rnnserve.subword import SubwordLMTokenizer, SubwordTokenizer
from rnnserve.tokenizer import CharTokenizer, WordLMTokenizer

LMTokenizer = CharTokenizer | SubwordLMTokenizer | WordLMTokenizer

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
SOURCE_SPM, TARGET_SPM, LM_SPM = "source.model", "target.model", "tokenizer.model"
FILES = (CONFIG_FILE, WEIGHTS_FILE)  # every model folder has these; model_files() lists the rest


# the names a model may be served under: torch-model-archiver's rule (model_packaging_utils.py)
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$")


def name_problem(name: object) -> str | None:
    """Why `name` cannot be a served model's name, or None when it can."""
    if isinstance(name, str) and MODEL_NAME.match(name):
        return None
    return f"the served name {name!r} must be letters, digits, '_', '-' and '.', starting with a letter or digit"


def model_files(folder: str | Path) -> list[Path]:
    """The files a model folder serves from: config, weights, its tokenizer's files and the model card."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    tokenizer = config.get("tokenizer", {}).get("files", [TOKENIZER_FILE])
    names = [CONFIG_FILE, WEIGHTS_FILE, *tokenizer] + ([CARD_FILE] if (folder / CARD_FILE).exists() else [])
    return [folder / n for n in names]


def copy_model_folder(src: str | Path, dst: str | Path, **config: object) -> Path:
    """A copy of a model folder's files, served under the new folder's name (config.json's "name"), with
    `config`'s keys laid over its config.json."""
    import shutil

    dst = Path(dst)
    dst.mkdir(parents=True)
    for path in model_files(src):
        shutil.copy2(path, dst / path.name)
    meta = json.loads((dst / CONFIG_FILE).read_text())
    (dst / CONFIG_FILE).write_text(json.dumps({**meta, "name": dst.name, **config}, indent=1, ensure_ascii=False))
    return dst


def is_model_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    try:
        return all(p.is_file() for p in model_files(folder))
    except (OSError, ValueError):  # no config.json, or not JSON
        return False


@dataclass
class LoadedLM:
    model: RNNLanguageModel
    tokenizer: LMTokenizer
    meta: dict


def save_lm(folder: str | Path, model: RNNLanguageModel, tokenizer: LMTokenizer,
            meta: dict | None = None, dtype: torch.dtype = torch.float16) -> Path:
    meta = dict(meta or {})
    if isinstance(tokenizer, SubwordLMTokenizer):
        Path(folder).mkdir(parents=True, exist_ok=True)
        tokenizer.save(Path(folder) / LM_SPM)
        (Path(folder) / TOKENIZER_FILE).unlink(missing_ok=True)
        meta["tokenizer"] = {"type": "sentencepiece", "files": [LM_SPM]}
        return _save(folder, "lm", model, RNNLanguageModel(model.config), None, meta, dtype)
    meta["tokenizer"] = {"type": tokenizer.to_dict()["type"], "files": [TOKENIZER_FILE]}
    return _save(folder, "lm", model, RNNLanguageModel(model.config), tokenizer.to_dict(), meta, dtype)


def load_lm(folder: str | Path, device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.float32) -> LoadedLM:
    folder, meta = Path(folder), _meta(folder, "lm", "a language model")
    model = RNNLanguageModel(LMConfig(**meta["model"]))
    _load_weights(folder, model, device, dtype)
    kind = meta.get("tokenizer", {}).get("type", "char")
    if kind == "sentencepiece":
        tokenizer: LMTokenizer = SubwordLMTokenizer.load(folder / LM_SPM)
    elif kind == "words":
        tokenizer = WordLMTokenizer.from_dict(json.loads((folder / TOKENIZER_FILE).read_text()))
    else:
        tokenizer = CharTokenizer.load(folder / TOKENIZER_FILE)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens, the model "
                         f"{model.config.vocab_size}")
    return LoadedLM(model, tokenizer, meta)


@dataclass
class LoadedTranslation:
    model: Seq2Seq
    src: SubwordTokenizer
    tgt: SubwordTokenizer
    meta: dict


def _save(folder: str | Path, task: str, model: torch.nn.Module, copy: torch.nn.Module, tokenizer: dict | None,
          meta: dict | None, dtype: torch.dtype) -> Path:
    """tokenizer: tokenizer.json's content, or None when the caller wrote the tokenizer's own files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"task": task, "model": model.config.to_dict(), **(meta or {})}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1, ensure_ascii=False))
    if tokenizer is not None:
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


def save_translation(folder: str | Path, model: Seq2Seq, src: SubwordTokenizer, tgt: SubwordTokenizer,
                     meta: dict | None = None, dtype: torch.dtype = torch.float16) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    src.save(folder / SOURCE_SPM)
    tgt.save(folder / TARGET_SPM)
    (folder / TOKENIZER_FILE).unlink(missing_ok=True)  # the vocabulary of an earlier model there
    meta = {**(meta or {}), "tokenizer": {"type": "sentencepiece", "files": [SOURCE_SPM, TARGET_SPM]}}
    return _save(folder, "translation", model, Seq2Seq(model.config), None, meta, dtype)


def load_translation(folder: str | Path, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> LoadedTranslation:
    folder, meta = Path(folder), _meta(folder, "translation", "a translation model")
    if meta.get("tokenizer", {}).get("type") != "sentencepiece":
        raise ValueError(f"{folder}: a translation model needs SentencePiece tokenizers (source.model, target.model)")
    model = Seq2Seq(Seq2SeqConfig(**meta["model"]))
    _load_weights(folder, model, device, dtype)
    src, tgt = SubwordTokenizer.load(folder / SOURCE_SPM), SubwordTokenizer.load(folder / TARGET_SPM)
    if (src.vocab_size, tgt.vocab_size) != (model.config.src_vocab, model.config.tgt_vocab):
        raise ValueError(f"{folder}: the tokenizers' vocabularies ({src.vocab_size}, {tgt.vocab_size}) do not match "
                         f"the model's ({model.config.src_vocab}, {model.config.tgt_vocab})")
    return LoadedTranslation(model, src, tgt, meta)
