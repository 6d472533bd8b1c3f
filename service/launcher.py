"""Process entry points: `rnnserve serve` (TorchServe and the gateway together, in the foreground),
`rnnserve gateway` and `rnnserve torchserve` (one each, for containers and clusters).

SIGINT or SIGTERM stops uvicorn first (open streams end), then TorchServe's whole process group,
so no java or worker process outlives the command.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from pydantic import SecretStr

from rnnserve.service.affinity import pin_frontend
from rnnserve.service.archive import build_archives, stale_archives
from rnnserve.service.gateway.app import RequestIdFilter, create_app
from rnnserve.service.gateway import heap
from rnnserve.service.gateway.connections import ConnectionBounds, protocol_factory
from rnnserve.service.settings import Settings
from rnnserve.service.torchserve import TorchServeProcess

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    # LOG_FORMAT reads none of these: not looked up for every record (the logging HOWTO's "Optimization"); a
    # record's caller (file, function, line) is a walk up the stack, its process id a system call
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _record_signals() -> list[int]:
    """Handlers that only note SIGINT/SIGTERM.

    uvicorn re-raises the signal it caught once it has shut down; with these handlers in place the
    re-raise lands here instead of killing the process before TorchServe is stopped.
    """
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    return received


def _run_gateway(settings: Settings) -> None:
    if settings.gateway_workers > 1:
        return _run_gateways(settings)
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_config=None,
                            timeout_graceful_shutdown=10, access_log=False, **_connection_options(settings))
    heap.settle()
    uvicorn.Server(config).run()


def _connection_options(settings: Settings) -> dict:
    """uvicorn's options for the gateway's time-bounded connections (connections.py), one process or several."""
    bounds = ConnectionBounds(settings.header_timeout_s, settings.body_timeout_s, settings.write_timeout_s,
                              settings.send_buffer_bytes)
    return {"http": protocol_factory(bounds), "timeout_keep_alive": settings.keepalive_timeout_s}


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as RNNSERVE_ variables, secrets included: what a spawned gateway process reads."""
    def text(value) -> str:
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        if isinstance(value, list):
            return json.dumps([text(v) for v in value])
        return str(value)

    return {f"RNNSERVE_{name.upper()}": text(value) for name, value in settings if value is not None}


def _run_gateways(settings: Settings) -> None:
    """`gateway_workers` gateway processes on one port (uvicorn's workers: they share the listening socket).
    They are spawned fresh, so they read their settings from the environment; they share a folder for the
    admission counters and prometheus-client's multiprocess files, made here and removed when they stop."""
    shared = Path(tempfile.mkdtemp(prefix="rnnserve-gateway-"))
    (shared / "prometheus").mkdir()
    os.environ.update(settings_env(settings), RNNSERVE_GATEWAY_SHARED_DIR=str(shared),
                      PROMETHEUS_MULTIPROC_DIR=str(shared / "prometheus"))
    if settings.state_key is None:  # one random key for all of them: a state one signs, the others accept
        os.environ["RNNSERVE_STATE_KEY"] = secrets.token_hex(32)
    log.info("starting %d gateway processes on port %d", settings.gateway_workers, settings.port)
    try:
        uvicorn.run("rnnserve.service.launcher:gateway_app", factory=True, workers=settings.gateway_workers,
                    host=settings.host, port=settings.port, log_config=None, timeout_graceful_shutdown=10,
                    access_log=False, **_connection_options(settings))
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def gateway_app():
    """The app of one of several gateway processes (uvicorn's factory, in a spawned process)."""
    configure_logging()
    app = create_app(Settings())
    heap.settle()
    return app


def _start_torchserve(settings: Settings) -> TorchServeProcess:
    stale = stale_archives(settings.models_dir, settings.model_store)
    if stale:  # a model folder or the handler code changed since the archive was built
        log.info("rebuilding archives (out of date: %s)", ", ".join(stale))
        build_archives(settings.models_dir, settings.model_store)
    ts = TorchServeProcess(settings)
    ts.start()
    return ts


def gateway(**overrides) -> int:
    """The gateway alone, for a TorchServe started elsewhere (RNNSERVE_TS_URL)."""
    configure_logging()
    _run_gateway(Settings(**overrides))
    return 0


def torchserve(**overrides) -> int:
    """TorchServe alone in the foreground (the model-server container)."""
    configure_logging()
    settings = Settings(**overrides)
    received = _record_signals()
    pin_frontend(settings.frontend_cpus)
    ts = _start_torchserve(settings)
    try:
        while ts.running() and not received:
            time.sleep(0.5)
        if not received:
            ts.log_exit()
    finally:
        ts.stop()
    return 0 if received else 1


def _exit_with_parent() -> None:
    """Under a harness that names itself in RNNSERVE_PARENT_PID (tests, bench, soak: `start_stack`), stop
    as on SIGTERM once that process is gone: killed, it cannot stop us, and a whole stack would live on."""
    if not os.environ.get("RNNSERVE_PARENT_PID"):
        return
    parent = int(os.environ["RNNSERVE_PARENT_PID"])

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        log.warning("the process that started this stack (pid %s) is gone; stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _stop_when_torchserve_exits(ts: TorchServeProcess) -> None:
    """Stop the gateway (SIGTERM to this process) if TorchServe exits on its own: its JVM failed to start, or
    died. A gateway left running would only answer 503, and a supervisor (systemd, a restart policy) restarts a
    process that exits, not one that stays. Logs TorchServe's exit status and the end of its output."""
    proc = ts.proc

    def watch() -> None:
        proc.wait()
        if ts.stopping:
            return
        ts.log_exit("; stopping the gateway")
        while True:  # a signal that comes before the gateway's server has its handlers is only noted: again
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(15)  # longer than the gateway's graceful shutdown (10 s)

    threading.Thread(target=watch, name="torchserve-watch", daemon=True).start()


def serve(**overrides) -> int:
    configure_logging()
    _exit_with_parent()
    settings = Settings(**overrides)
    pin_frontend(settings.frontend_cpus)  # the gateway runs in this process, TorchServe's frontend inherits
    ts = _start_torchserve(settings)
    log.info("rnnserve: gateway http://%s:%d (docs at /docs), TorchServe %s; Ctrl-C stops both",
             settings.host, settings.port, settings.inference_url)
    _record_signals()
    _stop_when_torchserve_exits(ts)
    try:
        _run_gateway(settings)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan TorchServe
        died = not ts.running()  # it exited before we stopped it: the watcher stopped the gateway
        ts.stop()
    return 1 if died else 0
