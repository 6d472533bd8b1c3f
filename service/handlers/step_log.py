"""TorchServe's Python worker logs a line each time it receives a call of the handler ("Backend received
inference at: <time>", ts/protocol/otf_message_handler.py). With continuous batching a call is an engine step,
tens a second under load, and the line costs twice: the worker formats and prints it, and TorchServe's frontend
reads every line a worker prints, matches it against three patterns and writes it to model_log.log, a share
of the frontend's CPU per streamed token (BENCHMARKS.md). It says nothing the worker's other lines and
TorchServe's metrics (PredictionTime, one per call) do not; `drop_step_lines` leaves it out and keeps every
other line."""
from __future__ import annotations

import logging

STEP_LINE = "Backend received inference at: %d"  # the record's format, as TorchServe 0.12 logs it


class _DropStepLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != STEP_LINE


def drop_step_lines() -> None:
    """On the worker's root logger, which TorchServe's worker logs the line to (once per process)."""
    root = logging.getLogger()
    if not any(isinstance(f, _DropStepLines) for f in root.filters):
        root.addFilter(_DropStepLines())
