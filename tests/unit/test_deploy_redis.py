"""The session store's Redis in compose and on Kubernetes: internal only, waited for, named by the gateway."""
import pytest
import yaml

from rnnserve.paths import REPO_ROOT
from tests.unit.test_deploy_validate import compose_config

REDIS_K8S = REPO_ROOT / "deploy/k8s/redis.yaml"


def test_compose_runs_redis_on_the_internal_network_and_the_gateway_keeps_sessions_there():
    s = compose_config("docker-compose.yml", "docker-compose.cpu.yml")["services"]
    assert s["redis"]["image"] == "redis:7.4.1" and list(s["redis"]["networks"]) == ["internal"]
    assert "ports" not in s["redis"] and s["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert s["gateway"]["environment"]["RNNSERVE_SESSION_STORE"] == "redis://redis:6379/0"
    assert s["gateway"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert compose_config("docker-compose.yml", REDIS_IMAGE="rnnserve-redis:bookworm")["services"]["redis"][
        "image"] == "rnnserve-redis:bookworm"


def test_kubernetes_redis_is_valid_and_is_what_the_gateway_names():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")
    docs = {d["kind"]: d for d in yaml.safe_load_all(REDIS_K8S.read_text())}
    assert sorted(docs) == ["Deployment", "NetworkPolicy", "Service"]
    for doc in docs.values():
        kv.validate(doc, kv.latest_version(), strict=True)
    gateway = next(d for d in yaml.safe_load_all((REPO_ROOT / "deploy/k8s/rnnserve.yaml").read_text())
                   if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for c in gateway["spec"]["template"]["spec"]["containers"]
           for e in c.get("env", [])}
    service = docs["Service"]
    name, port = service["metadata"]["name"], service["spec"]["ports"][0]["port"]
    assert env["RNNSERVE_SESSION_STORE"] == f"redis://{name}:{port}/0"
    assert docs["NetworkPolicy"]["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {"app": "rnnserve"}
