"""The process's one renewer thread: renewals run on time until removed, a failing one goes on, and a
forked child renews in a thread of its own."""

from __future__ import annotations

import os
import threading
import time

from balancer.renewal import Renewer


def _wait(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_renewals_run_every_interval_until_removed():
    renewer = Renewer()
    fast, slow = [], []
    first = renewer.add(lambda: fast.append(time.monotonic()), 0.02)
    second = renewer.add(lambda: slow.append(time.monotonic()), 0.2)
    assert _wait(lambda: len(slow) >= 2)
    assert len(fast) >= 10 * (len(slow) - 1)  # each on its own interval
    renewer.remove(first)
    count = len(fast)
    time.sleep(0.1)
    assert len(fast) == count and len(slow) >= 2
    renewer.remove(second)


def test_a_failing_renewal_is_tried_again_and_does_not_stop_the_others():
    renewer = Renewer()
    failures, others = [], []

    def fail() -> None:
        failures.append(1)
        raise RuntimeError("Redis is away")

    handles = [renewer.add(fail, 0.02), renewer.add(lambda: others.append(1), 0.02)]
    assert _wait(lambda: len(failures) >= 3 and len(others) >= 3)
    for handle in handles:
        renewer.remove(handle)


def test_remove_waits_for_a_renewal_that_is_running():
    renewer = Renewer()
    started, finished = threading.Event(), threading.Event()

    def slow() -> None:
        started.set()
        time.sleep(0.2)
        finished.set()

    handle = renewer.add(slow, 0.01)
    assert started.wait(5)
    renewer.remove(handle)
    assert finished.is_set()


def test_a_forked_child_renews_in_its_own_thread():
    renewer = Renewer()
    renewer.add(lambda: None, 0.01)
    pid = os.fork()
    if pid == 0:  # the child: the parent's thread is not here
        calls = []
        renewer.add(lambda: calls.append(1), 0.01)
        os._exit(0 if _wait(lambda: len(calls) >= 3) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_renewal_due_before_the_one_waited_for_runs_on_its_own_time():
    """The thread is woken only by a renewal that is due before the one it waits for: such a renewal must
    not wait for the later one, and one due after it must still run once its time comes."""
    renewer = Renewer()
    late, early, later = [], [], []
    handles = [renewer.add(lambda: late.append(1), 1.0)]
    time.sleep(0.05)  # the thread waits for the renewal due in 1 s
    handles.append(renewer.add(lambda: early.append(1), 0.02))
    assert _wait(lambda: len(early) >= 3, timeout=0.5)  # did not wait for the first one's second
    handles.append(renewer.add(lambda: later.append(1), 0.3))  # not the next due: no wake-up needed
    assert _wait(lambda: len(later) >= 1, timeout=0.6)
    for handle in handles:
        renewer.remove(handle)
