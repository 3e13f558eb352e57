"""Read a ``replay`` output folder back: checked Parquet tables and the manifest."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from altp2m_replay.errors import OutputError
from altp2m_replay.schema import DTYPES, KEYS, VIEW_SHAPE_COUNTERS, columns

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


def results_dir(path) -> Path:
    """``path`` as a folder that holds ``summary.parquet``, or an ``OutputError``."""
    d = Path(path)
    if not d.exists():
        raise OutputError(f"{path}: no such folder")
    if not d.is_dir():
        raise OutputError(f"{path}: not a folder; expected a `replay` output folder")
    if not (d / "summary.parquet").is_file():
        raise OutputError(f"{path}: no summary.parquet; expected a `replay` output folder")
    return d


def read_table(
    d: Path, name: str, required: Sequence[str], *, optional: bool = False
) -> pl.DataFrame | None:
    """``d/name.parquet`` with ``required`` columns; None when absent and ``optional``."""
    path = d / f"{name}.parquet"
    if not path.is_file():
        if optional:
            return None
        raise OutputError(f"{path}: no such file")
    try:
        df = pl.read_parquet(path)
    except Exception as exc:  # polars/arrow raise several types for a corrupt file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OutputError(f"{path}: not a readable Parquet table ({reason})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise OutputError(
            f"{path}: missing column(s) {', '.join(missing)}; "
            f"expected the {name} table that `replay` writes"
        )
    _refuse_infinite(df, path)
    return df


def _refuse_infinite(df: pl.DataFrame, path: Path) -> None:
    """No report or gate can rank an infinite number (replay refuses costs that overflow)."""
    for col, dtype in df.schema.items():
        if dtype.is_float():
            bad = df[col].is_infinite().fill_null(False)
            if bad.any():
                row = int(bad.arg_max())
                raise OutputError(
                    f'{path}: row {row}, column "{col}": expected a finite number, '
                    f"found {df[col][row]}"
                )


def read_manifest(d: Path) -> dict:
    """``manifest.json`` as a dict; {} when absent (the Parquet alone can still be rendered)."""
    path = d / "manifest.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OutputError(f"{path}: not readable JSON ({exc})") from None
    except RecursionError:
        raise OutputError(
            f"{path}: not readable JSON (arrays or objects nested too deeply)"
        ) from None
    if not isinstance(data, dict):
        raise OutputError(f"{path}: expected a JSON object, found {type(data).__name__}")
    # the report trusts these shapes below, so a hand-edited manifest fails here, by name
    for key in ("inputs", "policies", "cells"):
        items = data.setdefault(key, [])
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise OutputError(f'{path}: "{key}" must be a list of objects')
    for i, cell in enumerate(data["cells"]):
        costs = cell.setdefault("costs", {})
        if not isinstance(costs, dict):
            raise OutputError(f"{path}: cells[{i}].costs must be an object")
        for k, v in costs.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise OutputError(f'{path}: cells[{i}].costs "{k}" must be a number, found {v!r}')
        if not isinstance(cell.setdefault("warnings", []), list):
            raise OutputError(f"{path}: cells[{i}].warnings must be a list")
    if not isinstance(data.get("timings", {}), dict):
        raise OutputError(f'{path}: "timings" must be an object')
    return data


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
