"""The finaliser thread that charges sync streams dropped unfinished.

The garbage collector may finalise a stream in a thread that holds a lock the
charge needs, so a finaliser never charges itself: it hands the charge to one
small daemon thread (a bounded queue) and waits a moment for it, which is
long enough when nothing is in the way.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable

logger = logging.getLogger("creditmeter")

MAX_ABANDONED = 10_000
"""Charges of dropped streams that may wait for the finaliser thread; more are logged and lost."""

FINALIZER_WAIT = 1.0
"""Seconds a finaliser waits for its charge (it lands later if something holds it up)."""

"""Seconds a finaliser waits for its charge (it lands later if something holds it up)."""


class _Finalizer:
    """One daemon thread that charges dropped streams, fed by a queue that is safe in ``__del__``.

    ``queue.SimpleQueue.put`` is re-entrant (it may run inside a finaliser that
    interrupted another ``put``) and takes no lock a charge holds. A forked
    child gets a queue and a thread of its own; what the parent had queued is
    the parent's to charge.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._starting = threading.Lock()
        self._exit_hook = False
        self._behind = False  # a finaliser stopped waiting: the thread is held up

    def start(self) -> None:
        """Make sure this process's thread runs; call it from ordinary code, never a finaliser."""
        if self._pid == os.getpid():
            return
        with self._starting:
            if self._pid == os.getpid():
                return
            thread = threading.Thread(
                target=self._run, args=(self._queue,), name="creditmeter-finalizer", daemon=True
            )
            thread.start()
            self._thread = thread
            self._pid = os.getpid()
            if not self._exit_hook:
                atexit.register(self.flush, FINALIZER_WAIT * 5)
                self._exit_hook = True

    def after_fork(self) -> None:
        """In a forked child: forget the parent's queue and thread; start one if it had one."""
        had = self._pid != 0
        self._queue = queue.SimpleQueue()
        self._thread = None
        self._pid = 0
        self._starting = threading.Lock()
        self._behind = False
        if had:
            self.start()

    def submit(self, job: Callable[[], object]) -> None:
        """Queue ``job`` and wait up to ``FINALIZER_WAIT`` seconds for it; never blocks longer."""
        thread = self._thread
        if sys.is_finalizing() or thread is None or self._pid != os.getpid():
            logger.warning(
                "an unfinished metered stream was dropped with no finaliser: not charged"
            )
            return
        if self._queue.qsize() >= MAX_ABANDONED:
            logger.error("%d dropped streams wait to be charged: this one is not", MAX_ABANDONED)
            return
        done = threading.Event()
        self._queue.put(functools.partial(_run_then_set, job, done))
        # Wait unless the thread is held up already (then this job waits behind that one).
        if threading.current_thread() is not thread and not self._behind:
            self._behind = not done.wait(FINALIZER_WAIT)

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far has run; ``False`` if ``timeout`` passed first."""
        if self._thread is None or self._pid != os.getpid():
            return True
        done = threading.Event()
        self._queue.put(done.set)
        return done.wait(timeout)

    def _run(self, jobs: queue.SimpleQueue[Callable[[], object]]) -> None:
        while True:
            job = jobs.get()
            try:
                job()
            except Exception:
                logger.exception("charging a dropped metered stream failed")
            if jobs.empty():
                self._behind = False


def _run_then_set(job: Callable[[], object], done: threading.Event) -> None:
    try:
        job()
    finally:
        done.set()


_FINALIZER = _Finalizer()
if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_FINALIZER.after_fork)


def _flush_finalizers(timeout: float) -> bool:
    """Wait until the charges of streams dropped so far have landed (for tests)."""
    return _FINALIZER.flush(timeout)
