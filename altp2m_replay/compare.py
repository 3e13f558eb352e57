"""``compare``: a CI gate over the summary tables of two replay outputs (SPEC §11).

Rows are matched by (trace, policy, vcpu). A metric *grew past the threshold* when
new > base × (1 + pct/100), decided in exact arithmetic so that a value exactly at the
threshold passes; from a zero base any positive value grew. The gate fails closed: a gated
metric that is null, NaN or infinite in NEW is "invalid" and fails (nothing can vouch for
it), as does a cell of BASE that NEW lacks (a policy or trace silently dropped must not
pass); a metric missing from either summary is an error. A cell only in NEW is listed but
not gated; a BASE value without a usable number gives "n/a" (nothing to compare against).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import polars as pl

from altp2m_replay.errors import OutputError, did_you_mean
from altp2m_replay.outdir import check_output_set
from altp2m_replay.replay_folder import read_manifest, read_table, results_dir
from altp2m_replay.schema import KEYS, columns

DEFAULT_METRICS = columns("summary", "cycles_total", "ept_exits", "vm_events")
KEY = (*KEYS, "vcpu")  # one row of the summary table
FORMATS = ("text", "markdown", "json")
STATUSES = ("grew", "invalid", "increased", "equal", "improved", "n/a")
FAILING = ("grew", "invalid")


@dataclass
class Change:
    """One metric of one cell: both values and the verdict."""

    metric: str
    base: float | int | None
    new: float | int | None
    change: float | int | None
    change_pct: float | None  # None from a zero base (+inf) or when a side has no number
    status: str  # one of STATUSES; those in FAILING fail the gate


@dataclass
class Cell:
    trace: str
    policy: str
    vcpu: int
    changes: list[Change]

    @property
    def failed(self) -> bool:
        return any(c.status in FAILING for c in self.changes)


@dataclass
class Comparison:
    base_dir: str
    new_dir: str
    metrics: list[str]
    max_increase: float
    cells: list[Cell] = field(default_factory=list)
    missing: list[tuple] = field(default_factory=list)  # in BASE only: fails the gate
    added: list[tuple] = field(default_factory=list)  # in NEW only: reported, not gated

    @property
    def failed(self) -> bool:
        return bool(self.missing) or any(c.failed for c in self.cells)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for cell in self.cells:
            for ch in cell.changes:
                out[ch.status] += 1
        return out


# ----------------------------------------------------------------------------- loading
def _load(path) -> tuple[Path, pl.DataFrame]:
    d = results_dir(path)
    check_output_set(d, read_manifest(d))  # one run's files, or an error
    df = read_table(d, "summary", KEY)
    if df.height == 0:
        raise OutputError(f"{d / 'summary.parquet'}: holds no rows")
    dup = df.group_by(list(KEY)).len().filter(pl.col("len") > 1).sort(list(KEY))
    if dup.height:
        t, p, v = dup.row(0)[:3]
        raise OutputError(
            f"{d / 'summary.parquet'}: cell trace={t!r} policy={p!r} vcpu={v} "
            f"appears {dup.row(0)[3]} times; expected one row per cell"
        )
    return d, df


def _numeric(df: pl.DataFrame) -> list[str]:
    return [c for c, t in df.schema.items() if t.is_numeric() and c not in KEY]


def _check_metrics(
    metrics, base: pl.DataFrame, new: pl.DataFrame, base_path, new_path
) -> list[str]:
    metrics = list(dict.fromkeys(metrics or DEFAULT_METRICS))
    for df, path in ((base, base_path), (new, new_path)):
        numeric = _numeric(df)
        for m in metrics:
            if m not in numeric:
                what = "not a numeric column" if m in df.columns else "no such column"
                raise OutputError(
                    f'--metric "{m}": {what} in {path / "summary.parquet"}'
                    f"{did_you_mean(m, numeric)}"
                )
    return metrics


def _clean(v):
    """Null and NaN are both 'no value'."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _usable(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isinf(v))


