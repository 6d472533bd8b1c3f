"""Admission counters shared by the gateway processes of one service (RNNSERVE_GATEWAY_WORKERS > 1).

One small file, mapped into every process: per model and per process, the generations it has in flight,
the tokens they cost and the generations it has queued; a table of which process holds which column. Every
change happens under an exclusive flock held for a few microseconds, so the service-wide sums bound admission
wherever a request lands. A process that dies leaves its column behind: the process that replaces it takes the
column over and zeroes it, and a full service checks for dead owners before it refuses.
"""
from __future__ import annotations

import fcntl
import mmap
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

RUNNING, WAITING, COST = 0, 1, 2  # generations in flight, queued, and the tokens in flight
KINDS = 3


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SharedCounts:
    def __init__(self, path: Path, models: list[str], processes: int, pid: int | None = None,
                 on_dead: Callable[[int], None] | None = None) -> None:
        self.pid = pid or os.getpid()  # tests stand in for several processes
        self.on_dead = on_dead  # told the pid of every dead process whose column is taken back
        self.models = {m: i for i, m in enumerate(sorted(models))}
        self.n = processes
        size = 8 * (processes + KINDS * len(self.models) * processes)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        with self.locked():
            if os.fstat(self.fd).st_size < size:
                os.ftruncate(self.fd, size)  # zeros
        self._mm = mmap.mmap(self.fd, size)
        self.cells = memoryview(self._mm).cast("q")
        self.column = self._claim()

    @contextmanager
    def locked(self):
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _cell(self, model: str, column: int, kind: int) -> int:
        return self.n + (self.models[model] * self.n + column) * KINDS + kind

    def _zero(self, column: int) -> None:
        for model in self.models:
            for kind in range(KINDS):
                self.cells[self._cell(model, column, kind)] = 0

    def _claim(self) -> int:
        pid = self.pid
        with self.locked():
            for column in range(self.n):
                owner = self.cells[column]
                if owner in (0, pid) or not _alive(owner):
                    if owner not in (0, pid) and self.on_dead:
                        self.on_dead(owner)
                    self.cells[column] = pid
                    self._zero(column)
                    return column
        raise RuntimeError(f"more than {self.n} live gateway processes share the admission counters")

    def reclaim_dead(self) -> bool:
        """Zero the columns of processes that died; True when any did. Call under `locked`."""
        freed = False
        for column in range(self.n):
            owner = self.cells[column]
            if owner and column != self.column and not _alive(owner):
                if self.on_dead:
                    self.on_dead(owner)
                self.cells[column] = 0
                self._zero(column)
                freed = True
        return freed

    def total(self, model: str, kind: int) -> int:
        """The service-wide count; call under `locked`."""
        return sum(self.cells[self._cell(model, c, kind)] for c in range(self.n))

    def own(self, model: str, kind: int) -> int:
        return self.cells[self._cell(model, self.column, kind)]

    def add(self, model: str, kind: int, units: int) -> None:
        """Change this process's count; call under `locked`."""
        self.cells[self._cell(model, self.column, kind)] += units

    def close(self) -> None:
        with self.locked():
            if self.cells[self.column] == self.pid:
                self._zero(self.column)
                self.cells[self.column] = 0
        self.cells.release()
        self._mm.close()
        os.close(self.fd)
