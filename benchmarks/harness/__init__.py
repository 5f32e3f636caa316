"""The benchmark harness: what every scenario of ``benchmarks/scenarios`` is built from.

- ``timing``: batches in interleaved rounds, wall and CPU time, GC control, paired ratios;
- ``section``: a scenario's report and its targets (named figures with a threshold);
- ``stores``: fresh stores by URL, server checks, clean-up, reading balances back;
- ``fill`` and ``floors``: bulk fills and raw floors, in each store's own layout;
- ``procs``: several writers at once, processes or threads, behind a barrier;
- ``report``: the machine block, RESULTS.md and the plot.
"""

from harness.section import Section, Target
from harness.timing import Rounds, Series, ainterleave, interleave, now_ns, percentile

__all__ = [
    "Rounds",
    "Section",
    "Series",
    "Target",
    "ainterleave",
    "interleave",
    "now_ns",
    "percentile",
]
