"""All configuration of rnnserve in one pydantic-settings class (environment prefix RNNSERVE_).

Read once, at start-up, and passed down; nothing else reads the environment.
"""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rnnserve.paths import MODEL_STORE, MODELS_DIR, REPO_ROOT


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RNNSERVE_", env_file=None, extra="ignore")

    # gateway
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    allow_public_bind: bool = False  # binding a non-loopback address must be asked for explicitly
    api_keys: list[SecretStr] = []  # empty: no auth; else `Authorization: Bearer <key>` on every API route
    cors_origins: list[str] = []  # CORS stays off unless origins are listed
    request_timeout_s: float = Field(120.0, gt=0)  # whole request, streams included (a write blocked too)
    max_body_bytes: int = Field(256 * 1024, ge=1024)
    # connections (service/gateway/connections.py): a request's headers must arrive within header_timeout_s
    # of the connection opening (or of its previous response), its body within body_timeout_s of the
    # headers; a response whose writes make no progress for write_timeout_s is dropped; an idle
    # keep-alive connection is closed after keepalive_timeout_s
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)
    write_timeout_s: float = Field(60.0, gt=0)
    keepalive_timeout_s: float = Field(5.0, gt=0)
    send_buffer_bytes: int | None = Field(None, ge=4096)  # the kernel's per connection; unset: its autotuning
    # gateway processes on the one port (uvicorn workers): one Python process tops out at about one core of
    # streaming work; admission, metrics and readiness stay the whole service's (slots.py, metrics.py)
    gateway_workers: int = Field(1, ge=1, le=64)
    # streamed generations (/v1/generate, /v1/completions with stream: true) served by plain ASGI code rather
    # than through FastAPI's layers (service/gateway/fastpath.py): the same answers, less CPU per request and event
    gateway_fast_path: bool = True
    # set by the launcher for its gateway processes, not by users: the folder holding their shared
    # admission counters and prometheus-client's multiprocess files
    gateway_shared_dir: Path | None = None
    # admission per model: generations in flight (= the handler's batch, service/archive.py) and queued
    max_running_per_model: int = Field(64, ge=1)
    max_waiting_per_model: int = Field(64, ge=0)
    # and by cost: the tokens the requests in flight read, score and decode (gateway/cost.py). 2**18 holds the
    # largest valid request of any route alone (64 texts of 1,000 characters with as long a prefix, 256 tokens
    # at beam 8: 259,072), or 64 generations of 2,048 prompt characters and 2,048 tokens
    max_tokens_in_flight_per_model: int = Field(2**18, ge=1)
    # continuation: the key that signs returned states (the same on every replica; unset: a random key,
    # states valid on this process only) and the bounds of server-held sessions
    state_key: SecretStr | None = None
    max_sessions_per_model: int = Field(10000, ge=1)
    max_session_bytes_per_model: int = Field(256 * 2**20, ge=1024)
    session_ttl_s: float = Field(3600.0, gt=0)
    # each API key's share of those bounds, per model (unset: the bounds divided evenly among the keys);
    # the shares of all keys must fit in the bounds, so that no key's sessions push out another's
    max_sessions_per_key: int | None = Field(None, ge=1)
    max_session_bytes_per_key: int | None = Field(None, ge=1024)
    # where sessions live: unset, this process's memory; redis://host:port/db, one Redis that every gateway
    # process and replica shares; a session call fails with 503 after the timeout when Redis does not answer
    session_store: str | None = Field(None, pattern=r"^rediss?://")
    session_store_timeout_s: float = Field(1.0, gt=0, le=30)

    # TorchServe (started by `rnnserve serve`, or reached at ts_url when run elsewhere)
    ts_host: str = "127.0.0.1"
    ts_inference_port: int = Field(8080, ge=1, le=65535)
    ts_management_port: int = Field(8081, ge=1, le=65535)
    ts_metrics_port: int = Field(8082, ge=1, le=65535)
    ts_grpc_inference_port: int = Field(7070, ge=1, le=65535)
    ts_grpc_management_port: int = Field(7071, ge=1, le=65535)
    ts_worker_port: int = Field(9000, ge=1, le=65535)  # workers use Unix sockets /tmp/.ts.sock.<port>
    # TorchServe's inference API on this Unix socket instead of ts_inference_port, where both run on one machine:
    # nothing answers inference over TCP, and only users who may open the file reach it (no change in speed was
    # measured, BENCHMARKS.md)
    ts_inference_socket: Path | None = None
    # inference URL of a TorchServe not started by us (compose, k8s): http(s)://host:port or unix:/path/to.sock
    ts_url: str | None = Field(None, pattern=r"^$|^(https?://|unix:/)")  # empty: unset
    ts_management_url: str | None = None
    ts_key_file: Path | None = None  # TorchServe's key_file.json; default run_dir/key_file.json
    ts_token_auth: bool = True
    ts_start_timeout_s: float = Field(180.0, gt=0)
    # requests TorchServe queues per model beyond the worker's batch (its job_queue_size). Unset: the larger
    # of 1,024 and max_running_per_model, so that everything the gateway admits fits and only the gateway
    # refuses (429 with Retry-After), never TorchServe (503). Set it to the sum of max_running_per_model
    # over every gateway replica that shares one TorchServe.
    ts_job_queue_size: int | None = Field(None, ge=1)
    # TorchServe's JVM compiles its hot paths with the quick compiler (C1) only, unless this is set: the optimizing
    # compiler (C2) took most of the frontend's CPU over the first minutes of streaming (BENCHMARKS.md)
    ts_optimizing_jit: bool = False
    run_dir: Path = REPO_ROOT / "run"  # TorchServe's working directory: logs, key file, config
    model_store: Path = MODEL_STORE
    models_dir: Path = MODELS_DIR
    models: list[str] = []  # served models; empty = every archive in the model store

    # CPU placement (service/affinity.py): "none" leaves it to the scheduler; "auto" holds the gateway and
    # TorchServe's frontend to the first core(s) of a CPU machine and leaves every core to the workers, as
    # does a CPU list such as "0". It helps translation; for streamed generation it is unclear (BENCHMARKS.md)
    frontend_cpus: str = "none"

    # readiness: a real inference per model, repeated so that an outage shows
    ready_probe_interval_s: float = Field(5.0, gt=0)
    # a model that cannot produce one token in this time is not ready: TorchServe queues requests
    # while a dead worker restarts, so a probe without a bound would wait out the outage
    ready_probe_timeout_s: float = Field(5.0, gt=0)
    upstream_connect_timeout_s: float = Field(2.0, gt=0)

    @field_validator("host", "ts_host")
    @classmethod
    def _known_host(cls, v: str) -> str:
        if not v:
            raise ValueError("must not be empty")
        return v

    @field_validator("frontend_cpus")
    @classmethod
    def _cpu_list(cls, v: str) -> str:
        if v not in ("auto", "none"):
            from rnnserve.service.affinity import parse_cpus

            parse_cpus(v)  # a clear error at start, not when TorchServe is launched
        return v

    @field_validator("ts_inference_socket", mode="before")
    @classmethod
    def _socket_path(cls, v: object) -> object:
        if v is None or v == "":
            return None  # an empty variable (compose's default) means unset
        if len(os.fsencode(Path(v).resolve())) > 107:  # sun_path holds 108 bytes with its NUL
            raise ValueError(f"{Path(v).resolve()} is longer than a Unix socket's path may be (107 bytes)")
        return v

    @field_validator("state_key")
    @classmethod
    def _long_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value():
            return None  # an empty variable (compose's default) means unset
        if v is not None and len(v.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters (for example `openssl rand -hex 32`)")
        return v

    @model_validator(mode="after")
    def _loopback_unless_asked(self) -> "Settings":
        if not self.allow_public_bind and not is_loopback(self.host):
            raise ValueError(f"host {self.host!r} is not a loopback address; set RNNSERVE_ALLOW_PUBLIC_BIND=true "
                             "to serve on it (and set RNNSERVE_API_KEYS)")
        ports = [self.port, self.ts_inference_port, self.ts_management_port, self.ts_metrics_port,
                 self.ts_grpc_inference_port, self.ts_grpc_management_port]
        if len(set(ports)) != len(ports):
            raise ValueError(f"gateway and TorchServe ports must all differ, got {ports}")
        keys = max(1, len(self.api_keys))
        for name, share, bound in (("max_sessions_per_key", self.max_sessions_per_key, self.max_sessions_per_model),
                                   ("max_session_bytes_per_key", self.max_session_bytes_per_key,
                                    self.max_session_bytes_per_model)):
            if share is not None and share * keys > bound:
                raise ValueError(f"{name} ({share}) x {keys} API keys exceeds the per-model bound ({bound}): "
                                 "one key's sessions could then push out another's")
        return self

    @property
    def session_quota(self) -> tuple[int, int]:
        """(sessions, bytes) each API key may hold per model."""
        keys = max(1, len(self.api_keys))
        return (self.max_sessions_per_key or self.max_sessions_per_model // keys,
                self.max_session_bytes_per_key or self.max_session_bytes_per_model // keys)

    @property
    def inference_url(self) -> str:
        if self.ts_url:
            return self.ts_url
        if self.ts_inference_socket:
            return f"unix:{self.ts_inference_socket.resolve()}"
        return f"http://{self.ts_host}:{self.ts_inference_port}"

    @property
    def management_url(self) -> str:
        return self.ts_management_url or f"http://{self.ts_host}:{self.ts_management_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.ts_host}:{self.ts_metrics_port}/metrics"

    @property
    def job_queue_size(self) -> int:
        return self.ts_job_queue_size or max(1024, self.max_running_per_model)

    @property
    def key_file(self) -> Path:
        return self.ts_key_file or self.run_dir / "key_file.json"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
