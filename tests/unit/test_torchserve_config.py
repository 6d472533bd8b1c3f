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
