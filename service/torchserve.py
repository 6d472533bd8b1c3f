"""Start and stop a hardened TorchServe as a child process group.

Every port binds to loopback (or ts_host); the gateway is the only client. Token authorization stays
on: the gateway reads the keys from the key file TorchServe writes into its working directory.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from rnnserve.service.archive import served_folders
from rnnserve.service.java import JAVA_HELP, java_problem
from rnnserve.service.settings import Settings

log = logging.getLogger(__name__)

# The largest message a worker may send the frontend: one frame. TorchServe restarts a worker whose message
# passes it (TooLongFrameException), so no valid request may come near it, on either worker profile (CPU or
# GPU): a language-model frame holds one step's tokens, or one chunk of a prompt's echo or of 16 scored texts'
# token logprobs (256 tokens each on CPU, 2,048 on GPU: under 2 MiB); a translation whose last frame could
# pass answer_size.MAX_ANSWER_BYTES (half this) is refused with 400 before any work.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
LOG_CONFIG = Path(__file__).resolve().parent / "log4j2.xml"  # INFO, not TorchServe's per-frame DEBUG


def model_archives(settings: Settings) -> list[str]:
    """The archives of the served models: one per model folder of the models folder (service/archive.py)."""
    names = list(served_folders(settings.models_dir, settings.models))
    missing = [n for n in names if not (settings.model_store / f"{n}.mar").exists()]
    if missing:
        raise SystemExit(f"no archive for {missing} in {settings.model_store}; run `rnnserve archive`")
    return names


def max_request_bytes(settings: Settings) -> int:
    """The largest request the gateway forwards: its own body limit, with every character of it written as
    JSON escapes may grow it (three times at most: a 4-byte UTF-8 character becomes a 12-byte surrogate
    pair), and room for the fields the gateway adds; at least 1 MiB."""
    return max(1024 * 1024, 3 * settings.max_body_bytes + 64 * 1024)


def write_config(settings: Settings, models: list[str]) -> Path:
    run_dir = settings.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    h = settings.ts_host
    store = settings.model_store.resolve()
    props = {
        "inference_address": f"unix:{settings.ts_inference_socket.resolve()}" if settings.ts_inference_socket
        else f"http://{h}:{settings.ts_inference_port}",
        "management_address": f"http://{h}:{settings.ts_management_port}",
        "metrics_address": f"http://{h}:{settings.ts_metrics_port}",
        "grpc_inference_address": h,
        "grpc_management_address": h,
        "grpc_inference_port": settings.ts_grpc_inference_port,
        "grpc_management_port": settings.ts_grpc_management_port,
        "initial_worker_port": settings.ts_worker_port,
        "model_store": store,
        "load_models": ",".join(f"{m}={m}.mar" for m in models),
        # no registration of models by URL, no pip installs from archives, only the local store
        "enable_model_api": "false",
        "install_py_dep_per_model": "false",
        "allowed_urls": f"file://{re.escape(str(store))}/.*",
        "enable_envvars_config": "false",
        "disable_token_authorization": "false" if settings.ts_token_auth else "true",
        # keys would expire after 60 min; the gateway also refreshes them through the token API
        "token_expiration_min": 24 * 60,
        "metrics_mode": "prometheus",
        "max_request_size": max_request_bytes(settings),
        "max_response_size": MAX_RESPONSE_BYTES,
        # every request the gateway admits must fit in the model's queue: only the gateway refuses (429)
        "job_queue_size": settings.job_queue_size,
        # a stream's frames are each answered within the model's responseTimeout (model-config.yaml);
        # this is the default for a model that sets none
        "default_response_timeout": 120,
        "python": sys.executable,  # workers import rnnserve from this environment
        # the quick compiler only unless asked (settings.ts_optimizing_jit): C2's compiling cost the frontend more CPU
        # than relaying the frames (BENCHMARKS.md)
        "vmargs": "-Xmx1g -XX:+ExitOnOutOfMemoryError" + ("" if settings.ts_optimizing_jit
                                                          else " -XX:TieredStopAtLevel=1"),
    }
    path = run_dir / "config.properties"
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    return path


class TorchServeProcess:
    """TorchServe in its own process group, so stopping it also stops its Python workers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.proc: subprocess.Popen | None = None
        self.stopping = False  # stop() was called: an exit from then on is expected
        self.out_path = settings.run_dir / "torchserve.out"

    def start(self) -> None:
        problem = java_problem()
        if problem:
            raise SystemExit(JAVA_HELP.format(problem=problem))
        models = model_archives(self.settings)
        config = write_config(self.settings, models)
        run_dir = self.settings.run_dir
        (run_dir / "key_file.json").unlink(missing_ok=True)  # a stale key file would mislead the gateway
        if self.settings.ts_inference_socket:  # left by a TorchServe that was killed: binding would fail
            self.settings.ts_inference_socket.unlink(missing_ok=True)
        env = dict(os.environ, LOG_LOCATION=str(run_dir / "logs"), METRICS_LOCATION=str(run_dir / "logs"),
                   TEMP=str(run_dir / "tmp"))
        (run_dir / "tmp").mkdir(exist_ok=True)
        ts = Path(sys.executable).with_name("torchserve")
        # the guard leads the process group and stops it if this process dies without stopping it
        cmd = [sys.executable, "-m", "rnnserve.service.guard",
               str(ts) if ts.exists() else "torchserve", "--start", "--foreground", "--ncs",
               "--model-store", str(self.settings.model_store.resolve()), "--ts-config", str(config),
               "--log-config", str(LOG_CONFIG)]
        log.info("starting TorchServe: inference %s, management %s, metrics %s (logs in %s)",
                 self.settings.inference_url, self.settings.management_url, self.settings.metrics_url,
                 run_dir / "logs")
        self.out = open(self.out_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=self.out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output_tail(self, lines: int = 20) -> str:
        """The last lines TorchServe wrote to its output (the JVM's errors land there)."""
        try:
            with open(self.out_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
                return b"\n".join(f.read().splitlines()[-lines:]).decode("utf-8", "replace")
        except OSError as e:
            return f"(unreadable: {e})"

    def log_exit(self, then: str = "") -> None:
        """Log that TorchServe exited on its own (`then`: what follows from it), with the end of its output."""
        code = self.proc.returncode if self.proc is not None else None
        log.error("TorchServe exited with status %s%s. The end of its output (%s):\n%s", code, then, self.out_path,
                  self.output_tail())

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to the whole group: java runs its own shutdown and the workers exit. SIGKILL only for what is
        still running after `grace_s` (logged as a warning: TorchServe did not honour SIGTERM)."""
        if self.proc is None:
            return
        self.stopping = True
        pgid = self.proc.pid  # leader of its own session/group
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            if sig == signal.SIGKILL:
                log.warning("TorchServe was still running %.0f s after SIGTERM; killed", grace_s)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(pgid):
                self.proc.poll()  # reap the leader so a zombie does not look alive
                time.sleep(0.1)
            if not _group_alive(pgid):
                break
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.out.close()
        log.info("TorchServe stopped")
        self.proc = None


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs. A zombie does not count: it holds no port or memory, and java,
    orphaned when the `torchserve` launcher exits first, may wait a while for a parent that reaps it."""
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False
