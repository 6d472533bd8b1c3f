"""TorchServe is hardened and only the gateway uses it; archives hold no pickles."""
import json
import stat
import zipfile

import httpx
import pytest

pytestmark = pytest.mark.e2e


def props(stack) -> dict:
    lines = (stack.run_dir / "config.properties").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def test_torchserve_config_is_hardened(stack):
    p = props(stack)
    for key in ("inference_address", "management_address", "metrics_address"):
        assert p[key].startswith("http://127.0.0.1:"), key
    assert p["grpc_inference_address"] == p["grpc_management_address"] == "127.0.0.1"
    assert p["enable_model_api"] == "false" and p["install_py_dep_per_model"] == "false"
    assert p["disable_token_authorization"] == "false" and p["enable_envvars_config"] == "false"
    assert p["allowed_urls"].startswith("file://") and "http" not in p["allowed_urls"]
    # set on purpose: the largest body the gateway forwards (256 KiB, its JSON escapes at most triple it), and
    # the frame limit that no valid request's frame comes near (service/torchserve.py)
    assert int(p["max_request_size"]) == 1024 * 1024
    assert int(p["max_response_size"]) == 16 * 1024 * 1024


def test_torchserve_refuses_requests_without_its_token_and_keeps_the_key_file_private(stack):
    p = props(stack)
    inference = p["inference_address"]
    r = httpx.post(f"{inference}/predictions/lm-shakespeare", json={"prompt": "a", "max_tokens": 1})
    assert r.status_code in (400, 401)
    key_file = stack.run_dir / "key_file.json"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    keys = json.loads(key_file.read_text())
    management = p["management_address"]
    headers = {"Authorization": f"Bearer {keys['management']['key']}"}
    # registering a model from a URL is off, even with the management key
    r = httpx.post(f"{management}/models", params={"url": "https://example.com/evil.mar"}, headers=headers)
    assert r.status_code >= 400
    log = stack.log.read_text()
    for k in (keys["inference"]["key"], keys["management"]["key"], keys["API"]["key"]):
        assert k not in log  # the gateway never logs TorchServe's keys


def test_archives_hold_no_pickle(stack):
    store = stack.run_dir.parent / "model_store"
    for mar in store.glob("*.mar"):
        names = zipfile.ZipFile(mar).namelist()
        assert not [n for n in names if n.endswith((".pt", ".pth", ".pkl", ".bin"))], names
        assert "model.safetensors" in names