def judge(metric: str, base, new, max_increase: float) -> Change:
    """The verdict for one value pair (see the module docstring for the rule)."""
    base, new = _clean(base), _clean(new)
    if not _usable(new):
        return Change(metric, base, new, None, None, "invalid")
    if not _usable(base):
        return Change(metric, base, new, None, None, "n/a")
    change = new - base
    if new == base:
        return Change(metric, base, new, change, 0.0, "equal")
    if base == 0:
        grew = new > 0
        pct = None
    else:
        # Fraction(str(pct)) is the decimal the user typed, so "10" means exactly 10 %
        limit = Fraction(base) * (100 + Fraction(str(max_increase)))
        grew = Fraction(new) * 100 > limit
        pct = change / abs(base) * 100
    status = "grew" if grew else "improved" if new < base else "increased"
    return Change(metric, base, new, change, pct, status)


def compare_dirs(base_dir, new_dir, metrics=(), max_increase: float = 0.0) -> Comparison:
    """Match the two summaries by (trace, policy, vcpu) and judge every metric."""
    if (
        not isinstance(max_increase, (int, float))
        or not max_increase >= 0
        or math.isinf(max_increase)
    ):
        raise OutputError(f"--max-increase: expected a percentage >= 0, found {max_increase!r}")
    base_path, base = _load(base_dir)
    new_path, new = _load(new_dir)
    metrics = _check_metrics(metrics, base, new, base_path, new_path)
    cols = [*KEY, *metrics]
    b = {tuple(r[:3]): r[3:] for r in base.select(cols).iter_rows()}
    n = {tuple(r[:3]): r[3:] for r in new.select(cols).iter_rows()}

    def order(k):  # per trace and policy: the total (vcpu -1) first, then vCPUs
        return (str(k[0]), str(k[1]), k[2])

    common = sorted(b.keys() & n.keys(), key=order)
    if not common:
        raise OutputError(
            f"{base_dir} and {new_dir} share no (trace, policy, vcpu) cell; nothing to compare"
        )
    out = Comparison(
        str(base_dir),
        str(new_dir),
        metrics,
        float(max_increase),
        missing=sorted(b.keys() - n.keys(), key=order),
        added=sorted(n.keys() - b.keys(), key=order),
    )
    for k in common:
        changes = [
            judge(m, bv, nv, max_increase) for m, bv, nv in zip(metrics, b[k], n[k], strict=True)
        ]
        out.cells.append(Cell(k[0], k[1], k[2], changes))
    return out


# ----------------------------------------------------------------------------- formatting
def _num(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, int) or float(v).is_integer():
        return f"{v:,.0f}"
    return f"{v:,.4f}".rstrip("0").rstrip(".")


def _signed(v) -> str:
    return ("+" if v > 0 else "") + _num(v)


def _pct(ch: Change) -> str:
    if ch.change is None:
        return "n/a" if ch.status == "n/a" else ""
    if ch.change_pct is None:  # from a zero base
        return "+inf%" if ch.change > 0 else "-inf%"
    return f"{ch.change_pct:+.2f}%"


def _vcpu(v: int) -> str:
    return "total" if v < 0 else str(v)


def _cell_name(k: tuple) -> str:
    return f"{k[0]} · {k[1]} · vcpu {_vcpu(k[2])}"


def _verdict(c: Comparison) -> str:
    counts = c.counts()
    pct = f"+{c.max_increase:g}%"
    n = f"{len(c.cells)} cells × {len(c.metrics)} metrics"
    if c.failed:
        parts = []
        if counts["grew"]:
            parts.append(
                f"{counts['grew']} value{'s' if counts['grew'] != 1 else ''} grew past {pct}"
            )
        if counts["invalid"]:
            parts.append(
                f"{counts['invalid']} value{'s' if counts['invalid'] != 1 else ''} "
                f"null, NaN or infinite in new"
            )
        if c.missing:
            parts.append(
                f"{len(c.missing)} cell{'s' if len(c.missing) != 1 else ''} missing from new"
            )
        return f"FAIL: {'; '.join(parts)} ({n})"
    seen = [f"{counts[s]} {s}" for s in ("improved", "equal", "increased", "n/a") if counts[s]]
    return f"PASS: no metric grew past {pct} ({n}: {', '.join(seen)})"


def _rows(c: Comparison) -> list[list[str]]:
    rows = []
    for cell in c.cells:
        for ch in cell.changes:
            change = "" if ch.change is None else _signed(ch.change)
            rows.append(
                [
                    cell.trace,
                    cell.policy,
                    _vcpu(cell.vcpu),
                    ch.metric,
                    _num(ch.base),
                    _num(ch.new),
                    change,
                    _pct(ch),
                    ch.status,
                ]
            )
    return rows


