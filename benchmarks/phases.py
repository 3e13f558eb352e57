"""Where a one-policy end-to-end replay spends its time, phase by phase (docs/performance.md).

    python benchmarks/phases.py TRACE [POLICY] [--rounds N]

Each phase is run on its own, ``rounds`` times; the least wall and CPU time (all threads of
the process) are printed. On a shared machine the CPU column is the steadier one. Not a test.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

from altp2m_replay import run, traces, unit
from altp2m_replay.costs import effective_costs
from altp2m_replay.engine import Replayer
from altp2m_replay.policy import load_policy
from altp2m_replay.results import cell_tables

COLUMNS = ("gfn", "access", "vcpu", "insn", "tsc", "ip")


def timed(label: str, fn, rounds: int):
    wall = cpu = float("inf")
    result = None
    for _ in range(rounds):
        t, c = time.perf_counter(), time.process_time()
        result = fn()
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    print(f"{label:48s} wall {wall:7.3f} s   CPU {cpu:7.3f} s", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("policy", nargs="?", default="xen-access-altp2m-write")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    path, pol, n = Path(a.trace), load_policy(a.policy), a.rounds
    tr = traces.open_trace(path)
    print(f"{tr.rows:,} rows, policy {pol.name}")
    unit.replay_trace(path, [pol], {}, None, None)  # load every kernel first

    timed("sha256 of the file (manifest, cell keys)", lambda: run.sha256(path), n)
    timed(
        "decode: Parquet -> numpy batches", lambda: sum(1 for _ in tr.batches(columns=COLUMNS)), n
    )
    timed(
        "decode + value checks",
        lambda: sum(1 for _ in tr.batches(columns=COLUMNS, validator=traces.Validator(tr))),
        n,
    )
    stats, facts, _ = traces.replay_facts(path, False)
    batches = list(tr.batches(columns=COLUMNS))

    def replayed() -> Replayer:
        rep = Replayer(pol, facts, stats.vcpus, stats.rows)
        for b in batches:
            rep.feed(b.gfn, b.access, b.vcpu, b.insn, b.tsc, start_row=b.start, ip=b.ip)
        return rep

    timed("kernel: Replayer + feed on decoded batches", replayed, n)
    reps = [replayed() for _ in range(n)]
    res = timed("finish: counters -> per-view/gfn/ip arrays", lambda: reps.pop().finish(), n)
    costs = effective_costs(pol.costs, None, {})
    tables = timed("cell tables (polars frames)", lambda: cell_tables(tr.name, pol, res, costs), n)
    print("   rows per table:", {k: v.height for k, v in tables.items()})
    batches.clear()
    timed(
        "replay_trace: all of the above, overlapped",
        lambda: unit.replay_trace(path, [pol], {}, None, None),
        n,
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"

        def replay(html: bool):
            shutil.rmtree(out, ignore_errors=True)
            run.replay([path], [pol.name], out, jobs=1, html=html)

        timed("replay --no-html (+ sha, cell store, tables)", lambda: replay(False), n)
        timed("replay with report.html", lambda: replay(True), n)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")


if __name__ == "__main__":
    main()
