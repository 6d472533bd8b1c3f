"""The gateway process's garbage collector, set for a long-running server holding many streams.

CPython's cyclic collector walks every tracked object of a generation each time it runs. The gateway process
holds about 230,000 of them before it serves anything (its imports: FastAPI, pydantic, uvicorn and, under
`rnnserve serve`, torch through the archive builder), and each full collection walked them all: about 100 ms,
several times a minute under load. Its young generation was collected every 700 allocations, which a few
streams' events reach. With a thousand streams in flight more of their objects live long enough to be walked,
so the collector's share of the gateway's CPU per streamed token grew with the streams (BENCHMARKS.md).

`settle()`, once the app is built and before it serves: the objects alive then are moved to the permanent
generation, which no collection walks (they live as long as the process), and the young generation is
collected every YOUNG_THRESHOLD allocations. The requests' own objects are freed by reference counting as
before; what the collector still finds, reference cycles, is the same garbage, found later.
"""
from __future__ import annotations

import gc

# allocations (net of deallocations) between collections of the youngest generation; CPython's default is 700
YOUNG_THRESHOLD = 20_000


def settle() -> None:
    """Freeze what exists now (the imports and the app) out of every later collection, and collect the young
    generation less often. For the gateway process's entry points only: a test process that called it would
    keep its garbage of the moment for good."""
    gc.collect()  # what is garbage now is not frozen
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
