"""The real stack for end-to-end tests (rnnserve.service.stack)."""
from __future__ import annotations

import pytest

from rnnserve.service.stack import Stack, start_stack, stop_stack

__all__ = ["Stack", "start_stack", "stop_stack"]


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    s = start_stack(tmp_path_factory.mktemp("stack"))
    yield s
    stop_stack(s)
