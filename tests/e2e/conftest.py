"""The real stack for end-to-end tests (rnnserve.service.stack)."""
from __future__ import annotations

import pytest

from rnnserve.service.stack import Stack, start_stack, stop_stack

__all__ = ["STATE_KEY", "Stack", "start_stack", "stop_stack"]


# the key that signs returned states: known here so that tests can sign states of their own making
STATE_KEY = "test-state-key-" + "0123456789abcdef" * 2


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    # frontend_cpus auto: the suite runs with the CPU placement on (off by default); test_placement checks it
    s = start_stack(tmp_path_factory.mktemp("stack"),
                    extra_env={"RNNSERVE_STATE_KEY": STATE_KEY, "RNNSERVE_FRONTEND_CPUS": "auto"})
    yield s
    stop_stack(s)
