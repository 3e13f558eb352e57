"""The output contract in one place: table names, their columns and dtypes, and the limits.

This module's one job is to name things SPEC §7 and §10 fix: the tables ``replay``
writes, the counters of each table in SPEC order, the Parquet dtype of every column, and
the bounds of a trace (vCPU numbers, gfns, guest-physical addresses). The engine computes
these counters (``engine.simulate`` maps them to its kernel's columns), ``results`` writes
them, ``replay_folder`` reads them back and ``report`` and ``compare`` show them; all of
them import the names from here, so searching a counter's name finds each of those places.
"""

from __future__ import annotations

from altp2m_replay.costs import COSTS

# ---------------------------------------------------------------- limits (SPEC §2, §3)
VCPU_LIMIT = 4096  # vCPU numbers are 0..4095
GFN_BITS = 36
GFN_LIMIT = 1 << GFN_BITS  # gfns are below 2^36
GFN_MASK = GFN_LIMIT - 1
GPA_LIMIT = 1 << 48  # reach of a 4-level EPT
PAGE_BYTES = 4096  # one 4 KiB page

# ---------------------------------------------------------------- tables (SPEC §10)
TABLES = ("summary", "by_view", "by_gfn", "by_ip", "timeline", "population")
KEYS = ("trace", "policy")  # every table has these two columns first

# ---------------------------------------------------------------- counters (SPEC §7)
# Per run and per vCPU, in SPEC §7 order.
COUNTERS = (
    "records",
    "instructions",
    "ept_exits",
    "lazy_copies",
    "lazy_copies_4k",
    "lazy_copies_2m",
    "lazy_copies_1g",
    "lazy_copy_pages",
    "access_violations",
    "mem_access_events",
    "singlestep_events",
    "async_events",
    "breakpoint_events",
    "cr3_events",
    "vm_events",
    "ve_delivered",
    "ve_blocked",
    "ve_emulations",
    "mtf_exits",
    "switches_vm_event",
    "switches_fast_ss",
    "switches_vmfunc",
    "view_switches",
    "emulations",
    "records_emulated",
    "access_changes",
    "superpage_splits",
    "shatters",
    "mmio_accesses",
    "restarts",
    "int3_exits",
    "control_records",
    "cr3_writes",
    "cr3_exits",
    "guest_vmfuncs",
    "vmfunc_exits",
    "host_drops",
    "host_maps",
    "view_resets",
    "ept_syncs",
    "ept_sync_ipis",
    "crashed",
    "crash_record",
    "livelocked",
    "livelock_record",
    "setup_splits",
    "setup_skipped",
)
# Counters SPEC §7 derives from others rather than counting them.
DERIVED_COUNTERS = ("vm_events", "view_switches", "ept_sync_ipis")
# Outcomes of the whole run, repeated in every vCPU row.
RUN_COUNTERS = ("crashed", "crash_record", "livelocked", "livelock_record")
# Counted by setup: in the total row, 0 in vCPU rows.
SETUP_COUNTERS = ("setup_splits", "setup_skipped")
# Per view: counted during the replay, then the tree's shape at the end.
VIEW_COUNTERS = (
    "records_completed",
    "ept_exits",
    "int3_exits",
    "lazy_copies",
    "lazy_copy_pages",
    "access_violations",
    "ve_delivered",
    "switches_in",
    "resets",
    "pages_mapped",
    "leaves_4k",
    "leaves_2m",
    "leaves_1g",
)
VIEW_SHAPE_COUNTERS = ("pages_mapped", "leaves_4k", "leaves_2m", "leaves_1g")
GFN_COUNTERS = (
    "ept_exits",
    "int3_exits",
    "viol_r",
    "viol_w",
    "viol_x",
    "ve_delivered",
    "lazy_copies",
)
# Per instruction pointer (the report's hotspots), in the engine's column order.
IP_COUNTERS = ("ept_exits", "ve_delivered", "int3_exits")
TIMELINE_COUNTERS = (
    "ept_exits",
    "int3_exits",
    "vm_events",
    "ve_delivered",
    "lazy_copies",
    "view_switches",
)

# ---------------------------------------------------------------- columns and dtypes
# Every table's columns in order, each with its polars dtype by name. Names, not polars
# objects, so that importing this module (the command line does) loads no polars.
# Cost columns of the summary table (SPEC §8) are in COSTS order, then the derived ones.
COST_COLUMNS = tuple(f"cycles_{k}" for k in COSTS)
DTYPES: dict[str, dict[str, str]] = {
    "summary": {
        "trace": "Utf8",
        "policy": "Utf8",
        "vcpu": "Int32",
        **dict.fromkeys(COUNTERS, "Int64"),
        **dict.fromkeys(COST_COLUMNS, "Float64"),
        "cycles_total": "Float64",
        "cycles_per_record": "Float64",
        "overhead_us": "Float64",
        "guest_cycles": "Int64",
        "slowdown": "Float64",
    },
    "by_view": {
        "trace": "Utf8",
        "policy": "Utf8",
        "view": "Int32",
        "view_name": "Utf8",
        **dict.fromkeys(VIEW_COUNTERS, "Int64"),
    },
    "by_gfn": {
        "trace": "Utf8",
        "policy": "Utf8",
        "view": "Int32",
        "gfn": "UInt64",
        **dict.fromkeys(GFN_COUNTERS, "Int64"),
    },
    "by_ip": {
        "trace": "Utf8",
        "policy": "Utf8",
        "ip": "UInt64",
        **dict.fromkeys(IP_COUNTERS, "Int64"),
    },
    "timeline": {
        "trace": "Utf8",
        "policy": "Utf8",
        "window": "Int64",
        "first_record": "Int64",
        **dict.fromkeys(TIMELINE_COUNTERS, "Int64"),
        "cycles_total": "Float64",
    },
    "population": {
        "trace": "Utf8",
        "policy": "Utf8",
        "view": "Int32",
        "view_name": "Utf8",
        "window": "Int64",
        "first_record": "Int64",
        "pages_mapped": "Int64",
    },
}
assert tuple(DTYPES) == TABLES


def polars_schema(table: str) -> dict:
    """``table``'s columns with their polars dtypes, for ``pl.DataFrame(schema=...)``."""
    import polars as pl

    return {col: getattr(pl, dtype) for col, dtype in DTYPES[table].items()}


def columns(table: str, *names: str) -> tuple[str, ...]:
    """``names``, checked to be columns of ``table``: a subset a reader relies on."""
    unknown = [n for n in names if n not in DTYPES[table]]
    if unknown:
        raise ValueError(f"{table} has no column(s) {', '.join(unknown)}")
    return names
