"""What the report reads of a ``replay`` output folder: the columns it needs, trace symbols.

Reading the folder itself (checked tables, the manifest) is ``replay_folder``'s job; its
functions are re-exported here for the report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from altp2m_replay.replay_folder import read_manifest, read_table, results_dir
from altp2m_replay.schema import DTYPES, KEYS, VIEW_SHAPE_COUNTERS, columns

__all__ = [
    "BY_GFN_REQUIRED",
    "BY_IP_REQUIRED",
    "BY_VIEW_REQUIRED",
    "POPULATION_REQUIRED",
    "SUMMARY_REQUIRED",
    "TIMELINE_REQUIRED",
    "Symbols",
    "read_manifest",
    "read_table",
    "results_dir",
    "trace_symbols",
]

# Columns every folder must have (checked against schema.py's tables). Columns added later
# (Revision 2: int3_exits, breakpoint_events, cr3_events, restarts, livelocked,
# livelock_record, resets, the new cycles_<key>) are optional: a folder written before them
# still renders, without them.
SUMMARY_REQUIRED = columns(
    "summary",
    *KEYS,
    "vcpu",
    "records",
    "ept_exits",
    "vm_events",
    "ve_delivered",
    "view_switches",
    "lazy_copies",
    "crashed",
    "crash_record",
    "cycles_total",
    "cycles_per_record",
    "overhead_us",
    "slowdown",
)
BY_VIEW_REQUIRED = columns(
    "by_view",
    *KEYS,
    "view",
    "view_name",
    "records_completed",
    "ept_exits",
    "lazy_copies",
    "lazy_copy_pages",
    "switches_in",
    *VIEW_SHAPE_COUNTERS,
)
BY_GFN_REQUIRED = columns(
    "by_gfn",
    *KEYS,
    "view",
    "gfn",
    "ept_exits",
    "viol_r",
    "viol_w",
    "viol_x",
    "ve_delivered",
    "lazy_copies",
)
TIMELINE_REQUIRED = columns(
    "timeline",
    *KEYS,
    "window",
    "first_record",
    "ept_exits",
    "vm_events",
    "ve_delivered",
    "lazy_copies",
)
BY_IP_REQUIRED = columns("by_ip", *KEYS, "ip", "ept_exits", "ve_delivered")
POPULATION_REQUIRED = tuple(DTYPES["population"])


META_KEY = "altp2m_replay"  # the trace metadata key (SPEC §2)
U64 = 1 << 64


@dataclass(frozen=True)
class Symbols:
    """A trace's ``symbols`` metadata, read back from the trace file for the report.

    ``state`` says what was found: "ok" (``names`` maps ip -> sorted names), "none" (the
    trace has no symbols), "missing" (the input is not at its manifest path any more),
    "changed" (a file is there but not of the recorded size) or "unreadable".
    """

    state: str
    path: str | None = None
    names: dict[int, list[str]] = field(default_factory=dict)


def trace_symbols(entry: dict | None, wanted: set[int]) -> Symbols:
    """The names of the ips in ``wanted`` from the trace file a manifest input names.

    Only the Parquet footer is read; the file must still have the size the manifest
    recorded (hashing a large trace again would cost more than the whole report). Nothing
    here raises: a trace that moved or changed just leaves the ips unnamed.
    """
    path = (entry or {}).get("path")
    if not isinstance(path, str) or not path:
        return Symbols("missing")
    p = Path(path)
    try:
        if not p.is_file():
            return Symbols("missing", path)
        size = entry.get("bytes")
        if isinstance(size, int) and p.stat().st_size != size:
            return Symbols("changed", path)
        kv = pq.read_metadata(p).metadata or {}
        raw = kv.get(META_KEY.encode())
        meta = json.loads(raw) if raw is not None else {}
    except Exception:
        return Symbols("unreadable", path)
    syms = meta.get("symbols") if isinstance(meta, dict) else None
    if not isinstance(syms, dict) or not syms:
        return Symbols("none", path)
    names: dict[int, list[str]] = {}
    for name, ip in syms.items():
        if isinstance(ip, int) and not isinstance(ip, bool) and 0 <= ip < U64 and ip in wanted:
            names.setdefault(ip, []).append(str(name))
    return Symbols("ok", path, {ip: sorted(n) for ip, n in names.items()})
