"""``report.html``: one self-contained page rendered from a replay output folder (SPEC §10).

``render_html(dir)`` is pure: it reads the Parquet tables and ``manifest.json`` and returns
the page; ``write_report(dir)`` writes it atomically. The page has no external scripts, fonts
or styles: CSS is inline, the charts are static inline SVG drawn by ``charts`` (see its
docstring for why), and the only scripts are two tiny ones (a load marker and an error
recorder) that the headless-browser test reads.
Identical inputs give identical bytes: nothing is timestamped, and every list is ordered
(traces and policies in the manifest's order, then by name; rows by their keys).

The page opens with an overview for corpora: a policy × trace matrix of slowdown (cycles
per record for a trace without ``tsc``), coloured on a log scale, with the cheapest policy
of each trace ticked and stopped runs labelled; each trace's name links to its part of
the sections below (ids ``trace-<name>``, ``timeline-trace-<name>``, …).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import jinja2
import polars as pl
from markupsafe import Markup

from altp2m_replay import __version__
from altp2m_replay.costs import COSTS, PROFILES, effective_costs
from altp2m_replay.errors import OutputError
from altp2m_replay.outdir import FolderLock, atomic_write_bytes, check_output_set, finish_switch
from altp2m_replay.report import charts
from altp2m_replay.report.data import (
    BY_GFN_REQUIRED,
    BY_IP_REQUIRED,
    BY_VIEW_REQUIRED,
    POPULATION_REQUIRED,
    SUMMARY_REQUIRED,
    TIMELINE_REQUIRED,
    Symbols,
    read_manifest,
    read_table,
    results_dir,
    trace_symbols,
)

REFERENCE_POLICIES = ("none", "baseline")
TOP_GFNS = 20
TOP_IPS = 20
PAGE = 4096  # bytes per 4 KiB page: population is counted in pages
WIDE = 1180  # px of a full-width chart: the card's inner width at the page's max width
PANEL = 580  # px of a chart in a two-column grid
EXACT_CATEGORY_COLUMNS = 7  # policies whose cycles per category are shown exactly
MAX_POINTS = 512  # timeline points per line; more windows are merged so the SVG stays small
# (column, title); a panel per column the timeline table has (older folders lack some)
TIMELINE_METRICS = (
    ("ept_exits", "EPT exits"),
    ("int3_exits", "INT3 exits (breakpoint hits)"),
    ("vm_events", "vm_events"),
    ("ve_delivered", "#VE delivered"),
    ("lazy_copies", "Lazy copies"),
    ("cycles_total", "Cycles"),
)
# Revision 2 counters of the comparison table, shown when the summary has them
EXTRA_COUNTERS = (
    ("int3_exits", "INT3 exits"),
    ("breakpoint_events", "breakpoint events"),
    ("cr3_events", "CR3 events"),
    ("restarts", "restarts"),
)
# per-view Revision 2 counters, shown when some view of the trace has a non-zero value
VIEW_EXTRA = (("int3_exits", "INT3 exits"), ("resets", "resets"))
LIVELOCK_TEXT = (
    "the policy restarts an instruction forever (more than 64 restarts), so the guest would hang"
)
POLICY_COLOURS = (
    "#2563eb",
    "#ea580c",
    "#16a34a",
    "#dc2626",
    "#9333ea",
    "#0891b2",
    "#ca8a04",
    "#db2777",
    "#65a30d",
    "#4f46e5",
    "#0d9488",
    "#b45309",
)
REFERENCE_COLOURS = {"none": "#9ca3af", "baseline": "#4b5563"}
CATEGORY_COLOURS = {
    "ept_exit": "#4e79a7",
    "lazy_copy": "#a0cbe8",
    "vm_event_sync": "#e15759",
    "monitor_callback": "#ff9d9a",
    "vm_event_async": "#f28e2b",
    "mtf_exit": "#ffbe7d",
    "view_switch": "#59a14f",
    "vmfunc": "#8cd17d",
    "ve_delivery": "#b6992d",
    "ve_agent": "#f1ce63",
    "emulation": "#499894",
    "access_change": "#86bcb6",
    "superpage_split": "#b07aa1",
    "mmio": "#9d7660",
    "int3_exit": "#d37295",
    "cr3_exit": "#fabfd2",
    "vmfunc_exit": "#79706e",
    "view_reset": "#bab0ac",
    "ept_sync_ipi": "#17becf",
}
# for cost keys the table above does not know yet: used in order, skipping taken colours
EXTRA_CATEGORY_COLOURS = (
    "#1f77b4",
    "#bcbd22",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#aec7e8",
    "#98df8a",
    "#c5b0d5",
)
# views of one policy, by their position among that policy's views (view 0 first)
VIEW_COLOURS = (
    "#475569",
    "#2563eb",
    "#ea580c",
    "#16a34a",
    "#9333ea",
    "#dc2626",
    "#0891b2",
    "#ca8a04",
    "#db2777",
    "#65a30d",
)


# ----------------------------------------------------------------------------- formatting
def fmt_int(v) -> str:
    """12345 -> '12,345'; None -> '—'."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{round(v):,}"


