"""``trace info``: a human summary of one trace.

This module's one job is the text ``trace info`` prints: sizes, columns, vCPUs, access and
control-row counts and the metadata, from one validation pass.
"""

from __future__ import annotations

from altp2m_replay.errors import escape
from altp2m_replay.schema import PAGE_BYTES
from altp2m_replay.traces.checker import validate
from altp2m_replay.traces.layout import ACCESS_NAMES, OP_NAMES, TRACE_SCHEMA
from altp2m_replay.traces.reader import open_trace


def _fmt_ranges(ranges: list[tuple[int, int]], limit: int = 4) -> str:
    parts = [f"{a:#x}-{b:#x}" if a != b else f"{a:#x}" for a, b in ranges[:limit]]
    if len(ranges) > limit:
        parts.append(f"... ({len(ranges) - limit:,} more)")
    return ", ".join(parts)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def _pages(ranges) -> int:
    return sum(b - a + 1 for a, b in ranges)


def info_text(path) -> str:
    """Multi-line human summary of a trace for ``trace info`` (validates it on the way)."""
    tr = open_trace(path)
    st = validate(tr, page_counts=True)
    vc = [int(v) for v in st.vcpus]
    vlist = ", ".join(map(str, vc)) if len(vc) <= 16 else f"{vc[0]}..{vc[-1]}"
    cols = [c for c in TRACE_SCHEMA if c in tr.columns]
    m = tr.meta
    rows = [
        ("trace", f"{tr.name} ({tr.path})"),
        ("rows", f"{st.rows:,}"),
        ("row groups", f"{tr.row_groups:,}"),
        ("file size", _fmt_bytes(tr.size)),
        ("columns", ", ".join(f"{c} ({tr.types[c]})" for c in cols)),
        ("vCPUs", f"{len(vc):,} ({vlist})"),
        ("distinct gfns", f"{st.distinct_gfns:,} ({_fmt_bytes(st.distinct_gfns * PAGE_BYTES)})"),
        ("gfn range", f"{st.min_gfn:#x} - {st.max_gfn:#x}"),
    ]
    rows += [
        (f"  {key}", f"{len(st.page_counts[key][0]):,} gfns")
        for key in ("read", "written", "executed")
    ]
    rows.append(("access mix", ""))
    accesses = max(1, int(st.op_counts[0]))  # percentages of access rows
    for value in (1, 2, 3, 4, 5, 6, 7):
        c = int(st.access_counts[value])
        if c:
            rows.append(
                (f"  {ACCESS_NAMES[value]} ({value})", f"{c:>14,}  {100.0 * c / accesses:5.1f} %")
            )
    if "op" in tr.columns:
        rows.append(("control records", f"{st.control_records:,}"))
        rows += [
            (f"  {name} ({op})", f"{int(st.op_counts[op]):>14,}") for op, name in OP_NAMES.items()
        ]
    has_meta = m.source or m.ram or m.gfn_sets or m.vcpus or m.symbols or m.processes
    rows.append(("metadata", "" if has_meta else "none"))
    if m.source:
        rows.append(("  source", m.source))
    if m.vcpus is not None:
        rows.append(("  vcpus", f"{m.vcpus:,}"))
    if m.ram:
        rows.append(("  ram", f"{_fmt_ranges(m.ram)} ({_fmt_bytes(_pages(m.ram) * PAGE_BYTES)})"))
    for name, ranges in m.gfn_sets.items():
        rows.append(
            (
                f"  set {name}",
                (
                    f"{_pages(ranges):,} pages in {len(ranges):,} "
                    f"range{'s' if len(ranges) != 1 else ''} ({_fmt_ranges(ranges, 3)})"
                ),
            )
        )
    if m.symbols:
        rows.append(("  symbols", f"{len(m.symbols):,} names"))
    if m.processes:
        rows.append(("  processes", f"{len(m.processes):,} names"))
    # names and text come from the file: show control characters escaped, never act on them
    rows = [(escape(k), escape(v)) for k, v in rows]
    width = max(len(k) for k, _ in rows) + 2
    lines = [f"{k + ':':<{width}}{v}".rstrip() for k, v in rows]
    return "\n".join(lines)
