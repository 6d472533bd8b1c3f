"""Starting and stopping `rnnserve serve`: Ctrl-C or SIGTERM leaves no java or worker process behind; a TorchServe
that exits on its own takes the gateway down with it."""
import signal
import subprocess
import sys
import time

import pytest

from rnnserve.service.stack import free_ports, start_stack, stop_stack
from tests.e2e.waits import HANG_S

pytestmark = pytest.mark.e2e


def processes_of(run_dir) -> list[str]:
    """TorchServe's java and its Python workers carry the stack's run directory on their command line."""
    out = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(run_dir) in line and "ps -eww" not in line]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_gateway_torchserve_and_workers(tmp_path, sig):
    stack = start_stack(tmp_path)
    try:
        procs = processes_of(stack.run_dir)
        assert any("java" in p for p in procs) and any("model_service_worker" in p for p in procs)
        stack.proc.send_signal(sig)
        assert stack.proc.wait(timeout=60) == 0
    finally:
        stop_stack(stack)
    deadline = time.monotonic() + 60  # a bound against hangs only
    while processes_of(stack.run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_of(stack.run_dir) == []
    log = stack.log.read_text()
    # TorchServe honoured SIGTERM (java ran its own shutdown): nothing sat out the grace period until SIGKILL
    assert "TorchServe stopped" in log and "after SIGTERM; killed" not in log


def test_missing_java_stops_at_once_with_install_instructions(tmp_path):
    env = {"PATH": "/nonexistent", "HOME": str(tmp_path)}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "rnnserve.cli", "serve", "--port", "8999"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "TorchServe needs Java 17 or newer" in r.stderr
    assert "apt-get install -y openjdk-17-jre-headless" in r.stderr
    assert time.monotonic() - t0 < 30  # "at once": before TorchServe or any model would start


def test_sigkill_of_serve_still_takes_torchserve_and_workers_down(tmp_path):
    """Nothing runs in a SIGKILLed process: TorchServe's guard notices it was orphaned and stops the group."""
    stack = start_stack(tmp_path)
    try:
        procs = processes_of(stack.run_dir)
        assert any("java" in p for p in procs) and any("model_service_worker" in p for p in procs)
        stack.proc.kill()
        stack.proc.wait(timeout=10)
        deadline = time.monotonic() + 60
        while processes_of(stack.run_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert processes_of(stack.run_dir) == []
    finally:
        stop_stack(stack)


def test_a_killed_harness_takes_its_stack_down(tmp_path):
    """A benchmark or test run killed with SIGKILL runs no cleanup: the stack it started notices and stops."""
    harness = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from rnnserve.service.stack import "
         "start_stack; s = start_stack(Path(sys.argv[1])); print(s.proc.pid, flush=True); time.sleep(600)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        serve_pid = int(harness.stdout.readline())
        assert any("java" in p for p in processes_of(tmp_path / "run"))
        harness.kill()
        harness.wait(timeout=10)
        def serve_alive() -> bool:  # an exited process waits as a zombie until init reaps it
            stat = subprocess.run(["ps", "-o", "stat=", "-p", str(serve_pid)], capture_output=True, text=True)
            return stat.stdout.strip() not in ("", "Z")

        deadline = time.monotonic() + 60
        while (processes_of(tmp_path / "run") or serve_alive()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert processes_of(tmp_path / "run") == []
        assert not serve_alive()  # the gateway process is gone too
        log = (tmp_path / "serve.log").read_text()
        assert "is gone; stopping" in log and "TorchServe stopped" in log
    finally:
        harness.kill()


@pytest.mark.parametrize("gateways", [1, 2])
def test_a_torchserve_that_dies_stops_the_gateway_with_its_status(tmp_path, gateways):
    """TorchServe's JVM killed under a running service: `rnnserve serve` says so and exits 1 (a supervisor restarts
    it), where a gateway left alone would answer 503 for ever; with several gateway processes, all of them go."""
    stack = start_stack(tmp_path, extra_env={"RNNSERVE_GATEWAY_WORKERS": str(gateways)})
    try:
        roles = stack.processes()
        (java,) = roles["frontend"]
        # the serve process, and with several gateway processes those and multiprocessing's helper
        assert len(roles["gateway"]) == 1 if gateways == 1 else len(roles["gateway"]) >= 1 + gateways
        java.kill()
        assert stack.proc.wait(timeout=HANG_S) == 1
        for p in roles["gateway"][1:]:
            p.wait(timeout=HANG_S)  # psutil: returns once the process is gone
    finally:
        stop_stack(stack)
    log = stack.log.read_text()
    assert "TorchServe exited with status" in log and "stopping the gateway" in log
    assert "TorchServe stopped" in log
    deadline = time.monotonic() + HANG_S
    while processes_of(stack.run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_of(stack.run_dir) == []  # the workers went with their frontend


def test_a_jvm_that_cannot_start_stops_serve_with_its_error(tmp_path, stack):
    """A Java that passes the version check but cannot run TorchServe (a broken install, too little memory): the
    error TorchServe printed reaches the service's log, and `rnnserve serve` exits 1 instead of waiting."""
    java = tmp_path / "jdk" / "bin" / "java"
    java.parent.mkdir(parents=True)
    java.write_text('#!/bin/sh\nif [ "$1" = -version ]; then echo \'openjdk version "17.0.99"\' >&2; exit 0; fi\n'
                    'echo "Error occurred during initialization of VM: the test JVM" >&2\nexit 1\n')
    java.chmod(0o755)
    ports = free_ports(7)
    env = {**stack.env, "JAVA_HOME": str(tmp_path / "jdk"), "RNNSERVE_RUN_DIR": str(tmp_path / "run")}
    env.pop("RNNSERVE_PARENT_PID", None)
    cmd = [sys.executable, "-m", "rnnserve.cli", "serve"] + [
        a for flag, port in zip(("--port", "--ts-inference-port", "--ts-management-port", "--ts-metrics-port",
                                 "--ts-grpc-inference-port", "--ts-grpc-management-port", "--ts-worker-port"), ports)
        for a in (flag, str(port))]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_S * 2)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "TorchServe exited with status" in r.stderr
    assert "Error occurred during initialization of VM: the test JVM" in r.stderr