def fmt_signed(v) -> str:
    return "—" if v is None else ("+" if v > 0 else "") + f"{round(v):,}"


def fmt_signed_compact(v) -> str:
    """+6463599000 -> '+6.46G': the Δ column, whose exact value is in its tooltip."""
    return "—" if v is None else ("+" if v > 0 else "") + charts.compact(v)


def fmt_us(v) -> str:
    """Microseconds with precision that shrinks as the number grows."""
    if v is None:
        return "—"
    if v == 0:
        return "0 µs"
    digits = 2 if abs(v) < 10 else 1 if abs(v) < 1000 else 0
    return f"{v:,.{digits}f} µs"


def fmt_ratio(v) -> str:
    """A slowdown factor: '1.000×', '12.84×', '21,819×'; None (no guest cycles) -> '—'."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    digits = 3 if v < 10 else 2 if v < 100 else 1 if v < 1000 else 0
    return f"{v:,.{digits}f}×"


def fmt_per_record(v) -> str:
    """Cycles per record: '2.37', '1,326.7', '188,999'; None -> '—'."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    digits = 2 if v < 100 else 1 if v < 10_000 else 0
    return f"{v:,.{digits}f}"


def fmt_float(v, digits: int = 2) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def fmt_bytes(v) -> str:
    if v is None:
        return "—"
    for div, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if v >= div:
            return f"{v / div:,.1f} {unit}"
    return f"{v:,} B"


def fmt_pages(pages) -> str:
    """4 KiB pages as a size: 70144 -> '274.0 MiB'."""
    return "—" if pages is None else fmt_bytes(int(pages) * 4096)


def fmt_gfn(v) -> str:
    return f"{int(v):#x}"


# ----------------------------------------------------------------------------- ordering
def _ordered(present, preferred) -> list[str]:
    """``present`` values in ``preferred`` order first, the rest by name."""
    present = set(present)
    head = [p for p in dict.fromkeys(preferred) if p in present]
    return head + sorted(present - set(head))


def _policy_colours(policies: list[str]) -> dict[str, str]:
    out, i = {}, 0
    for p in policies:
        if p in REFERENCE_COLOURS:
            out[p] = REFERENCE_COLOURS[p]
        else:
            out[p] = POLICY_COLOURS[i % len(POLICY_COLOURS)]
            i += 1
    return out


def _cost_categories(columns) -> list[str]:
    """``cycles_<key>`` columns in the cost model's order, unknown keys after, by name."""
    keys = [
        c[len("cycles_") :]
        for c in columns
        if c.startswith("cycles_") and c not in ("cycles_total", "cycles_per_record")
    ]
    return [k for k in COSTS if k in keys] + sorted(k for k in keys if k not in COSTS)


def _category_colours(keys: list[str]) -> dict[str, str]:
    """A colour per cost key: the fixed one when known, else the next spare colour."""
    out = {k: CATEGORY_COLOURS[k] for k in keys if k in CATEGORY_COLOURS}
    spare = [c for c in EXTRA_CATEGORY_COLOURS if c not in out.values()]
    for i, k in enumerate(k for k in keys if k not in out):
        out[k] = spare[i % len(spare)]
    return out


# ----------------------------------------------------------------------------- sections
def _profile_name(costs: dict) -> str:
    """The profile whose defaults equal ``costs`` exactly, else 'custom'."""
    for name in PROFILES:
        if effective_costs({}, name) == {k: float(v) for k, v in costs.items()}:
            return name
    return "custom"


def _cost_sets(manifest: dict) -> list[dict]:
    """Distinct effective cost tables of the run's cells, each with the cells using it."""
    groups: dict[tuple, dict] = {}
    for cell in manifest.get("cells", []):
        costs = cell["costs"]
        if not costs:
            continue
        key = tuple(sorted((str(k), float(v)) for k, v in costs.items()))
        g = groups.setdefault(key, {"costs": dict(key), "cells": []})
        g["cells"].append(f"{cell.get('trace')} · {cell.get('policy')}")
    out = []
    for g in groups.values():
        g["profile"] = _profile_name(g["costs"])
        out.append(g)
    keys = [*list(COSTS), "cpu_ghz"]
    keys += sorted({k for g in out for k in g["costs"]} - set(keys))
    defaults = effective_costs({})
    rows = [
        {"key": k, "vals": [g["costs"].get(k) for g in out], "default": defaults.get(k)}
        for k in keys
        if any(k in g["costs"] for g in out)
    ]
    return [{"sets": out, "rows": rows}] if out else []


