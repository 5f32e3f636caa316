"""Benchmark scenarios: one module per section of the report, each a ``run(*, quick, workdir)``."""
