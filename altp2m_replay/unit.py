"""One unit of replay work: one trace under a group of policies, with one decode.

This module's one job is ``replay_trace``: open a trace, feed its batches to a
``Replayer`` per policy (side by side on threads when asked), check values on the way
when nothing has yet, and hand back one ``CellOutput`` of tables per policy. It is what
worker processes and Dask workers import, so it also makes Numba load cached kernels
without the rest of its lowering library (``lean_kernel_loads``) there and here.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from altp2m_replay import traces
from altp2m_replay.costs import effective_costs
from altp2m_replay.engine import Replayer
from altp2m_replay.errors import (
    PolicyError,
    ReplayRuntimeError,
)
from altp2m_replay.policy import Policy
from altp2m_replay.prefetch import side_by_side
from altp2m_replay.results import cell_tables
from altp2m_replay.selectors import needs_insn_stats, needs_page_counts


def lean_kernel_loads() -> bool:
    """Make Numba load cached kernels without first loading all of its lowering code.

    Before it looks in its cache, Numba's loader calls ``target_context.refresh()``, which
    imports and installs every lowering registry it has (typed containers, random, linalg,
    ...): 0.15-0.2 s of CPU, a fifth of a warm ``replay`` of a small trace, paid again by every
    worker process. Cached object code needs none of it, only the runtime its code calls
    (NRT), set up here. A cache miss still compiles through Numba's compiler, which
    refreshes the context itself. Applied once per process; ALTP2M_REPLAY_NUMBA_FULL_INIT=1,
    or a Numba without the expected loader, keeps Numba's own behaviour. Returns whether
    the lean loader is in use.
    """
    from numba.core import caching
    from numba.core.runtime import rtsys

    cache = caching.Cache
    if getattr(cache.load_overload, "lean", False):
        return True
    if os.environ.get("ALTP2M_REPLAY_NUMBA_FULL_INIT") or not all(
        hasattr(cache, a) for a in ("_load_overload", "_guard_against_spurious_io_errors")
    ):
        return False

    def load_overload(self, sig, target_context):
        rtsys.initialize(target_context)
        with self._guard_against_spurious_io_errors():
            return self._load_overload(sig, target_context)

    load_overload.lean = True
    cache.load_overload = load_overload
    return True


lean_kernel_loads()


@dataclass
class CellOutput:
    trace: str
    policy: str
    tables: dict[str, pl.DataFrame]
    seconds: float
    records: int
    warnings: list[str]
    costs: dict[str, float]


def replay_trace(
    path: Path,
    policies: list[Policy],
    cost_overrides: dict,
    profile: str | None,
    window: int | None,
    batch_rows: int | None = None,
    prepared=None,
    progress=None,
    threads: int = 1,
    cpu: dict | None = None,
) -> list[CellOutput]:
    """Replay one trace under every policy with a single decode of the trace.

    ``prepared`` is ``replay_facts``'s result when the caller has it already;
    ``progress(rows)`` is called after each batch. Unless ``prepared`` says the values were
    checked, each batch is checked before any policy sees it: a bad row stops the replay
    with the same TraceError ``trace validate`` gives (a replay error in an earlier row of
    the trace comes first).

    ``threads`` > 1 replays the policies side by side (``prefetch.side_by_side``): every
    policy still gets the decoded batches in order, so its cell is the same, and errors are
    those of replaying the policies one after the other. ``cpu``: see ``side_by_side``.
    """
    path = Path(path)
    if prepared is None:
        prepared = traces.replay_facts(
            path,
            any(needs_page_counts(p) for p in policies),
            any(needs_insn_stats(p) for p in policies),
        )
    stats, facts, checked = prepared
    tr = traces.open_trace(path)
    validator = None if checked else traces.Validator(tr)
    t0 = time.perf_counter()
    columns = ["gfn", "access", "vcpu"] + [
        c for c in ("insn", "tsc", "ip", "op", "arg") if c in tr.columns
    ]
    if any(p.breakpoints is not None for p in policies) and "gpa" in tr.columns:
        columns.append("gpa")  # byte addresses of fetches, for breakpoints
    seen = rerun = None

    def feed(i: int, b: traces.Batch) -> bool:
        r = reps[i]
        r.feed(
            b.gfn,
            b.access,
            b.vcpu,
            b.insn,
            b.tsc,
            start_row=b.start,
            ip=b.ip,
            op=b.op,
            arg=b.arg,
            gpa=b.gpa,
        )
        return r.done  # the guest crashed: nothing more to replay

    def settle() -> bool:
        nonlocal seen, rerun
        if validator is not None:
            full = validator.result()
            seen = full.vcpus  # the vCPUs rows name; replayers have a slot for every candidate
            if full.max_gfn != stats.max_gfn or not np.isin(seen, stats.vcpus).all():
                rerun = full
                return False
        return True

    def finish(i: int):
        p = policies[i]
        res = reps[i].finish(vcpus=seen)
        costs = effective_costs(p.costs, profile, cost_overrides)
        return res, costs, cell_tables(tr.name, p, res, costs)

    def advance(b: traces.Batch) -> None:
        progress(len(b.gfn) * len(reps))

    try:
        reps = [Replayer(p, facts, stats.vcpus, stats.rows, window=window) for p in policies]
        batches = tr.batches(batch_rows=batch_rows, columns=tuple(columns), validator=validator)
        done = side_by_side(
            batches,
            len(reps),
            feed,
            finish,
            threads,
            read_all=validator is not None,
            settle=settle,
            on_item=None if progress is None else advance,
            cpu=cpu,
        )
    except (ReplayRuntimeError, PolicyError) as exc:
        # The engine knows the row and the policy; the user also needs the trace file.
        raise type(exc)(f"{path}: {exc}") from None
    if done is None:
        # column statistics disagreed with the values: replay again from the facts the
        # checks gathered (progress has counted these rows once already)
        return replay_trace(
            path,
            policies,
            cost_overrides,
            profile,
            window,
            batch_rows,
            (rerun, traces.facts_of(tr, rerun), True),
            None,
            threads,
            cpu,
        )
    elapsed = time.perf_counter() - t0
    return [
        CellOutput(
            tr.name, p.name, tables, elapsed / len(reps), res.total["records"], res.warnings, costs
        )
        for p, (res, costs, tables) in zip(policies, done, strict=True)
    ]


def validate_unit(args):
    path, page_counts, insn_stats = args
    return traces.replay_facts(path, page_counts, insn_stats)


def replay_unit(args):
    return replay_trace(*args)