def _alerts(summary: pl.DataFrame, manifest: dict, traces, policies) -> dict:
    rank = {(t, p): (i, j) for i, t in enumerate(traces) for j, p in enumerate(policies)}

    def stopped(flag: str, record: str) -> list[dict]:
        if flag not in summary.columns:  # livelocks: folders written before Revision 2
            return []
        rows = (
            summary.filter((pl.col("vcpu") == -1) & (pl.col(flag) != 0))
            .select("trace", "policy", pl.col(record).alias("record"), "records")
            .to_dicts()
        )
        return sorted(rows, key=lambda r: rank[(r["trace"], r["policy"])])

    crashes = stopped("crashed", "crash_record")
    livelocks = stopped("livelocked", "livelock_record")
    warnings = [
        {"trace": cell.get("trace"), "policy": cell.get("policy"), "text": str(w)}
        for cell in manifest.get("cells", [])
        for w in cell["warnings"]
    ]
    warnings.sort(
        key=lambda r: (
            rank.get((r["trace"], r["policy"]), (1 << 30, 0)),
            str(r["trace"]),
            str(r["policy"]),
            r["text"],
        )
    )
    return {
        "crashes": crashes,
        "livelocks": livelocks,
        "warnings": warnings,
        "livelock_text": LIVELOCK_TEXT,
    }


def _anchors(traces) -> dict[str, str]:
    """A stable, unique HTML id per trace, made from its name: 'kern-2vcpu' -> 'trace-kern-2vcpu'."""
    out: dict[str, str] = {}
    for t in traces:
        base = "trace-" + (re.sub(r"[^a-z0-9_-]+", "-", t.lower()).strip("-") or "unnamed")
        anchor, n = base, 2
        while anchor in out.values():
            anchor, n = f"{base}-{n}", n + 1
        out[t] = anchor
    return out


