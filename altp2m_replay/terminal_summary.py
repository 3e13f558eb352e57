"""The short table ``replay`` prints when it ends: per trace, each policy's exits, events,
#VEs, cycles and slowdown, cheapest first, read back from the run's ``summary.parquet``.

It is a glance, not the report: ``report.html`` and the Parquet tables hold everything.
"""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl

from altp2m_replay.schema import KEYS, columns

# traces shown in full; the rest are counted, and the report has them
MAX_TRACES = 20
_COLUMNS = ("policy", "exits", "events", "#VEs", "cycles", "slowdown")


def _si(x: float) -> str:
    """3 significant digits with a k/M/G/T suffix: 295 k, 7.57 G."""
    if x == 0:
        return "0"
    for div, suffix in ((1e12, " T"), (1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def _slowdown(row: dict) -> str:
    s = row["slowdown"]
    if s is not None and math.isfinite(s):
        return f"{s:.4f}x" if s < 10 else f"{s:,.1f}x" if s < 1000 else f"{s:,.0f}x"
    return f"{_si(row['cycles_per_record'])} cyc/rec"  # no tsc: no guest time to compare with


def _state(row: dict) -> str:
    if row["crashed"]:
        return f"  crashed at record {row['crash_record']:,}"
    if row["livelocked"]:
        return f"  livelock at record {row['livelock_record']:,}"
    return ""


def summary_text(out_dir: Path | str, html: bool = True) -> str:
    """The table for the run in ``out_dir`` (a finished replay folder), one block per
    trace in the run's order, policies sorted by total cycles (crashed and livelocked
    cells last: their totals stop early)."""
    out = Path(out_dir)
    cols = columns(
        "summary",
        *KEYS,
        "vcpu",
        "records",
        "ept_exits",
        "vm_events",
        "ve_delivered",
        "cycles_total",
        "cycles_per_record",
        "slowdown",
        "crashed",
        "crash_record",
        "livelocked",
        "livelock_record",
    )
    total = pl.read_parquet(out / "summary.parquet", columns=list(cols)).filter(
        pl.col("vcpu") == -1
    )
    traces = list(dict.fromkeys(total["trace"].to_list()))
    lines: list[str] = []
    for name in traces[:MAX_TRACES]:
        rows = total.filter(pl.col("trace") == name).to_dicts()
        rows.sort(key=lambda r: (bool(r["crashed"] or r["livelocked"]), r["cycles_total"]))
        table = [
            (
                r["policy"],
                f"{r['ept_exits']:,}",
                f"{r['vm_events']:,}",
                f"{r['ve_delivered']:,}",
                _si(r["cycles_total"]),
                _slowdown(r),
                _state(r),
            )
            for r in rows
        ]
        widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(_COLUMNS)]
        lines.append(f"{name} ({rows[0]['records']:,} records)")
        for cells in ((*_COLUMNS, ""), *table):
            first = cells[0].ljust(widths[0])
            rest = [c.rjust(w) for c, w in zip(cells[1:-1], widths[1:], strict=True)]
            lines.append(("  " + "  ".join([first, *rest]) + cells[-1]).rstrip())
    if len(traces) > MAX_TRACES:
        lines.append(f"... and {len(traces) - MAX_TRACES} more traces")
    if html and (out / "report.html").exists():
        lines.append(f"report: {out / 'report.html'}")
    return "\n".join(lines)
