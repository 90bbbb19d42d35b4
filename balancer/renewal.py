"""One thread per process that renews leases while their holders work: an LLM call's slot (the load
balancer's rule 4) and a task's step lease (orchestration/leases.py).

A thread per held lease cost a thread's start and join on every call and every step; this one thread
calls each registered renewal every ``interval_s`` until it is removed. A renewal that raises is
logged and tried again at its next time. A forked child (Celery's prefork pool) forgets the parent's
renewals and starts a thread of its own the first time it registers one.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Renewer:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._condition = threading.Condition()
        self._due: list[tuple[float, int]] = []  # (when, handle), a heap
        self._renewals: dict[int, tuple[float, Callable[[], object]]] = {}
        self._handles = itertools.count(1)
        self._pid: int | None = None
        self._running: int | None = None
        # A forked child must not inherit a lock that the parent's thread held at the fork.
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._condition = threading.Condition()
        self._due = []
        self._renewals = {}
        self._running = None
        self._pid = None

    def add(self, renew: Callable[[], object], interval_s: float) -> int:
        """Call ``renew`` every ``interval_s`` from now on; returns the handle that ``remove`` takes."""
        with self._condition:
            self._ensure_thread()
            handle = next(self._handles)
            self._renewals[handle] = (interval_s, renew)
            heapq.heappush(self._due, (self.clock() + interval_s, handle))
            if self._due[0][1] == handle:  # due before the one the thread waits for (a wake-up costs the GIL)
                self._condition.notify()
            return handle

    def remove(self, handle: int) -> None:
        """Stop renewing; a renewal running right now finishes first (so the caller can release after)."""
        with self._condition:
            self._renewals.pop(handle, None)
            while self._running == handle:
                self._condition.wait()

    def _ensure_thread(self) -> None:
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        threading.Thread(target=self._loop, name="lease-renewer", daemon=True).start()

    def _loop(self) -> None:
        pid = os.getpid()
        with self._condition:
            while self._pid == pid:
                if not self._due:
                    self._condition.wait()
                    continue
                when, handle = self._due[0]
                if handle not in self._renewals:
                    heapq.heappop(self._due)
                    continue
                wait = when - self.clock()
                if wait > 0:
                    self._condition.wait(wait)
                    continue
                heapq.heappop(self._due)
                interval, renew = self._renewals[handle]
                self._running = handle
                self._condition.release()
                try:
                    renew()
                except Exception:
                    logger.warning("a lease renewal failed; it is tried again in %.1fs", interval, exc_info=True)
                finally:
                    self._condition.acquire()
                    self._running = None
                    self._condition.notify_all()
                if handle in self._renewals:
                    heapq.heappush(self._due, (self.clock() + interval, handle))


# The process's renewer, shared by the load balancer and the step leases.
renewer = Renewer()
