"""A further gateway (`rnnserve gateway`) over a stack's TorchServe: a separate process tree on its own port,
so that which gateway serves a request is certain."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from rnnserve.service.stack import Stack, free_ports
from tests.e2e.waits import HANG_S, wait_for


@contextmanager
def second_gateway(stack: Stack, tmp: Path, env: dict[str, str]) -> Iterator[str]:
    """Its url, once ready; `env` on top of the stack's."""
    (port,) = free_ports(1)
    env = {**stack.env, **env, "RNNSERVE_RUN_DIR": str(tmp / "run2"), "RNNSERVE_TS_URL": stack.ts_inference_url,
           "RNNSERVE_TS_MANAGEMENT_URL": stack.ts_management_url,
           "RNNSERVE_TS_KEY_FILE": str(stack.run_dir / "key_file.json")}
    log = open(tmp / "gateway2.log", "wb")
    second = subprocess.Popen([sys.executable, "-m", "rnnserve.cli", "gateway", "--port", str(port)], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert second.poll() is None, (tmp / "gateway2.log").read_text()[-3000:]
            try:
                return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False
        wait_for(ready, "the second gateway to be ready", timeout=180)
        yield url
    finally:
        second.terminate()
        second.wait(HANG_S)
        log.close()