def _bad(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


# the overview's two measures: summary column -> (label, formatter, the value at the light
# end of the colour scale, position on the scale's log axis)
OVERVIEW_METRICS = {
    "slowdown": ("slowdown", fmt_ratio, 1.0, lambda v: math.log10(max(v, 1.0))),
    "cycles_per_record": ("cycles / record", fmt_per_record, 0.0, lambda v: math.log10(1.0 + v)),
}


def _stopped(r: dict) -> str | None:
    """'crashed @ 1,234' or 'livelock @ 103' for a run that stopped early, else None."""
    if r["crashed"]:
        return f"crashed @ {fmt_int(r['crash_record'])}"
    if r.get("livelocked"):
        return f"livelock @ {fmt_int(r['livelock_record'])}"
    return None


def _overview(summary: pl.DataFrame, traces, policies, pcolour, anchors) -> dict:
    """The policy × trace matrix at the top of the page.

    A trace's column shows slowdown when every policy has one (the trace has ``tsc``),
    else cycles per record. Cells are coloured on a log scale shared by every column of the
    same measure; the cheapest policy of a column is marked, counting only policies that
    are not references and did not stop early (crash or livelock).
    """
    total = {(r["trace"], r["policy"]): r for r in summary.filter(pl.col("vcpu") == -1).to_dicts()}
    columns = []
    high: dict[str, float] = {}  # per measure, its largest value in the matrix
    for t in traces:
        rows = [total[(t, p)] for p in policies if (t, p) in total]
        metric = "slowdown" if all(not _bad(r["slowdown"]) for r in rows) else "cycles_per_record"
        values = [r[metric] for r in rows if not _bad(r[metric])]
        if values:
            high[metric] = max(high.get(metric, values[0]), *values)
        fair = [
            r[metric]
            for r in rows
            if r["policy"] not in REFERENCE_POLICIES and not _stopped(r) and not _bad(r[metric])
        ]
        columns.append(
            {
                "name": t,
                "anchor": anchors[t],
                "metric": metric,
                "label": OVERVIEW_METRICS[metric][0],
                "records": max((r["records"] for r in rows), default=None),
                "best": min(fair) if fair else None,
            }
        )
    rows = []
    for p in policies:
        cells = []
        for c in columns:
            r = total.get((c["name"], p))
            v = None if r is None else r[c["metric"]]
            if _bad(v):
                cells.append({"text": "—", "bg": None, "fg": None, "best": False, "stopped": None})
                continue
            label, fmt, _, pos = OVERVIEW_METRICS[c["metric"]]
            span = pos(high[c["metric"]])
            bg, fg = charts.heat(pos(v) / span if span > 0 else 0.0)
            stopped = _stopped(r)
            best = v == c["best"] and p not in REFERENCE_POLICIES and stopped is None
            cells.append(
                {
                    "text": fmt(v),
                    "bg": bg,
                    "fg": fg,
                    "best": best,
                    "stopped": stopped,
                    "title": f"{p} on {c['name']}: {fmt(v)} {label}; "
                    f"{fmt_int(r['cycles_total'])} cycles over {fmt_int(r['records'])} records"
                    + (f"; {stopped}" if stopped else "")
                    + ("; the cheapest on this trace" if best else ""),
                }
            )
        rows.append(
            {
                "policy": p,
                "colour": pcolour[p],
                "reference": p in REFERENCE_POLICIES,
                "cells": cells,
                "wins": sum(1 for c in cells if c["best"]),
            }
        )
    legends = [
        {
            "label": label,
            "low": fmt(light),
            "high": fmt(high[metric]),
            "gradient": ", ".join(charts.HEAT_STOPS),
        }
        for metric, (label, fmt, light, _) in OVERVIEW_METRICS.items()
        if metric in high
    ]
    return {
        "columns": columns,
        "rows": rows,
        "legends": legends,
        "measures": sorted({c["metric"] for c in columns}),
        "any_best": any(c["best"] is not None for c in columns),
    }


def _comparison(summary: pl.DataFrame, trace: str, policies, pcolour, categories, ccolour) -> dict:
    total = summary.filter((pl.col("trace") == trace) & (pl.col("vcpu") == -1))
    by_policy = {r["policy"]: r for r in total.to_dicts()}
    names = [p for p in policies if p in by_policy]
    ref = next((p for p in ("baseline", "none") if p in by_policy), None)
    ref_cycles = by_policy[ref]["cycles_total"] if ref else None
    rows = []
    for p in names:
        r = by_policy[p]
        rows.append(
            {
                **r,
                "colour": pcolour[p],
                "reference": p in REFERENCE_POLICIES,
                "vs_ref": None if ref is None or p == ref else r["cycles_total"] - ref_cycles,
            }
        )
    used = [k for k in categories if any((by_policy[p].get(f"cycles_{k}") or 0) > 0 for p in names)]
    # every category of the cost model, spent or not, with what it is charged per
    table = [
        {
            "key": k,
            "colour": ccolour[k],
            "per": COSTS[k][1] if k in COSTS else (),
            "vals": [by_policy[p].get(f"cycles_{k}") for p in names],
            "spent": k in used,
        }
        for k in categories
    ]
    series = [(k.replace("_", " "), ccolour[k]) for k in used]
    bars = [
        charts.BarRow(
            p,
            [by_policy[p].get(f"cycles_{k}") or 0.0 for k in used],
            f"{charts.compact(by_policy[p]['cycles_total'])} cycles",
        )
        for p in names
    ]
    return {
        "rows": rows,
        "ref": ref,
        "policies": names,
        # a column of zeros for every policy is named under the table instead of drawn
        "extra": [
            (c, label)
            for c, label in EXTRA_COUNTERS
            if c in summary.columns and any(by_policy[p][c] for p in names)
        ],
        "extra_zero": [
            label
            for c, label in EXTRA_COUNTERS
            if c in summary.columns and not any(by_policy[p][c] for p in names)
        ],
        "categories": table,
        # exact numbers fit a card up to this many policies; beyond, '1.23G' with the
        # exact value in the tooltip
        "compact": len(names) > EXACT_CATEGORY_COLUMNS,
        "legend": [(k.replace("_", " "), ccolour[k]) for k in used],
        "bars": Markup(
            charts.stacked_bars(bars, series, width=WIDE, aria=f"cycles by category, {trace}")
        ),
        "shares": Markup(
            charts.stacked_bars(
                bars,
                series,
                normalize=True,
                width=WIDE,
                aria=f"share of cycles by category, {trace}",
            )
        ),
    }


def _merge_windows(df: pl.DataFrame, counters: list[str]) -> tuple[pl.DataFrame, int]:
    """Sum consecutive windows so that a line has at most MAX_POINTS points."""
    n = df.height
    k = max(1, math.ceil(n / MAX_POINTS))
    if k == 1:
        return df, 1
    merged = (
        df.with_columns((pl.col("window") // k).alias("_w"))
        .group_by("_w", maintain_order=True)
        .agg(pl.col("first_record").min(), *[pl.col(c).sum() for c in counters])
        .sort("_w")
    )
    return merged, k


def _timeline(
    timeline: pl.DataFrame | None, summary: pl.DataFrame, trace: str, policies, pcolour
) -> dict | None:
    if timeline is None:
        return None
    tl = timeline.filter(pl.col("trace") == trace)
    if tl.height == 0:
        return None
    names = [p for p in policies if p in set(tl["policy"].to_list())]
    metrics = [(m, title) for m, title in TIMELINE_METRICS if m in tl.columns]
    counters = sorted({m for m, _ in metrics} | {"lazy_copies"})
    records = {
        r["policy"]: r["records"]
        for r in summary.filter((pl.col("trace") == trace) & (pl.col("vcpu") == -1)).to_dicts()
    }
    per_policy, window_rows, merge = {}, None, 1
    for p in names:
        df = tl.filter(pl.col("policy") == p).sort("window")
        if window_rows is None and df.height > 1:
            window_rows = int(df["first_record"][1] - df["first_record"][0])
        df, merge = _merge_windows(df, counters)
        per_policy[p] = df
    panels = []
    for metric, title in metrics:
        lines = [
            charts.Line(
                p,
                pcolour[p],
                per_policy[p]["first_record"].to_list(),
                per_policy[p][metric].to_list(),
                dashed=p in REFERENCE_POLICIES,
            )
            for p in names
        ]
        panels.append(
            {
                "title": title,
                "metric": metric,
                "svg": Markup(
                    charts.line_chart(
                        lines, x_label="record", width=PANEL, aria=f"{title} per window, {trace}"
                    )
                ),
            }
        )
    lazy_lines = []
    for p in names:
        df = per_policy[p]
        starts = df["first_record"].to_list()
        # cumulative value at the END of each window: the next window's start, the run's end last
        ends = [*starts[1:], records.get(p, starts[-1])]
        cum = df["lazy_copies"].cum_sum().to_list()
        lazy_lines.append(
            charts.Line(p, pcolour[p], [0, *ends], [0, *cum], dashed=p in REFERENCE_POLICIES)
        )
    # the timeline table counts copies, not pages (SPEC §7): the curve sums copies
    lazy_title = "Lazy copies (cumulative)"
    return {
        "panels": panels,
        "legend": [(p, pcolour[p], p in REFERENCE_POLICIES) for p in names],
        "window_rows": window_rows * merge if window_rows else None,
        "merged": merge,
        "lazy_title": lazy_title,
        "lazy_svg": Markup(
            charts.line_chart(
                lazy_lines, x_label="record", width=WIDE, height=280, aria=f"{lazy_title}, {trace}"
            )
        ),
    }


def _view_label(view: int, name) -> str:
    """'view 1 · idx'; just 'view 0' when the policy did not name the view."""
    named = name is not None and str(name) != str(view)
    return f"view {view} · {name}" if named else f"view {view}"


def _population(
    population: pl.DataFrame | None, summary: pl.DataFrame, trace: str, policies, pcolour
) -> list[dict] | None:
    """One panel per policy: pages mapped in each of its views, sampled at every window end.

    None when the folder has no population table (older outputs) or it holds no row for
    ``trace``: the section then falls back to the cumulative lazy-copy curve per policy.
    """
    if population is None:
        return None
    pop = population.filter(pl.col("trace") == trace)
    if pop.height == 0:
        return None
    records = {
        r["policy"]: r["records"]
        for r in summary.filter((pl.col("trace") == trace) & (pl.col("vcpu") == -1)).to_dicts()
    }
    panels = []
    for p in policies:
        sub = pop.filter(pl.col("policy") == p)
        if sub.height == 0:
            continue
        views = sorted(set(sub["view"].to_list()))
        lines, legend = [], []
        for i, v in enumerate(views):
            dv = sub.filter(pl.col("view") == v).sort("window")
            starts = dv["first_record"].to_list()
            pages = dv["pages_mapped"].to_list()
            # each value is the population at the END of its window: the next window's start,
            # the run's last record for the last window
            ends = [*starts[1:], max(records.get(p, starts[-1]), starts[-1])]
            k = max(1, math.ceil(len(ends) / MAX_POINTS))
            keep = [j for j in range(len(ends)) if (j + 1) % k == 0 or j == len(ends) - 1]
            label = _view_label(v, dv["view_name"][0])
            colour = VIEW_COLOURS[i % len(VIEW_COLOURS)]
            final = pages[-1]
            lines.append(
                charts.Line(
                    f"{label}: {fmt_pages(final)} at the end ({fmt_int(final)} pages)",
                    colour,
                    [ends[j] for j in keep],
                    [pages[j] * PAGE for j in keep],
                )
            )
            legend.append({"label": label, "colour": colour, "final": final})
        panels.append(
            {
                "policy": p,
                "colour": pcolour[p],
                "reference": p in REFERENCE_POLICIES,
                "legend": legend,
                "svg": Markup(
                    charts.line_chart(
                        lines,
                        x_label="record",
                        width=PANEL,
                        height=230,
                        y_axis=charts.size_axis,
                        x_from_zero=True,
                        min_left=72,
                        aria=f"pages mapped per view, {p}, {trace}",
                    )
                ),
            }
        )
    return panels or None


def _views(by_view: pl.DataFrame | None, trace: str, policies, pcolour) -> list[dict]:
    if by_view is None:
        return []
    rows = by_view.filter(pl.col("trace") == trace).to_dicts()
    rank = {p: i for i, p in enumerate(policies)}
    rows.sort(key=lambda r: (rank.get(r["policy"], 1 << 30), r["view"]))
    top = max((r["pages_mapped"] for r in rows), default=0) or 1
    prev = None
    for r in rows:
        r["first"] = r["policy"] != prev
        r["colour"] = pcolour.get(r["policy"], "#999")
        r["bar"] = f"{100 * r['pages_mapped'] / top:.1f}"
        prev = r["policy"]
    return rows


def _vcpus(summary: pl.DataFrame, trace: str, policies, pcolour) -> list[dict]:
    rows = summary.filter(pl.col("trace") == trace).to_dicts()
    rank = {p: i for i, p in enumerate(policies)}
    # each policy's vCPUs in order, then its total row (vcpu -1) last
    rows.sort(key=lambda r: (rank.get(r["policy"], 1 << 30), r["vcpu"] < 0, r["vcpu"]))
    prev = None
    for r in rows:
        r["first"] = r["policy"] != prev
        r["colour"] = pcolour.get(r["policy"], "#999")
        prev = r["policy"]
    return rows


def _hotspots(
    by_gfn: pl.DataFrame | None, by_view: pl.DataFrame | None, trace: str, policies, pcolour
) -> list[dict]:
    if by_gfn is None:
        return []
    df = by_gfn.filter(pl.col("trace") == trace)
    names = _view_names(by_view, trace)
    if "int3_exits" in df.columns:  # gfns with INT3 exits only are ranked in _breakpoints
        df = df.filter((pl.col("ept_exits") > 0) | (pl.col("ve_delivered") > 0))
    out = []
    for p in policies:
        sub = df.filter(pl.col("policy") == p)
        if sub.height == 0:
            continue
        top = sub.sort(["ept_exits", "view", "gfn"], descending=[True, False, False]).head(TOP_GFNS)
        rows = top.to_dicts()
        peak = max((r["ept_exits"] for r in rows), default=0) or 1
        for r in rows:
            r["view_label"] = _gfn_view_label(names, p, r["view"])
            r["bar"] = f"{100 * r['ept_exits'] / peak:.1f}"
        out.append(
            {
                "policy": p,
                "colour": pcolour[p],
                "rows": rows,
                "gfns": sub.height,
                "exits": int(sub["ept_exits"].sum()),
            }
        )
    if out:
        busiest = max(range(len(out)), key=lambda i: (out[i]["exits"], -i))
        for i, h in enumerate(out):
            h["open"] = i == busiest
    return out


def _view_names(by_view: pl.DataFrame | None, trace: str) -> dict:
    if by_view is None:
        return {}
    return {
        (r["policy"], r["view"]): r["view_name"]
        for r in by_view.filter(pl.col("trace") == trace)
        .select("policy", "view", "view_name")
        .to_dicts()
    }


def _gfn_view_label(names: dict, policy: str, view: int) -> str:
    """'1 · idx'; just '0' when the policy did not name the view."""
    name = names.get((policy, view))
    named = name and name != str(view)
    return f"{view} · {name}" if named else str(view)


def _breakpoints(
    by_gfn: pl.DataFrame | None,
    by_ip: pl.DataFrame | None,
    by_view: pl.DataFrame | None,
    trace: str,
    policies,
    pcolour,
) -> list[dict]:
    """Per policy with INT3 exits: the top guest frames and breakpoint addresses (ips).

    Empty when no policy hit a breakpoint on ``trace`` or the folder predates the
    ``int3_exits`` columns. Rows get their symbol names later (``_name_ips``).
    """
    gfns = by_gfn if by_gfn is not None and "int3_exits" in by_gfn.columns else None
    ips = by_ip if by_ip is not None and "int3_exits" in by_ip.columns else None
    if gfns is None and ips is None:
        return []
    names = _view_names(by_view, trace)
    out = []
    for p in policies:
        entry = {"policy": p, "colour": pcolour[p], "gfn_rows": [], "ip_rows": [], "hits": 0}
        if gfns is not None:
            sub = gfns.filter(
                (pl.col("trace") == trace) & (pl.col("policy") == p) & (pl.col("int3_exits") > 0)
            )
            entry["hits"] = int(sub["int3_exits"].sum())
            entry["gfns"] = sub.height
            rows = (
                sub.sort(["int3_exits", "view", "gfn"], descending=[True, False, False])
                .head(TOP_GFNS)
                .select("view", "gfn", "int3_exits", "ept_exits")
                .to_dicts()
            )
            peak = max((r["int3_exits"] for r in rows), default=0) or 1
            for r in rows:
                r["view_label"] = _gfn_view_label(names, p, r["view"])
                r["bar"] = f"{100 * r['int3_exits'] / peak:.1f}"
            entry["gfn_rows"] = rows
        if ips is not None:
            sub = ips.filter(
                (pl.col("trace") == trace) & (pl.col("policy") == p) & (pl.col("int3_exits") > 0)
            )
            hits = int(sub["int3_exits"].sum())
            entry["hits"] = max(entry["hits"], hits)
            named = sub.filter(pl.col("ip").is_not_null())
            entry["ips"] = named.height
            rows = (
                named.sort(["int3_exits", "ip"], descending=[True, False])
                .head(TOP_IPS)
                .select("ip", "int3_exits")
                .to_dicts()
            )
            rows += sub.filter(pl.col("ip").is_null()).select("ip", "int3_exits").to_dicts()
            peak = max((r["int3_exits"] for r in rows), default=0) or 1
            for r in rows:
                r["bar"] = f"{100 * r['int3_exits'] / peak:.1f}"
                r["share"] = _percent(r["int3_exits"], hits)
            entry["ip_rows"] = rows
        if entry["hits"]:
            out.append(entry)
    if out:
        busiest = max(range(len(out)), key=lambda i: (out[i]["hits"], -i))
        for i, h in enumerate(out):
            h["open"] = i == busiest
    return out


SYMBOL_CHARS = 120  # a name longer than this is cut (metadata is not ours to trust)
SYMBOL_ALIASES = 8  # names listed in the tooltip of an address that has more


def _symbol_label(names: list[str] | None) -> tuple[str, str]:
    """(shown, full) for the names of one ip: aliases share an address."""
    if not names:
        return "", ""

    def cut(n: str) -> str:
        return n if len(n) <= SYMBOL_CHARS else n[: SYMBOL_CHARS - 1] + "…"

    shown = cut(names[0]) if len(names) == 1 else f"{cut(names[0])} (+{len(names) - 1} aliases)"
    full = ", ".join(cut(n) for n in names[:SYMBOL_ALIASES])
    if len(names) > SYMBOL_ALIASES:
        full += f", … ({len(names)} names)"
    return shown, full


def _name_ips(manifest: dict, trace: str, ip_hot: dict, bps: list[dict]) -> dict:
    """Give the shown ip rows their symbol names from the trace's ``symbols`` metadata."""
    rows = [r for h in ip_hot["policies"] for r in h["rows"]] + [
        r for b in bps for r in b["ip_rows"]
    ]
    wanted = {int(r["ip"]) for r in rows if r["ip"] is not None}
    for r in rows:
        r["symbol"], r["symbol_full"] = "", ""
    if not wanted:
        return {"state": "none", "path": None, "named": 0}
    entry = next((i for i in manifest.get("inputs", []) if i.get("trace") == trace), None)
    sym: Symbols = trace_symbols(entry, wanted)
    for r in rows:
        if r["ip"] is not None:
            r["symbol"], r["symbol_full"] = _symbol_label(sym.names.get(int(r["ip"])))
    return {
        "state": sym.state,
        "path": sym.path,
        "named": sum(1 for ip in wanted if ip in sym.names),
    }


def _percent(part: int, whole: int) -> str:
    """'12.9%'; small shares keep two significant digits ('0.061%'), not '0.0%'."""
    if not whole:
        return "—"
    v = 100 * part / whole
    if v == 0 or v >= 1:
        return f"{v:.1f}%"
    return f"{v:.2g}%"


def _ip_hotspots(
    by_ip: pl.DataFrame | None, summary: pl.DataFrame, trace: str, policies, pcolour
) -> dict:
    """Top TOP_IPS instructions by EPT exits per policy; ``state`` says why there are none."""
    if by_ip is None:
        return {"state": "absent", "policies": []}
    df = by_ip.filter(pl.col("trace") == trace)
    if "int3_exits" in df.columns:  # ips with INT3 exits only are ranked in _breakpoints
        df = df.filter((pl.col("ept_exits") > 0) | (pl.col("ve_delivered") > 0))
    if df.height == 0:
        totals = summary.filter((pl.col("trace") == trace) & (pl.col("vcpu") == -1))
        events = int(totals["ept_exits"].sum() + totals["ve_delivered"].sum())
        # by_ip holds every instruction with an exit or a #VE: rows are missing only when the
        # trace gave no ip to attribute them to
        return {"state": "no_ip" if events else "quiet", "policies": []}
    out = []
    for p in policies:
        sub = df.filter(pl.col("policy") == p)
        if sub.height == 0:
            continue
        exits = int(sub["ept_exits"].sum())
        # a null ip is the "other" row of a bounded per-ip table: shown last, never ranked
        other = sub.filter(pl.col("ip").is_null())
        sub = sub.filter(pl.col("ip").is_not_null())
        top = sub.sort(["ept_exits", "ve_delivered", "ip"], descending=[True, True, False]).head(
            TOP_IPS
        )
        rows = top.select("ip", "ept_exits", "ve_delivered").to_dicts()
        rows += other.select("ip", "ept_exits", "ve_delivered").to_dicts()
        peak = max((r["ept_exits"] for r in rows), default=0) or 1
        for r in rows:
            r["bar"] = f"{100 * r['ept_exits'] / peak:.1f}"
            r["share"] = _percent(r["ept_exits"], exits)
        top_exits = sum(r["ept_exits"] for r in rows if r["ip"] is not None)
        out.append(
            {
                "policy": p,
                "colour": pcolour[p],
                "rows": rows,
                "ips": sub.height,
                "exits": exits,
                "ve": int(sub["ve_delivered"].sum()),
                "top_share": _percent(top_exits, exits) if exits else None,
            }
        )
    if out:
        busiest = max(range(len(out)), key=lambda i: (out[i]["exits"], out[i]["ve"], -i))
        for i, h in enumerate(out):
            h["open"] = i == busiest
    return {"state": "ok", "policies": out}


def _traces_meta(manifest: dict, summary: pl.DataFrame, traces) -> list[dict]:
    inputs = {i.get("trace"): i for i in manifest.get("inputs", [])}
    records = {
        r["trace"]: r["records"]
        for r in summary.filter(pl.col("vcpu") == -1)
        .group_by("trace")
        .agg(pl.col("records").max())
        .to_dicts()
    }
    vcpus = {
        r["trace"]: r["vcpu"]
        for r in summary.filter(pl.col("vcpu") >= 0)
        .group_by("trace")
        .agg(pl.col("vcpu").n_unique())
        .to_dicts()
    }
    return [
        {
            "name": t,
            "records": records.get(t),
            "vcpus": vcpus.get(t),
            "bytes": inputs.get(t, {}).get("bytes"),
            "sha256": inputs.get(t, {}).get("sha256"),
            "path": inputs.get(t, {}).get("path"),
        }
        for t in traces
    ]


def build_context(out_dir) -> dict:
    """Everything the template needs, read from ``out_dir``; ordered and formatted-ready."""
    d = results_dir(out_dir)
    manifest = read_manifest(d)
    check_output_set(d, manifest)  # tables and manifest of one run, or an error
    summary = read_table(d, "summary", SUMMARY_REQUIRED)
    if summary.height == 0:
        raise OutputError(f"{d / 'summary.parquet'}: holds no rows")
    by_view = read_table(d, "by_view", BY_VIEW_REQUIRED, optional=True)
    by_gfn = read_table(d, "by_gfn", BY_GFN_REQUIRED, optional=True)
    timeline = read_table(d, "timeline", TIMELINE_REQUIRED, optional=True)
    by_ip = read_table(d, "by_ip", BY_IP_REQUIRED, optional=True)
    population = read_table(d, "population", POPULATION_REQUIRED, optional=True)

    traces = _ordered(
        summary["trace"].unique().to_list(), [i.get("trace") for i in manifest.get("inputs", [])]
    )
    manifest_policies = manifest.get("policies", [])
    policies = _ordered(
        summary["policy"].unique().to_list(),
        [*REFERENCE_POLICIES, *(p.get("name") for p in manifest_policies)],
    )
    pcolour = _policy_colours(policies)
    categories = _cost_categories(summary.columns)
    ccolour = _category_colours(categories)
    ghz = sorted(
        {float(c["costs"]["cpu_ghz"]) for c in manifest.get("cells", []) if "cpu_ghz" in c["costs"]}
    )
    described = {p.get("name"): p for p in manifest_policies}
    timings = manifest.get("timings") or {}

    anchors = _anchors(traces)
    per_trace = []
    for t in traces:
        ip_hot = _ip_hotspots(by_ip, summary, t, policies, pcolour)
        bps = _breakpoints(by_gfn, by_ip, by_view, t, policies, pcolour)
        per_trace.append(
            {
                "name": t,
                "anchor": anchors[t],
                "comparison": _comparison(summary, t, policies, pcolour, categories, ccolour),
                "timeline": _timeline(timeline, summary, t, policies, pcolour),
                "population": _population(population, summary, t, policies, pcolour),
                "views": (views := _views(by_view, t, policies, pcolour)),
                "view_extra": [
                    (c, label) for c, label in VIEW_EXTRA if any(v.get(c) for v in views)
                ],
                "vcpus": _vcpus(summary, t, policies, pcolour),
                "hotspots": _hotspots(by_gfn, by_view, t, policies, pcolour),
                "ip_hotspots": ip_hot,
                "breakpoints": bps,
                "symbols": _name_ips(manifest, t, ip_hot, bps),
            }
        )
    return {
        "manifest": manifest,
        "version": manifest.get("version") or __version__,
        "command": manifest.get("command"),
        "timings": {
            "seconds": timings.get("seconds"),
            "records_per_second": timings.get("records_per_second"),
        },
        "traces": _traces_meta(manifest, summary, traces),
        "policies": [
            {
                "name": p,
                "colour": pcolour[p],
                "reference": p in REFERENCE_POLICIES,
                "source": described.get(p, {}).get("source"),
                "description": " ".join(str(described.get(p, {}).get("description") or "").split()),
            }
            for p in policies
        ],
        "costs": _cost_sets(manifest),
        "ghz": ghz[0] if len(ghz) == 1 else None,
        "alerts": _alerts(summary, manifest, traces, policies),
        "overview": _overview(summary, traces, policies, pcolour, anchors),
        "per_trace": per_trace,
        "multi_trace": len(traces) > 1,
        "top_gfns": TOP_GFNS,
        "top_ips": TOP_IPS,
        "has_by_view": by_view is not None,
        "has_by_gfn": by_gfn is not None,
        "vcpu_int3": "int3_exits" in summary.columns,
        "gfn_int3": by_gfn is not None and "int3_exits" in by_gfn.columns,
        "has_timeline": timeline is not None,
        "has_population": any(t["population"] for t in per_trace),
    }


_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("altp2m_replay", "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)
_ENV.filters.update(
    num=fmt_int,
    signed=fmt_signed,
    signed_compact=fmt_signed_compact,
    us=fmt_us,
    ratio=fmt_ratio,
    flt=fmt_float,
    size=fmt_bytes,
    pages=fmt_pages,
    gfn=fmt_gfn,
    compact=charts.compact,
)


def render_html(out_dir) -> str:
    """The report page for a replay output folder, as a string."""
    return _ENV.get_template("report.html.j2").render(**build_context(out_dir))


def write_report(out_dir) -> Path:
    """Render and write ``out_dir/report.html`` atomically; return its path.

    Holds the folder's lock (no replay may be writing into it) and first finishes a switch
    to a new set of files that a killed replay left half done (see ``outdir``).
    """
    if not Path(out_dir).is_dir():
        results_dir(out_dir)  # says what is wrong with it
    with FolderLock(Path(out_dir)):
        finish_switch(Path(out_dir))
        page = render_html(out_dir)
        path = Path(out_dir) / "report.html"
        atomic_write_bytes(path, page.encode("utf-8"))
    return path
