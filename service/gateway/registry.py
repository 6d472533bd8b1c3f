"""The served models and what clients may know about them, read from the model folders.

A model's limits are the service-wide caps (protocol.py), lowered by its config.json's "limits"
where the model asks for less: a model trained on short sentences can refuse long ones."""
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


def model_limits(task: str, config: dict) -> dict[str, int]:
    """The service-wide caps of the task, lowered by the model config's "limits" (unknown keys ignored)."""
    caps = dict(LIMITS[task])
    for key, value in (config.get("limits") or {}).items():
        if key in caps and isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            caps[key] = min(caps[key], value)
    return caps


@dataclass(frozen=True)
class ModelInfo:
    name: str
    task: str  # "lm" | "translation"
    cell: str
    vocab_size: int
    created: int
    limits: dict
    languages: dict | None = None

    def card(self) -> ModelCard:
        return ModelCard(id=self.name, created=self.created, task=self.task, cell=self.cell,
                         vocab_size=self.vocab_size, limits=self.limits, languages=self.languages)

    def check_generate(self, max_tokens: int, prompts: list[str]) -> None:
        """The model's own limits, below the service-wide ones that validation already applied."""
        if max_tokens > self.limits["max_tokens"]:
            raise invalid(f"max_tokens must be at most {self.limits['max_tokens']} for model {self.name!r}",
                          "max_tokens")
        if any(len(p) > self.limits["max_prompt_chars"] for p in prompts):
            raise invalid(f"prompt must be at most {self.limits['max_prompt_chars']} characters for model "
                          f"{self.name!r}", "prompt")

    def check_translate(self, texts: list[str], max_tokens: int | None) -> None:
        if len(texts) > self.limits["max_texts"]:
            raise invalid(f"at most {self.limits['max_texts']} texts per request for model {self.name!r}", "text")
        if any(len(t) > self.limits["max_text_chars"] for t in texts):
            raise invalid(f"each text must be at most {self.limits['max_text_chars']} characters for model "
                          f"{self.name!r}", "text")
        if max_tokens is not None and max_tokens > self.limits["max_tokens"]:
            raise invalid(f"max_tokens must be at most {self.limits['max_tokens']} for model {self.name!r}",
                          "max_tokens")


class Registry:
    def __init__(self, models: list[ModelInfo]) -> None:
        self.models = {m.name: m for m in models}

    @classmethod
    def from_settings(cls, settings: Settings) -> "Registry":
        """The models TorchServe serves (the same list, service/torchserve.py), read from their folders."""
        from rnnserve.service.archive import served_folders

        served = served_folders(settings.models_dir, settings.models)
        return cls([_read(folder, name) for name, folder in served.items()])

    def get(self, name: str, task: str | None) -> ModelInfo:
        """The model called `name` (404 otherwise), of the given task when one is named (400 otherwise)."""
        info = self.models.get(name)
        if info is None:
            raise APIError(404, f"model {name!r} does not exist; GET /v1/models lists the served models",
                           "not_found_error", "model")
        if task is not None and info.task != task:
            raise invalid(f"model {name!r} is a {info.task} model; use a {task} model for this route", "model")
        return info


def _read(folder: Path, name: str) -> ModelInfo:
    config = json.loads((folder / "config.json").read_text())
    model, task = config["model"], config["task"]
    vocab = model["tgt_vocab"] if task == "translation" else model["vocab_size"]
    return ModelInfo(name=name, task=task, cell=model["cell"], vocab_size=vocab,
                     created=int((folder / "model.safetensors").stat().st_mtime), limits=model_limits(task, config),
                     languages=config.get("languages"))
