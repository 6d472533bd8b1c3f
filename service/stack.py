"""Start a whole stack (`rnnserve serve`: TorchServe and the gateway) on free loopback ports, with its
own run directory and model store, so that it can run beside another one on the same machine.
Used by the end-to-end tests and by `rnnserve bench`."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from rnnserve.paths import MODELS_DIR
from rnnserve.service.archive import build_archives

READY_TIMEOUT_S = 180


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@dataclass
class Stack:
    url: str
    proc: subprocess.Popen
    run_dir: Path
    env: dict
    log: Path
    ts_metrics_url: str = ""
    ts_inference_url: str = ""  # for a further gateway over the same TorchServe (RNNSERVE_TS_URL)
    ts_management_url: str = ""

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def processes(self) -> dict[str, list[psutil.Process]]:
        """The stack's running processes by role: gateway (the serve process and any gateway processes it
        forked), frontend (TorchServe's JVM) and worker (its Python workers)."""
        top = psutil.Process(self.proc.pid)
        roles: dict[str, list[psutil.Process]] = {"gateway": [top], "frontend": [], "worker": []}
        for p in top.children(recursive=True):
            try:
                name, cmd = p.name(), " ".join(p.cmdline())
            except psutil.Error:  # ended meanwhile
                continue
            if name == "java":
                roles["frontend"].append(p)
            elif "model_service_worker" in cmd:
                roles["worker"].append(p)
            elif "rnnserve.service.guard" in cmd or "torchserve" in cmd:
                continue  # the guard and TorchServe's launcher script sleep
            elif "python" in name or "rnnserve" in cmd:
                roles["gateway"].append(p)
        return roles


def start_stack(tmp: Path, extra_env: dict | None = None, models_dir: Path = MODELS_DIR,
                profile: str | None = None) -> Stack:
    """`profile`: the archives' worker profile, "cpu" or "gpu" (default: RNNSERVE_ARCHIVE_PROFILE, else cpu)."""
    store = tmp / "model_store"
    build_archives(models_dir, store, profile)
    gw, inf, mgmt, met, gi, gm, worker = free_ports(7)
    env = {**os.environ, "RNNSERVE_RUN_DIR": str(tmp / "run"), "RNNSERVE_MODEL_STORE": str(store),
           "RNNSERVE_MODELS_DIR": str(models_dir), "RNNSERVE_READY_PROBE_INTERVAL_S": "1",
           "RNNSERVE_PARENT_PID": str(os.getpid()),  # the stack stops if this process dies without stopping it
           **(extra_env or {})}  # extra_env may set any of these
    cmd = [sys.executable, "-m", "rnnserve.cli", "serve", "--port", str(gw), "--ts-inference-port", str(inf),
           "--ts-management-port", str(mgmt), "--ts-metrics-port", str(met), "--ts-grpc-inference-port", str(gi),
           "--ts-grpc-management-port", str(gm), "--ts-worker-port", str(worker)]
    log = tmp / "serve.log"
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    sock = env.get("RNNSERVE_TS_INFERENCE_SOCKET")
    inference = f"unix:{Path(sock).resolve()}" if sock else f"http://127.0.0.1:{inf}"
    stack = Stack(f"http://127.0.0.1:{gw}", proc, tmp / "run", env, log, f"http://127.0.0.1:{met}/metrics",
                  inference, f"http://127.0.0.1:{mgmt}")
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rnnserve serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{stack.url}/readyz", timeout=2).status_code == 200:
                return stack
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_stack(stack)
    raise RuntimeError(f"stack not ready in {READY_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


def stop_stack(stack: Stack) -> None:
    if stack.proc.poll() is None:
        stack.proc.send_signal(signal.SIGTERM)
        try:
            stack.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stack.proc.kill()
