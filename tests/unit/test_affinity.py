"""CPU placement (service/affinity.py): which CPUs the gateway and TorchServe's frontend keep."""
import os

import pytest
from pydantic import ValidationError

from rnnserve.service.affinity import WORKER_CPUS_ENV, format_cpus, free_worker, frontend_cpus, parse_cpus
from rnnserve.service.settings import Settings


def test_cpu_lists_parse_and_print():
    assert parse_cpus("0") == {0} and parse_cpus("0,2") == {0, 2} and parse_cpus("0-3, 6") == {0, 1, 2, 3, 6}
    assert format_cpus({3, 0, 1}) == "0,1,3"
    for bad in ("", "a", "1-", "3-1", "0;1", "-1"):
        with pytest.raises(ValueError, match="not a CPU list"):
            parse_cpus(bad)


def test_auto_takes_the_first_core_of_a_small_cpu_machine_and_leaves_gpus_and_single_cores_alone():
    assert frontend_cpus("auto", {0, 1}, gpu=False) == {0}
    assert frontend_cpus("auto", {2, 3, 5}, gpu=False) == {2}
    assert frontend_cpus("auto", set(range(16)), gpu=False) == {0, 1}  # one core per 8
    assert frontend_cpus("auto", {0}, gpu=False) is None
    assert frontend_cpus("auto", {0, 1}, gpu=True) is None
    assert frontend_cpus("none", {0, 1}, gpu=False) is None


def test_an_explicit_list_must_be_some_of_the_allowed_cpus():
    assert frontend_cpus("1", {0, 1, 2}, gpu=True) == {1}  # asked for: applied even with a GPU
    for spec in ("0,1", "4"):
        with pytest.raises(ValueError, match="some, not all"):
            frontend_cpus(spec, {0, 1}, gpu=False)


def test_settings_refuse_a_bad_cpu_list_at_start():
    assert Settings(frontend_cpus="0-1").frontend_cpus == "0-1"
    with pytest.raises(ValidationError, match="not a CPU list"):
        Settings(frontend_cpus="first")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_a_worker_widens_to_the_cpus_the_launcher_names(monkeypatch):
    allowed = os.sched_getaffinity(0)
    monkeypatch.setenv(WORKER_CPUS_ENV, format_cpus(allowed))
    os.sched_setaffinity(0, {min(allowed)})
    try:
        free_worker()
        assert os.sched_getaffinity(0) == allowed
    finally:
        os.sched_setaffinity(0, allowed)