def format_text(c: Comparison) -> str:
    head = ["trace", "policy", "vcpu", "metric", "base", "new", "change", "change %", "status"]
    right = {2, 4, 5, 6, 7}
    rows = _rows(c)
    for r in rows:
        if r[8] in FAILING:
            r[8] = r[8].upper()  # the failing lines should stand out in a CI log
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]

    def line(cells):
        return "  ".join(
            x.rjust(w) if i in right else x.ljust(w)
            for i, (x, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [
        f"compare {c.base_dir} -> {c.new_dir} (threshold +{c.max_increase:g}%)",
        "",
        line(head),
        line(["-" * w for w in widths]),
    ]
    out += [line(r) for r in rows]
    if c.missing:
        out += ["", "missing from new (fails the gate):"]
        out += [f"  {_cell_name(k)}" for k in c.missing]
    if c.added:
        out += ["", "new cells (not gated):"]
        out += [f"  {_cell_name(k)}" for k in c.added]
    out += ["", _verdict(c)]
    return "\n".join(out)


def _md(s) -> str:
    return str(s).replace("|", "\\|")


def format_markdown(c: Comparison) -> str:
    mark = "❌" if c.failed else "✅"
    out = [
        f"### {mark} altp2m-replay compare: {'fail' if c.failed else 'pass'}",
        "",
        f"{mark} **{_md(_verdict(c))}**",
        "",
        f"Base `{_md(c.base_dir)}` → new `{_md(c.new_dir)}`, threshold +{c.max_increase:g}%.",
        "",
        "| trace | policy | vCPU | metric | base | new | change | change % | status |",
        "|---|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in _rows(c):
        status = f"❌ {r[8]}" if r[8] in FAILING else r[8]
        out.append("| " + " | ".join(_md(x) for x in [*r[:8], status]) + " |")
    if c.missing:
        out += [
            "",
            "**Missing from new (fails the gate):** "
            + ", ".join(f"`{_md(_cell_name(k))}`" for k in c.missing),
        ]
    if c.added:
        out += [
            "",
            "**New cells (not gated):** " + ", ".join(f"`{_md(_cell_name(k))}`" for k in c.added),
        ]
    return "\n".join(out)


def _json(v):
    """Infinity is not JSON: say it as the string "inf" or "-inf"."""
    return _num(v) if isinstance(v, float) and math.isinf(v) else v


def format_json(c: Comparison) -> str:
    def key(k):
        return {"trace": k[0], "policy": k[1], "vcpu": k[2]}

    doc = {
        "failed": c.failed,
        "verdict": _verdict(c),
        "base": c.base_dir,
        "new": c.new_dir,
        "metrics": c.metrics,
        "max_increase": c.max_increase,
        "counts": c.counts(),
        "cells": [
            {
                **key((cell.trace, cell.policy, cell.vcpu)),
                "failed": cell.failed,
                "metrics": {
                    ch.metric: {
                        "base": _json(ch.base),
                        "new": _json(ch.new),
                        "change": ch.change,
                        "change_pct": ch.change_pct,
                        "status": ch.status,
                        "grew": ch.status == "grew",
                    }
                    for ch in cell.changes
                },
            }
            for cell in c.cells
        ],
        "missing_cells": [key(k) for k in c.missing],
        "new_cells": [key(k) for k in c.added],
    }
    return json.dumps(doc, indent=2, ensure_ascii=False)


FORMATTERS = {"text": format_text, "markdown": format_markdown, "json": format_json}


def compare(
    base_dir, new_dir, metrics=(), max_increase: float = 0.0, fmt: str = "text"
) -> tuple[str, bool]:
    """Compare two replay outputs; return the report in ``fmt`` and whether the gate failed."""
    if fmt not in FORMATTERS:
        raise OutputError(
            f'--format: unknown format "{fmt}"{did_you_mean(fmt, FORMATTERS)}; '
            f"expected one of {', '.join(FORMATS)}"
        )
    result = compare_dirs(base_dir, new_dir, metrics, max_increase)
    return FORMATTERS[fmt](result), result.failed
