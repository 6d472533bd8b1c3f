"""The served models and what clients may know about them, read from the model folders."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rnnserve.service.gateway.errors import APIError, invalid
from rnnserve.service.gateway.protocol import (MAX_BEAM, MAX_N, MAX_PROMPT_CHARS, MAX_PROMPTS, MAX_TEXT_CHARS,
                                               MAX_TEXTS, MAX_TOKENS_LIMIT, MAX_TRANSLATION_TOKENS, ModelCard)
from rnnserve.service.settings import Settings


LIMITS = {
    "lm": {"max_tokens": MAX_TOKENS_LIMIT, "max_prompt_chars": MAX_PROMPT_CHARS, "max_prompts": MAX_PROMPTS,
           "max_n": MAX_N},
    "translation": {"max_tokens": MAX_TRANSLATION_TOKENS, "max_texts": MAX_TEXTS, "max_text_chars": MAX_TEXT_CHARS,
                    "max_beam_size": MAX_BEAM},
}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    task: str  # "lm" | "translation"
    cell: str
    vocab_size: int
    created: int

    def card(self) -> ModelCard:
        limits = LIMITS[self.task]
        return ModelCard(id=self.name, created=self.created, task=self.task, cell=self.cell,
                         vocab_size=self.vocab_size, limits=limits)


class Registry:
    def __init__(self, models: list[ModelInfo]) -> None:
        self.models = {m.name: m for m in models}

    @classmethod
    def from_settings(cls, settings: Settings) -> "Registry":
        names = settings.models or sorted(p.stem for p in settings.model_store.glob("*.mar"))
        return cls([_read(settings.models_dir / n, n) for n in names])

    def get(self, name: str, task: str) -> ModelInfo:
        info = self.models.get(name)
        if info is None:
            raise APIError(404, f"model {name!r} does not exist; GET /v1/models lists the served models",
                           "not_found_error", "model", "model_not_found")
        if info.task != task:
            raise invalid(f"model {name!r} is a {info.task} model; use a {task} model for this route", "model")
        return info


def _read(folder: Path, name: str) -> ModelInfo:
    config = json.loads((folder / "config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = len(tokenizer["tgt"]["itos"]) if tokenizer["type"] == "seq2seq" else len(tokenizer["chars"])
    return ModelInfo(name=name, task=config["task"], cell=config["model"]["cell"], vocab_size=vocab,
                     created=int((folder / "model.safetensors").stat().st_mtime))
