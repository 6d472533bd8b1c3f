from rnnserve.service.settings import Settings
from rnnserve.service.torchserve import write_config


def _props(tmp_path, **kw) -> dict[str, str]:
    path = write_config(Settings(run_dir=tmp_path, **kw), ["m"])
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


def test_torchserve_queues_everything_the_gateway_admits(tmp_path):
    # the gateway's admission is the only thing that refuses: TorchServe's queue holds all it lets through
    assert _props(tmp_path)["job_queue_size"] == "1024"
    assert _props(tmp_path, max_running_per_model=4096)["job_queue_size"] == "4096"
    # several gateway replicas over one TorchServe: the sum of their bounds, set by hand
    assert _props(tmp_path, ts_job_queue_size=3000)["job_queue_size"] == "3000"


def test_torchserve_jvm_compiles_with_the_quick_compiler_unless_asked(tmp_path):
    assert _props(tmp_path)["vmargs"] == "-Xmx1g -XX:+ExitOnOutOfMemoryError -XX:TieredStopAtLevel=1"
    assert _props(tmp_path, ts_optimizing_jit=True)["vmargs"] == "-Xmx1g -XX:+ExitOnOutOfMemoryError"


def test_the_inference_address_on_a_unix_socket_when_asked(tmp_path):
    props = _props(tmp_path, ts_host="127.0.0.1", ts_inference_port=8123)
    assert props["inference_address"] == "http://127.0.0.1:8123"
    sock = tmp_path / "ts.sock"
    settings = Settings(run_dir=tmp_path, ts_inference_socket=sock)
    assert settings.inference_url == f"unix:{sock.resolve()}"  # what the gateway connects to
    assert _props(tmp_path, ts_inference_socket=sock)["inference_address"] == f"unix:{sock.resolve()}"
    # the other APIs stay on their ports
    assert _props(tmp_path, ts_inference_socket=sock)["management_address"].startswith("http://127.0.0.1:")
    assert Settings(ts_inference_socket="").ts_inference_socket is None  # an empty variable is unset


def test_a_unix_socket_path_too_long_or_a_url_of_another_scheme_is_refused(tmp_path):
    import pydantic
    import pytest

    with pytest.raises(pydantic.ValidationError, match="longer than a Unix socket's path may be"):
        Settings(ts_inference_socket=tmp_path / ("x" * 120))
    with pytest.raises(pydantic.ValidationError, match="ts_url"):
        Settings(ts_url="ftp://torchserve:8080")
    assert Settings(ts_url="unix:/run/ts.sock").inference_url == "unix:/run/ts.sock"
    assert Settings(ts_url="", ts_inference_port=8123).inference_url == "http://127.0.0.1:8123"  # empty: unset
