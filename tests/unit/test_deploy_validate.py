"""The compose files as Docker Compose v2 reads them, and the Kubernetes manifests against the API's schemas.

Compose: the binary `make compose-tool` puts in .tools/, or a v2 `docker-compose` on PATH; skipped without
one. `config` reads the files only: no Docker engine is needed.
"""
import json
import os
import shutil
import subprocess

import pytest
import yaml

from rnnserve.paths import REPO_ROOT
from rnnserve.service.archive import GPU_SETTINGS, MODEL_CONFIGS
from rnnserve.service.settings import Settings

DEFAULTS = Settings()
K8S = REPO_ROOT / "deploy/k8s/rnnserve.yaml"


def compose_binary() -> str | None:
    tool = REPO_ROOT / ".tools/docker-compose"
    if tool.is_file() and os.access(tool, os.X_OK):
        return str(tool)
    found = shutil.which("docker-compose")
    if found:
        version = subprocess.run([found, "version"], capture_output=True, text=True).stdout
        if "version v2." in version:
            return found
    return None


def compose_config(*files: str, **env: str) -> dict:
    binary = compose_binary()
    if binary is None:
        pytest.skip("no Docker Compose v2 (`make compose-tool` installs one into .tools/)")
    # only what the files interpolate: a developer's own RNNSERVE_* settings must not leak in
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME")}
    args = [binary, "--project-directory", str(REPO_ROOT)]
    for f in files:
        args += ["-f", str(REPO_ROOT / f)]
    done = subprocess.run(args + ["config", "--format", "json"], capture_output=True, text=True,
                          env={**base, "GRAFANA_ADMIN_PASSWORD": "x", **env}, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_compose_files_are_valid_and_publish_on_loopback_only():
    cfg = compose_config("docker-compose.yml")
    s = cfg["services"]
    published = {name: [(p["host_ip"], p["published"], p["target"]) for p in svc["ports"]]
                 for name, svc in s.items() if svc.get("ports")}
    assert published == {"gateway": [("127.0.0.1", str(DEFAULTS.port), DEFAULTS.port)],
                         "grafana": [("127.0.0.1", "3000", 3000)]}
    assert cfg["networks"]["internal"]["internal"] is True
    assert s["torchserve"]["image"] == s["gateway"]["image"] == "rnnserve:0.1.0"
    assert s["torchserve"]["build"]["args"] == {"VARIANT": "cuda", "BASE": "python:3.11.11-slim-bookworm"}
    assert s["prometheus"]["image"] == "prom/prometheus:v2.53.2"
    assert s["grafana"]["image"] == "grafana/grafana:11.2.0"
    assert s["torchserve"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    # the gateway admits as many generations as the GPU profile's batch holds (service/archive.py)
    assert s["gateway"]["environment"]["RNNSERVE_MAX_RUNNING_PER_MODEL"] == str(
        GPU_SETTINGS["lm"]["handler"]["max_batch_size"])


def test_cpu_override_drops_the_gpu_and_builds_the_cpu_variant():
    s = compose_config("docker-compose.yml", "docker-compose.cpu.yml")["services"]
    for name in ("torchserve", "gateway"):
        assert s[name]["image"] == "rnnserve:0.1.0-cpu"
        assert s[name]["build"]["args"]["VARIANT"] == "cpu"
    assert "deploy" not in s["torchserve"]
    assert s["gateway"]["environment"]["RNNSERVE_MAX_RUNNING_PER_MODEL"] == str(
        MODEL_CONFIGS["lm"]["handler"]["max_batch_size"])


def test_overrides_change_images_and_ports_but_not_the_loopback_binding():
    s = compose_config("docker-compose.yml", "docker-compose.cpu.yml", RNNSERVE_IMAGE="x:1",
                       RNNSERVE_BASE_IMAGE="base:1", PROMETHEUS_IMAGE="prom:1", GRAFANA_IMAGE="graf:1",
                       RNNSERVE_GATEWAY_PORT="18000", GRAFANA_PORT="13000")["services"]
    assert s["gateway"]["image"] == s["torchserve"]["image"] == "x:1"
    assert s["gateway"]["build"]["args"]["BASE"] == "base:1"
    assert (s["prometheus"]["image"], s["grafana"]["image"]) == ("prom:1", "graf:1")
    assert [(p["host_ip"], p["published"]) for p in s["gateway"]["ports"]] == [("127.0.0.1", "18000")]
    assert [(p["host_ip"], p["published"]) for p in s["grafana"]["ports"]] == [("127.0.0.1", "13000")]


def test_grafana_refuses_to_start_without_an_admin_password():
    binary = compose_binary()
    if binary is None:
        pytest.skip("no Docker Compose v2 (`make compose-tool` installs one into .tools/)")
    done = subprocess.run([binary, "--project-directory", str(REPO_ROOT), "-f", str(REPO_ROOT / "docker-compose.yml"),
                           "config", "-q"], capture_output=True, text=True, timeout=120,
                          env={"PATH": os.environ.get("PATH", "")})
    assert done.returncode != 0 and "set GRAFANA_ADMIN_PASSWORD" in done.stderr


def test_kubernetes_manifests_pass_strict_schema_validation():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")
    docs = list(yaml.safe_load_all(K8S.read_text()))
    assert len(docs) == 4
    for doc in docs:
        kv.validate(doc, kv.latest_version(), strict=True)  # raises on any schema violation


def test_strict_validation_catches_a_misspelt_field():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")
    deployment = next(d for d in yaml.safe_load_all(K8S.read_text()) if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, kv.latest_version(), strict=True)
