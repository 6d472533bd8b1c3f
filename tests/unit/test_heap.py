"""The gateway process's garbage collector (service/gateway/heap.py), set by its entry points. Each check runs in a
fresh interpreter: settling the test process would keep its objects of the moment for good."""
import subprocess
import sys
import textwrap

from rnnserve.service.gateway.heap import YOUNG_THRESHOLD


def _run(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_settle_freezes_what_exists_and_collects_the_young_generation_less_often():
    frozen, young, middle, old, middle_was, old_was, garbage_freed, cycle_freed = _run("""
        import gc, weakref
        from rnnserve.service.gateway import heap
        middle, old = gc.get_threshold()[1:]
        class Node: pass
        before = Node(); before.me = before  # garbage when settling: collected, not frozen
        was = weakref.ref(before); del before
        heap.settle()
        after = Node(); after.me = after  # a cycle made later: still collected
        gone = weakref.ref(after); del after
        gc.collect()
        print(gc.get_freeze_count(), *gc.get_threshold(), middle, old, was() is None, gone() is None)
    """)
    assert int(frozen) > 1000 and int(young) == YOUNG_THRESHOLD
    assert (middle, old) == (middle_was, old_was)  # only the young generation's threshold changes
    assert garbage_freed == "True" and cycle_freed == "True"


def test_the_gateway_process_entry_settles_its_heap_once_the_app_is_built():
    frozen, young, has_app = _run("""
        import gc
        from rnnserve.service.launcher import gateway_app
        app = gateway_app()
        print(gc.get_freeze_count(), gc.get_threshold()[0], type(app).__name__)
    """)
    assert int(frozen) > 10_000 and int(young) == YOUNG_THRESHOLD and has_app == "Gateway"
