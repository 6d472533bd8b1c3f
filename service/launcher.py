"""`rnnserve serve`: TorchServe and the gateway together, in the foreground.

SIGINT or SIGTERM stops uvicorn first (open streams end), then TorchServe's whole process group,
so no java or worker process outlives the command.
"""
from __future__ import annotations

import logging
import signal

import uvicorn

from rnnserve.service.archive import build_archives
from rnnserve.service.gateway.app import RequestIdFilter, create_app
from rnnserve.service.settings import Settings
from rnnserve.service.torchserve import TorchServeProcess

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def serve(**overrides) -> int:
    configure_logging()
    settings = Settings(**overrides)
    if not settings.models and not any(settings.model_store.glob("*.mar")):
        build_archives(settings.models_dir, settings.model_store)
    ts = TorchServeProcess(settings)
    ts.start()
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            timeout_graceful_shutdown=10, access_log=False)
    server = uvicorn.Server(config)
    log.info("rnnserve: gateway http://%s:%d (docs at /docs), TorchServe %s; Ctrl-C stops both",
             settings.host, settings.port, settings.inference_url)
    received: list[int] = []

    def remember(signum, _frame) -> None:
        received.append(signum)

    # uvicorn re-raises the signal it caught once it has shut down; with these handlers in place
    # that re-raise lands here instead of killing the process before TorchServe is stopped
    signal.signal(signal.SIGINT, remember)
    signal.signal(signal.SIGTERM, remember)
    try:
        server.run()
    finally:
        # uvicorn handled SIGINT/SIGTERM; ignore a second Ctrl-C while TorchServe shuts down
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        ts.stop()
    return 0
