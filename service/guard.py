"""Run TorchServe as the leader of its own process group, and take the whole group down if the process
that started it dies without stopping it (SIGKILL, the OOM killer): otherwise java and its workers
would live on, holding the ports and the model in memory.

    python -m rnnserve.service.guard <command...>

The guard polls its parent. A normal stop (`TorchServeProcess.stop`) signals the whole group, the
guard included: the guard then only waits for its command to exit, and the caller does the rest.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5
GRACE_S = 10.0


def main(argv: list[str]) -> int:
    parent = os.getppid()
    # the caller stops the group with SIGTERM: leave it to the command's own shutdown. A handler that does
    # nothing, not SIG_IGN: an ignored signal stays ignored across exec, and java then installs no shutdown
    # handler, so the whole group would sit out the caller's grace period until SIGKILL
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signum, _frame: None)
    child = subprocess.Popen(argv)
    while child.poll() is None:
        if os.getppid() != parent:  # orphaned: the parent is gone and nobody will stop the group
            stop_group(child)
            break
        time.sleep(POLL_S)
    return child.wait()


def stop_group(child: subprocess.Popen) -> None:
    group = os.getpgrp()
    os.killpg(group, signal.SIGTERM)  # ignored here; TorchServe shuts down java and its workers
    try:
        child.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    time.sleep(1.0)  # workers exit a moment after the frontend
    os.killpg(group, signal.SIGKILL)  # whatever is left, this guard last


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
