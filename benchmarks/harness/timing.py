"""Timing: batches of calls in interleaved rounds, wall and CPU time, the GC held steady.

A round runs one batch of every series back to back, the order rotated each
round, so a slow spell of a shared machine lands on all of them alike; a
comparison of two series is made round by round (``Rounds.ratio``).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field

now_ns = time.perf_counter_ns
cpu_ns = time.thread_time_ns  # this thread's CPU time: other processes cannot inflate it


def percentile(values: list[int] | list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return float(ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1])


@dataclass
class Series:
    """One operation's µs/op, batch by batch: wall-clock time and CPU time."""

    name: str
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    calls: int = 0  # every call made, warm-up included: what the balance checks count

    @property
    def median(self) -> float:
        """Median wall-clock µs/op over the batches."""
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        """Median CPU µs/op over the batches."""
        return statistics.median(self.cpu)

    @property
    def ops_per_s(self) -> float:
        """Operations per second at the median."""
        return 1e6 / self.median


@dataclass
class Rounds:
    """Series timed side by side: round ``r`` holds batch ``r`` of every series."""

    series: dict[str, Series]
    ops: dict[str, int]
    repeats: int

    def __getitem__(self, name: str) -> Series:
        return self.series[name]

    def ratios(self, a: str, b: str) -> list[float]:
        """``a``'s batch over ``b``'s, round by round."""
        return [x / y for x, y in zip(self[a].wall, self[b].wall, strict=True)]

    def differences(self, a: str, b: str, *, cpu: bool = False) -> list[float]:
        """``a``'s batch minus ``b``'s (µs/op), round by round."""
        first, second = (self[a].cpu, self[b].cpu) if cpu else (self[a].wall, self[b].wall)
        return [x - y for x, y in zip(first, second, strict=True)]

    def ratio(self, a: str, b: str) -> float:
        """The paired ratio: the median over the rounds of ``a``'s batch / ``b``'s."""
        return statistics.median(self.ratios(a, b))

    def difference(self, a: str, b: str, *, cpu: bool = False) -> float:
        """The paired difference: the median over the rounds of ``a``'s batch - ``b``'s (µs)."""
        return statistics.median(self.differences(a, b, cpu=cpu))


def batch(call: Callable[[], object], ops: int, *, gc_off: bool = False) -> tuple[float, float]:
    """Call ``call`` ``ops`` times; (wall, CPU) µs per call. ``gc_off`` pauses the GC meanwhile."""
    if gc_off:
        gc.disable()
    try:
        wall, cpu = now_ns(), cpu_ns()
        for _ in range(ops):
            call()
        return (now_ns() - wall) / ops / 1000, (cpu_ns() - cpu) / ops / 1000
    finally:
        if gc_off:
            gc.enable()


async def abatch(call: Callable[[], Awaitable[object]], ops: int) -> tuple[float, float]:
    """Await ``call()`` ``ops`` times in the running loop; (wall, CPU) µs per call."""
    wall, cpu = now_ns(), cpu_ns()
    for _ in range(ops):
        await call()
    return (now_ns() - wall) / ops / 1000, (cpu_ns() - cpu) / ops / 1000


def _plan(result: Rounds, warmup: int | None) -> Iterator[tuple[Series, int, bool]]:
    """(series, calls, timed) in order: each series' warm-up, then the rotated rounds.

    Counts every call on its series, and collects garbage before the rounds.
    """
    names = list(result.series)
    for name in names:
        count = max(1, result.ops[name] // 10) if warmup is None else warmup
        result.series[name].calls += count
        if count:
            yield result.series[name], count, False
    gc.collect()
    for number in range(result.repeats):
        shift = number % len(names)
        for name in names[shift:] + names[:shift]:
            result.series[name].calls += result.ops[name]
            yield result.series[name], result.ops[name], True


def interleave(
    calls: Mapping[str, Callable[[], object]],
    *,
    ops: int | Mapping[str, int] | None = None,
    round_s: float = 0.0,
    repeats: int,
    warmup: int | None = None,
    gc_off: Collection[str] = (),
) -> Rounds:
    """Time every call in ``repeats`` interleaved rounds of one batch each.

    ``ops`` is the batch size (one for all, or per series); without it, a
    probe of 20 calls each picks the size that makes a round last about
    ``round_s``. Each series first runs ``warmup`` calls (default: a tenth of
    its batch). The GC stays on, as users run it, except in the batches of the
    series named in ``gc_off`` (it collects between batches then).
    """
    result = Rounds({name: Series(name) for name in calls}, {}, repeats)
    if ops is None:
        estimate = sum(batch(call, 20)[0] for call in calls.values())
        ops = max(10, int(round_s * 1e6 / estimate))
        for series in result.series.values():
            series.calls += 20
    result.ops = {name: ops if isinstance(ops, int) else ops[name] for name in calls}
    for series, count, timed in _plan(result, warmup):
        paused = series.name in gc_off
        wall, cpu = batch(calls[series.name], count, gc_off=paused and timed)
        if timed:
            series.wall.append(wall)
            series.cpu.append(cpu)
            if paused:
                gc.collect()
    return result


async def ainterleave(
    calls: Mapping[str, Callable[[], Awaitable[object]]],
    *,
    ops: int | Mapping[str, int],
    repeats: int,
    warmup: int | None = None,
) -> Rounds:
    """``interleave`` for coroutine functions, every batch awaited in the running loop."""
    sizes = {name: ops if isinstance(ops, int) else ops[name] for name in calls}
    result = Rounds({name: Series(name) for name in calls}, sizes, repeats)
    for series, count, timed in _plan(result, warmup):
        wall, cpu = await abatch(calls[series.name], count)
        if timed:
            series.wall.append(wall)
            series.cpu.append(cpu)
    return result
