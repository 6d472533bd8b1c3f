"""CPU placement on the real stack, asked for with frontend_cpus auto (the suite's stack does): the gateway
and TorchServe's frontend keep the first core of a CPU machine, and every worker (which TorchServe's
frontend starts with its own mask) uses every core. Off by default: a stack without it is left alone."""
import os

import psutil
import pytest
import torch

from rnnserve.service.affinity import frontend_cpus

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")]


def test_frontend_keeps_its_cores_and_workers_get_every_core(stack):
    allowed = os.sched_getaffinity(0)  # the harness's CPUs, which the stack inherited
    gateway = psutil.Process(stack.proc.pid)
    kids = gateway.children(recursive=True)
    java = [k for k in kids if k.name() == "java"]
    workers = [k for k in kids if "model_service_worker" in " ".join(k.cmdline())]
    assert len(java) == 1 and len(workers) == 3  # three models, one worker each
    frontend = frontend_cpus("auto", allowed, gpu=torch.cuda.is_available()) or allowed
    assert set(gateway.cpu_affinity()) == frontend and set(java[0].cpu_affinity()) == frontend
    assert all(set(w.cpu_affinity()) == allowed for w in workers)
    assert (frontend != allowed) == (len(allowed) >= 2 and not torch.cuda.is_available())


def test_without_asking_nothing_is_pinned(tmp_path):
    from rnnserve.service.stack import start_stack, stop_stack

    allowed = os.sched_getaffinity(0)
    stack = start_stack(tmp_path, models_dir=_one_model(tmp_path))  # the default: none
    try:
        gateway = psutil.Process(stack.proc.pid)
        procs = [gateway, *gateway.children(recursive=True)]
        assert all(set(p.cpu_affinity()) == allowed for p in procs)
    finally:
        stop_stack(stack)


def _one_model(tmp_path):
    import shutil

    from rnnserve.paths import MODELS_DIR

    models = tmp_path / "models"
    shutil.copytree(MODELS_DIR / "lm-shakespeare", models / "lm-shakespeare")
    return models
