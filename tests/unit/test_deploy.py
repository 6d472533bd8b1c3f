"""What can be checked of the deployment without a Docker engine or a cluster."""
import json
import re

import yaml

from rnnserve.paths import REPO_ROOT
from rnnserve.service.settings import Settings

COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
S = COMPOSE["services"]
DEFAULTS = Settings()


def test_only_gateway_and_grafana_are_published_and_on_loopback():
    published = {name: svc.get("ports", []) for name, svc in S.items() if svc.get("ports")}
    assert published == {"gateway": [f"127.0.0.1:${{RNNSERVE_GATEWAY_PORT:-{DEFAULTS.port}}}:{DEFAULTS.port}"],
                         "grafana": ["127.0.0.1:${GRAFANA_PORT:-3000}:3000"]}
    assert COMPOSE["networks"]["internal"]["internal"] is True
    assert S["torchserve"]["networks"] == ["internal"] and S["prometheus"]["networks"] == ["internal"]


def test_torchserve_reserves_a_gpu_and_the_cpu_override_removes_it():
    (device,) = S["torchserve"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    cpu = (REPO_ROOT / "docker-compose.cpu.yml").read_text()
    assert "deploy: !reset {}" in cpu and "VARIANT: cpu" in cpu


def test_every_service_has_a_healthcheck_and_waits_for_healthy_dependencies():
    for name, svc in S.items():
        assert svc["healthcheck"]["test"][0] == "CMD", name
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in S and cond == {"condition": "service_healthy"}, name
    assert S["gateway"]["healthcheck"]["test"][-1].endswith(f":{DEFAULTS.port}/readyz")
    assert S["torchserve"]["healthcheck"]["test"][-1].endswith(f":{DEFAULTS.ts_metrics_port}/metrics")


def test_environment_names_settings_that_exist_and_urls_agree_with_ports():
    fields = set(Settings.model_fields)
    for svc in S.values():
        for key in svc.get("environment", {}):
            if key.startswith("RNNSERVE_"):
                assert key[len("RNNSERVE_"):].lower() in fields, key
    env = S["gateway"]["environment"]
    assert env["RNNSERVE_TS_URL"] == f"http://torchserve:{DEFAULTS.ts_inference_port}"
    assert env["RNNSERVE_TS_MANAGEMENT_URL"] == f"http://torchserve:{DEFAULTS.ts_management_port}"


def test_mounted_files_exist_in_the_repository():
    for name, svc in S.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO_ROOT / source).exists(), (name, source)
            else:
                assert source in COMPOSE["volumes"], (name, source)
    assert S["gateway"]["volumes"] == ["ts-run:/srv/run:ro"] and S["torchserve"]["volumes"] == ["ts-run:/srv/run"]


def test_prometheus_scrapes_the_gateway_and_torchserve_by_service_name():
    prom = yaml.safe_load((REPO_ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in prom["scrape_configs"]}
    assert targets == {"rnnserve-gateway": [f"gateway:{DEFAULTS.port}"],
                       "torchserve": [f"torchserve:{DEFAULTS.ts_metrics_port}"]}


def test_grafana_is_provisioned_from_the_repository():
    ds = yaml.safe_load((REPO_ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090" and ds["datasources"][0]["uid"] == "prometheus"
    prov = yaml.safe_load((REPO_ROOT / "deploy/grafana/provisioning/dashboards/rnnserve.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    board = json.loads((REPO_ROOT / "deploy/grafana/dashboards/rnnserve.json").read_text())
    assert {p["datasource"]["uid"] for p in board["panels"]} == {"prometheus"}
    import importlib.util

    spec = importlib.util.spec_from_file_location("dashboard", REPO_ROOT / "deploy/grafana/dashboard.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.dashboard() == board  # the committed JSON is what the generator writes


def test_dockerfile_pins_torch_runs_as_non_root_and_builds_archives():
    text = (REPO_ROOT / "Dockerfile").read_text()
    pin = re.findall(r'"torch==([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text())
    assert re.findall(r"torch==([\w.+]+)", text) == pin == ["2.13.0"]  # one pin, the project's
    assert "USER rnnserve" in text and "HEALTHCHECK" in text and "rnnserve archive" in text
    assert '$([ "$VARIANT" = cuda ] && echo --gpu)' in text  # the cuda image: the GPU worker profile
    for path in re.findall(r"^COPY (?!--from=)(\S+)", text, re.M):
        assert (REPO_ROOT / path).exists(), path


def test_kubernetes_manifests():
    docs = {d["kind"]: d for d in yaml.safe_load_all((REPO_ROOT / "deploy/k8s/rnnserve.yaml").read_text())}
    assert set(docs) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert containers["torchserve"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    gw = containers["gateway"]
    assert gw["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gw["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gw["ports"][0]["containerPort"] == DEFAULTS.port
    assert "ports" not in containers["torchserve"]  # TorchServe stays on the pod's loopback
    fields = set(Settings.model_fields)
    for c in containers.values():
        for e in c.get("env", []):
            assert e["name"][len("RNNSERVE_"):].lower() in fields
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]


def test_archives_are_rebuilt_when_a_model_folder_changes(tmp_path, tiny_lm_folder):
    import os

    from rnnserve.models.folder import copy_model_folder
    from rnnserve.service.archive import stale_archives

    models, store = tmp_path / "models", tmp_path / "store"
    copy_model_folder(tiny_lm_folder, models / "m")
    store.mkdir()
    assert stale_archives(models, store) == ["m"]
    (store / "m.mar").touch()
    assert stale_archives(models, store) == []
    later = (store / "m.mar").stat().st_mtime + 10
    os.utime(models / "m" / "model.safetensors", (later, later))
    assert stale_archives(models, store) == ["m"]


def test_gpu_deployments_run_several_gateway_processes_and_the_cpu_one_runs_one():
    gpu = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]["gateway"]["environment"]
    cpu = (REPO_ROOT / "docker-compose.cpu.yml").read_text()  # compose's !reset tag is not plain YAML
    assert gpu["RNNSERVE_GATEWAY_WORKERS"] == "${RNNSERVE_GATEWAY_WORKERS:-4}"
    assert 'RNNSERVE_GATEWAY_WORKERS: "${RNNSERVE_GATEWAY_WORKERS:-1}"' in cpu
    docs = {d["kind"]: d for d in yaml.safe_load_all((REPO_ROOT / "deploy/k8s/rnnserve.yaml").read_text())}
    gw = next(c for c in docs["Deployment"]["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway")
    assert {"name": "RNNSERVE_GATEWAY_WORKERS", "value": "4"} in gw["env"]
    assert {"name": "gateway-tmp", "mountPath": "/tmp"} in gw["volumeMounts"]  # their shared files, on a read-only root
