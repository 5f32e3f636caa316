"""Instructions per call of the in-process operations, counted by valgrind's callgrind.

Timings on a shared or slow machine move by more than the few percent a
change to the hot path is worth; callgrind's instruction counts do not. The
children run with address-space randomisation off (``setarch -R``), where it
can be turned off: then objects hashed by address land in the same dict slots
every run, and a count repeats to the instruction. Each operation runs twice under
callgrind, after the same set-up and warm-up: once with no calls and once with
``--calls`` calls; the difference over the calls is its count per call.

    benchmarks/.venv/bin/python benchmarks/instructions.py            # every operation
    benchmarks/.venv/bin/python benchmarks/instructions.py charge hold+settle
    benchmarks/.venv/bin/python benchmarks/instructions.py --cache charge pyrate
    benchmarks/.venv/bin/python benchmarks/instructions.py --seeds 3 decorated

A count repeats for the same code, but any change moves objects and so the
probe lengths of dicts: ``--seeds N`` averages the counts under hash seeds
0 to N-1, to compare two commits by more than where their strings hash to.

Instructions are not time (a cache miss costs more than an add), so the
ratios here are a guide for a change, and the verdicts stay with ``run.py``.
``--cache`` also simulates the caches and branch predictor (callgrind's
``--cache-sim`` and ``--branch-sim``, about three times slower) and prints,
per call, the first-level instruction and data cache misses and the
mispredicted branches: where two paths run the same instructions in
different times, these tell why.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

from harness.floors import raw
from harness.responses import RESPONSE

from creditmeter import BalanceConfig, BalanceManager, MemoryStore, SQLiteStore, TokenUsage

WARM_UP = 300
_NO_RANDOM_ADDRESSES = ["setarch", "-R"] if shutil.which("setarch") else []


def _operations(workdir: Path) -> dict[str, Callable[[], Callable[[], object]]]:
    """Each operation's set-up, returning the call to count."""
    config = BalanceConfig(enabled=True, start_balance=10**12, allow_negative_balance=True)
    usage = TokenUsage(input=1000, output=200, cache_read=500)

    def manager() -> BalanceManager:
        made = BalanceManager(MemoryStore(), config)
        made.account("u")
        return made

    def charge() -> Callable[[], object]:
        m = manager()
        return lambda: m.charge("u", 1)

    def priced() -> Callable[[], object]:
        m = manager()
        return lambda: m.charge("u", model="gpt-4o", usage=usage)

    def hold_settle() -> Callable[[], object]:
        m = manager()
        return lambda: m.settle(m.hold("u", 10), 7)

    def decorated() -> Callable[[], object]:
        m = manager()

        @m.metered(user="user_id", model="model")
        def call(prompt: str, *, user_id: str, model: str) -> object:
            del prompt, user_id, model
            return RESPONSE

        return lambda: call("Say hello.", user_id="u", model="gpt-4o")

    def floor() -> Callable[[], object]:
        return raw("memory", "records").charge

    def pyrate() -> Callable[[], object]:
        from pyrate_limiter import Duration, InMemoryBucket, Limiter, Rate  # noqa: PLC0415

        limiter = Limiter(InMemoryBucket([Rate(10**9, Duration.DAY)]))
        return lambda: limiter.try_acquire("u", 1)

    def sqlite(durability: str) -> Callable[[], Callable[[], object]]:
        def made() -> Callable[[], object]:
            store = SQLiteStore(workdir / f"{durability}.db", durability=durability)  # type: ignore[arg-type]
            m = BalanceManager(store, config)
            m.account("u")
            return lambda: m.charge("u", Decimal(1))

        return made

    return {
        "charge": charge,
        "records-floor": floor,
        "pyrate": pyrate,
        "priced": priced,
        "hold+settle": hold_settle,
        "decorated": decorated,
        "sqlite-normal": sqlite("normal"),
    }


def _child(name: str, calls: int) -> None:
    """Set up ``name``, warm it up, then make ``calls`` calls (run under callgrind)."""
    with tempfile.TemporaryDirectory() as folder:
        call = _operations(Path(folder))[name]()
        for _ in range(WARM_UP):
            call()
        for _ in range(calls):
            call()


# callgrind's event names, as its summary line gives them with the simulations on.
_CACHE_EVENTS = {
    "I1mr": "L1 instruction misses",
    "D1mr": "L1 data read misses",
    "D1mw": "L1 data write misses",
    "Bcm": "conditional branches mispredicted",
    "Bim": "indirect branches mispredicted",
}


def _count(name: str, calls: int, seed: int = 0) -> int:
    """Instructions of one child run under callgrind."""
    return _events(name, calls, cache=False, seed=seed)["Ir"]


def _events(name: str, calls: int, *, cache: bool, seed: int = 0) -> dict[str, int]:
    """callgrind's event totals of one child run (``Ir`` alone, or the simulations' too)."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "callgrind.out"
        simulations = ["--cache-sim=yes", "--branch-sim=yes"] if cache else []
        command = [
            *_NO_RANDOM_ADDRESSES,
            "valgrind",
            "--tool=callgrind",
            *simulations,
            f"--callgrind-out-file={out}",
            sys.executable,
            __file__,
            "--child",
            name,
            "--calls",
            str(calls),
        ]
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        if not cache:
            found = re.search(r"Collected : (\d+)", done.stderr)
            if found is None:
                raise SystemExit(f"callgrind printed no total for {name}:\n{done.stderr}")
            return {"Ir": int(found.group(1))}
        text = out.read_text()
        names = re.search(r"^events: (.+)$", text, re.MULTILINE)
        totals = re.search(r"^summary: (.+)$", text, re.MULTILINE)
        if names is None or totals is None:
            raise SystemExit(f"callgrind wrote no summary for {name}")
        return dict(zip(names.group(1).split(), map(int, totals.group(1).split()), strict=True))


def main() -> None:
    """Print instructions per call for the chosen operations, and their ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="operations (default: all)")
    parser.add_argument("--calls", type=int, default=2_000)
    parser.add_argument(
        "--cache", action="store_true", help="also count cache misses and mispredicted branches"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="average over this many hash seeds (0, 1, ...): a code change moves dict layouts",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.calls)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed")
    known = list(_operations(Path()))
    names = args.names or known
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise SystemExit(f"unknown operation(s) {unknown}; known: {known}")
    counts = {}
    for name in names:
        if args.cache:
            before = _events(name, 0, cache=True)
            after = _events(name, args.calls, cache=True)
            per_call = {event: (after[event] - before[event]) / args.calls for event in after}
            counts[name] = per_call["Ir"]
            misses = ", ".join(
                f"{per_call[event]:.0f} {label}" for event, label in _CACHE_EVENTS.items()
            )
            print(
                f"{name:>14}: {counts[name] / 1000:8.1f}k instructions per call; {misses}",
                flush=True,
            )
            continue
        seeds = range(max(1, args.seeds))
        counts[name] = sum(
            (_count(name, args.calls, seed) - _count(name, 0, seed)) / args.calls for seed in seeds
        ) / len(seeds)
        print(f"{name:>14}: {counts[name] / 1000:8.1f}k instructions per call", flush=True)
    ratios = [
        ("charge", "records-floor"),
        ("charge", "pyrate"),
        ("priced", "charge"),
        ("hold+settle", "charge"),
        ("decorated", "priced"),
    ]
    for top, bottom in ratios:
        if top in counts and bottom in counts:
            print(f"{top} / {bottom}: {counts[top] / counts[bottom]:.2f}x")


if __name__ == "__main__":
    main()
