"""Starting and stopping `rnnserve serve`: Ctrl-C or SIGTERM leaves no java or worker process behind."""
import signal
import subprocess
import sys
import time

import pytest

from rnnserve.service.stack import start_stack, stop_stack

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
