"""Sizing a run before it starts (SPEC §13): what each cell needs before its first row.

A replay's memory is mostly p2m tables (4 KiB nodes in one pool per cell), the per-gfn and
per-ip tables, the timeline snapshots and the fast-path cache. :func:`estimate` adds up, from
the RAM ranges, the host page order and the setup ops, what a cell needs before its first
trace row, in the engine's own layout; :func:`check_run` refuses a run whose traces need more
than the budget (``budget.py``), naming the policy op, the metadata or the trace that asks for
it. Growth during the replay is guarded by ``budget.ensure``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from altp2m_replay import budget, traces
from altp2m_replay.engine import _kernels as K
from altp2m_replay.errors import MemoryBudgetError
from altp2m_replay.ranges import intersect_ranges, merge_ranges, range_count
from altp2m_replay.schema import PAGE_BYTES
from altp2m_replay.selectors import resolve_all

NODE_BYTES = 512 * 8  # one p2m table: 512 int64 entries
GROWTH = 2  # a growing pool holds the old copy and the new one at once
TRUSTED_STATS_BYTES = 64 << 20  # a host p2m sized from Parquet statistics past this: check first
PMAP_BYTES = 1 << 27  # the fast-path cache's ceiling (engine/simulate.py allocates it)


# --------------------------------------------------------------------------- p2m sizes
def _regions(ranges: np.ndarray, shift: int) -> int:
    """How many aligned 2^shift-gfn regions sorted, disjoint ``ranges`` (int64 (n, 2)) touch."""
    if len(ranges) == 0:
        return 0
    lo, hi = ranges[:, 0] >> shift, ranges[:, 1] >> shift
    return int((hi - lo + 1).sum() - (lo[1:] == hi[:-1]).sum())


def carve_intervals(ranges, order: int) -> list[tuple[int, int, int]]:
    """(page order, first gfn, last gfn) pieces of RAM ``ranges`` mapped with the largest
    aligned pages of order <= ``order`` wholly inside (as the engine's carve_ram)."""
    out: list[tuple[int, int, int]] = []

    def carve(a: int, b: int, o: int) -> None:
        if a > b:
            return
        if o == 0:
            out.append((0, a, b))
            return
        size = 1 << o
        lo, hi = -(-a // size) * size, ((b + 1) // size) * size
        if lo >= hi:
            carve(a, b, o - 9)
            return
        out.append((o, lo, hi - 1))
        carve(a, lo - 1, o - 9)
        carve(hi, b, o - 9)

    for a, b in ranges:
        carve(int(a), int(b), order)
    return sorted(out, key=lambda t: t[1])


def _as_ranges(pieces) -> np.ndarray:
    return np.asarray([(a, b) for _, a, b in pieces], dtype=np.int64).reshape(-1, 2)


def host_need(ram: np.ndarray, order: int) -> tuple[int, int]:
    """(leaf entries, table nodes) of a host p2m mapping ``ram`` at page order <= ``order``."""
    pieces = carve_intervals(ram, order)
    leaves = sum((b - a + 1) >> o for o, a, b in pieces)
    nodes = 1 + _regions(_as_ranges(pieces), 27)
    nodes += _regions(_as_ranges([p for p in pieces if p[0] <= 9]), 18)
    nodes += _regions(_as_ranges([p for p in pieces if p[0] == 0]), 9)
    return leaves, nodes


def write_4k_nodes(gfns: np.ndarray) -> int:
    """Most table nodes that writing every gfn of ``gfns`` (sorted ranges) as a 4 KiB leaf
    into one p2m can add: one per 2 MiB, 1 GiB and 512 GiB region touched."""
    return _regions(gfns, 9) + _regions(gfns, 18) + _regions(gfns, 27)


# --------------------------------------------------------------------------- estimates
@dataclass
class Need:
    what: str  # who asks, for the error message
    nbytes: int


def _ram_source(policy, facts, ram: np.ndarray) -> str:
    if policy.domain.ram is not None:
        return f"{policy.source}: [domain] ram"
    if facts.meta_ram:
        return 'the trace metadata "ram"'
    return (
        f"the trace's highest gfn {facts.max_gfn:#x} (no RAM metadata, so RAM is taken as "
        f"{int(ram[0, 0]):#x}-{int(ram[-1, 1]):#x})"
    )


def estimate(
    policy,
    facts,
    rows: int,
    window: int | None = None,
    resolved=None,
    pmap_bytes: int = PMAP_BYTES,
) -> list[Need]:
    """What one cell needs before its first row, in the order it is built: the host p2m,
    each setup op, then the fixed tables. Growth during the replay is guarded by
    budget.ensure(). ``resolved``: ``resolve_all(policy, facts)`` when the caller has it;
    ``pmap_bytes``: the fast-path cache's ceiling the engine uses."""
    d = policy.domain
    ram, sels = resolved or resolve_all(policy, facts)
    leaves, nodes = host_need(ram, d.host_order)
    pages = range_count(ram)
    needs = [
        Need(
            f"{_ram_source(policy, facts, ram)} ({pages:,} gfns of host RAM at page order "
            f"<= {d.host_order})",
            leaves * 32 + nodes * NODE_BYTES * GROWTH,
        )
    ]
    ram_now = ram
    for op in policy.setup:
        if op.gfns is None:
            continue
        sel = sels.ranges[id(op.gfns)]
        if op.op == "add_ram":
            gfns = sel
            ram_now = merge_ranges(list(map(tuple, ram_now)) + list(map(tuple, sel)))
        else:
            gfns = intersect_ranges(sel, ram_now)
        nbytes = write_4k_nodes(gfns) * NODE_BYTES * GROWTH
        if op.op == "change_gfn":  # old and new gfns are expanded into arrays
            nbytes += 32 * range_count(gfns)
            if op.new is not None:
                nbytes += 8 * range_count(sels.ranges[id(op.new)])
        needs.append(Need(f"{policy.source}: {op.where} ({range_count(gfns):,} gfns)", nbytes))
    n_p2m = 1 + (d.nr_altp2m if d.altp2m else 0)
    win = window or max(1, math.ceil(rows / 256))
    snaps = (math.ceil(max(rows, 1) / win) + 1) * (K.N_COUNTERS + n_p2m) * 8
    # the fast-path cache is touched a page per row and p2m at most
    pmap = min(
        n_p2m * max(1, min(facts.max_gfn + 1, pmap_bytes // n_p2m)), rows * n_p2m * PAGE_BYTES
    )
    needs.append(Need(f"policy {policy.name!r}: timeline and fast-path tables", snaps + pmap))
    return needs


def check(needs: list[Need], label: str) -> None:
    """Refuse ``needs`` (in build order) when their sum passes the room left: name the need
    that takes it past, its own size and the total."""
    avail = budget.room()
    total = 0
    for n in needs:
        total += n.nbytes
        if total > avail:
            whole = sum(x.nbytes for x in needs)
            raise MemoryBudgetError(
                f"{label}needs about {budget.fmt(whole)} before its first row, past --max-memory "
                f"{budget.fmt(budget.limit())} ({budget.fmt(budget.rss())} in use): {n.what} asks for {budget.fmt(n.nbytes)}; "
                "raise --max-memory or shrink what asks for it"
            )


def check_cell(
    policy, facts, rows: int, window: int | None, resolved=None, pmap_bytes: int = PMAP_BYTES
) -> None:
    """The engine's check before it builds one cell."""
    check(estimate(policy, facts, rows, window, resolved, pmap_bytes), f"policy {policy.name!r} ")


def check_run(paths, policies, prepared: list, window: int | None) -> list:
    """Refuse a run whose traces (each replayed under every policy side by side in one
    process) need more than the budget before their first row; returns ``prepared``.

    A trace whose sizes came from Parquet statistics (values not checked yet) and would ask
    for more than TRUSTED_STATS_BYTES is validated first, so a footer that lies cannot make
    the run allocate for values the file does not hold.
    """
    out = list(prepared)
    for i, (path, (stats, facts, checked)) in enumerate(zip(paths, out, strict=True)):
        per_policy = [estimate(p, facts, stats.rows, window) for p in policies]
        # the host p2m (first need) is what a wrong max gfn would inflate; the fast-path
        # cache it also sizes is capped and touched only where rows go
        if not checked and any(needs[0].nbytes > TRUSTED_STATS_BYTES for needs in per_policy):
            tr = traces.open_trace(path)
            stats = traces.validate(tr, page_counts=facts.page_counts is not None)
            facts = dataclasses.replace(facts, max_gfn=stats.max_gfn, page_counts=stats.page_counts)
            out[i] = (stats, facts, True)
            per_policy = [estimate(p, facts, stats.rows, window) for p in policies]
        check(
            [n for needs in per_policy for n in needs],
            f"{path}: replaying it under {len(policies)} polic{'y' if len(policies) == 1 else 'ies'} ",
        )
    return out
