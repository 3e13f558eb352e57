"""What a replay needs to know of a trace before its first batch.

This module's one job is to turn an opened trace and its statistics into the ``TraceFacts``
that policy selectors resolve against, either after a full validation pass
(``trace_facts``) or, when Parquet statistics suffice, from the footer alone
(``replay_facts``, which says whether the values are checked yet).
"""

from __future__ import annotations

from pathlib import Path

from altp2m_replay.selectors import TraceFacts
from altp2m_replay.traces.checker import TraceStats, quick_stats, validate
from altp2m_replay.traces.reader import Trace, open_trace


def trace_facts(
    path: Path, page_counts: bool, insn_stats: bool = False
) -> tuple[TraceStats, TraceFacts]:
    """Validate one trace (full streaming pass) and gather what selector resolution needs
    (``insn_stats``: also instruction starts by byte address and each ip's first one)."""
    tr = open_trace(path)
    stats = validate(tr, page_counts=page_counts, insn_stats=insn_stats)
    return stats, facts_of(tr, stats)


def facts_of(tr: Trace, stats: TraceStats) -> TraceFacts:
    """What selector resolution needs to know of an opened trace and its statistics."""
    return TraceFacts(
        max_gfn=stats.max_gfn,
        meta_ram=tr.meta.ram,
        gfn_sets=dict(tr.meta.gfn_sets or {}),
        page_counts=stats.page_counts,
        symbols=dict(tr.meta.symbols),
        processes=dict(tr.meta.processes),
        byte_addresses=tr.byte_addresses,
        insn_starts=stats.insn_starts,
        ip_first=stats.ip_first,
    )


def replay_facts(
    path: Path, page_counts: bool, insn_stats: bool = False
) -> tuple[TraceStats, TraceFacts, bool]:
    """What replay_trace needs before its first batch, and whether values are checked yet.

    Without page counts, when Parquet statistics prove the gfn range, only metadata is read
    (and the vcpu column if its statistics are missing) and the values are not checked yet
    (False): replay_trace checks every value on the batches it decodes anyway, so the trace
    is read once instead of twice (figures in docs/performance.md). Otherwise:
    trace_facts's full validation pass (True).
    """
    if not page_counts and not insn_stats:
        tr = open_trace(path)
        stats = quick_stats(tr)
        if stats is not None:
            return stats, facts_of(tr, stats), False
    stats, facts = trace_facts(path, page_counts, insn_stats)
    return stats, facts, True
