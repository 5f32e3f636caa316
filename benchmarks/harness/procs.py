"""Several writers at once: processes (or threads), started together behind a barrier.

A writer is a module-level function ``target(index, barrier, *args) -> dict``
that sets itself up, calls ``barrier.wait(timeout=...)`` once ready to start
the timed part, and returns its report. Processes fork from a forkserver that
has imported the slow packages and the writer's module once, so a run of eight
starts in milliseconds.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue as queues
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing import forkserver
from pathlib import Path
from typing import Any

BENCHMARKS = str(Path(__file__).resolve().parents[1])
_preloaded: tuple[str, ...] | None = None


def stop() -> None:
    """Stop the forkserver, if one runs (the next run starts a fresh one)."""
    with contextlib.suppress(AttributeError):  # private, and stable since Python 3.4
        forkserver._forkserver._stop()  # type: ignore[attr-defined]


def context(preload: Sequence[str]) -> Any:
    """A forkserver context whose server has imported ``preload`` (restarted if it changes)."""
    global _preloaded  # noqa: PLW0603 - one forkserver per interpreter
    ctx = multiprocessing.get_context("forkserver")
    if _preloaded != tuple(preload):
        stop()
        # Before Python 3.12 the server ignores the parent's sys.path: it finds
        # harness and scenarios through PYTHONPATH, which it inherits.
        paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if BENCHMARKS not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([BENCHMARKS, *filter(None, paths)])
        ctx.set_forkserver_preload(list(preload))
        _preloaded = tuple(preload)
        forkserver.ensure_running()
    return ctx


def _child(
    target: Callable[..., dict[str, Any]], index: int, barrier: Any, out: Any, args: tuple
) -> None:
    try:
        report = target(index, barrier, *args)
    except BaseException as exc:
        barrier.abort()  # the others stop waiting instead of hanging
        out.put({"index": index, "fatal": f"{type(exc).__name__}: {exc}"})
        return
    out.put({**report, "index": index})


def run(
    target: Callable[..., dict[str, Any]],
    count: int,
    args: tuple = (),
    *,
    threads: bool = False,
    preload: Sequence[str] = ("creditmeter",),
    timeout: float = 300.0,
) -> list[dict[str, Any]]:
    """Run ``count`` writers of ``target``; their reports in index order.

    Raises if a writer failed, died, or did not report within ``timeout``.
    """
    if threads:
        barrier, out, start = threading.Barrier(count), queues.Queue(), threading.Thread
    else:
        ctx = context([*preload, target.__module__])  # the writer's module, imported once
        barrier, out, start = ctx.Barrier(count), ctx.Queue(), ctx.Process
    workers = [start(target=_child, args=(target, i, barrier, out, args)) for i in range(count)]
    for worker in workers:
        worker.start()
    reports: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(reports) < count:
            try:
                reports.append(out.get(timeout=1.0))
            except queues.Empty:
                dead = [w.exitcode for w in workers if getattr(w, "exitcode", None)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"writers died or hung (exit codes {dead})") from None
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if not threads and worker.is_alive():
                worker.kill()
                worker.join()
    fatal = [report["fatal"] for report in reports if "fatal" in report]
    if fatal:
        raise RuntimeError(f"a writer failed: {fatal[0]}")
    return sorted(reports, key=lambda report: report["index"])
