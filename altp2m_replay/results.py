"""Results: engine counters -> the polars tables of SPEC §10 (written by ``run`` via ``outdir``)."""

from __future__ import annotations

import numpy as np
import polars as pl

from altp2m_replay.costs import COSTS, cycles
from altp2m_replay.engine.simulate import (
    COUNTERS,
    GFN_COUNTERS,
    TIMELINE_COUNTERS,
    VIEW_COUNTERS,
    SimResult,
)
from altp2m_replay.outdir import TABLES  # noqa: F401 - the names of cell_tables' tables


def cell_tables(
    trace: str, policy, res: SimResult, costs: dict[str, float]
) -> dict[str, pl.DataFrame]:
    """The tables of one trace x policy cell (TABLES), as polars DataFrames."""
    ghz = costs["cpu_ghz"]
    rows = []
    for vcpu, counters in [(-1, res.total), *sorted(res.vcpus.items())]:
        row = {"trace": trace, "policy": policy.name, "vcpu": vcpu}
        row.update(counters)  # vCPU rows already carry setup_* = 0 (SPEC §7)
        cyc = cycles(counters, costs)
        row.update(cyc)
        row["cycles_per_record"] = (
            cyc["cycles_total"] / counters["records"] if counters["records"] else 0.0
        )
        row["overhead_us"] = cyc["cycles_total"] / (ghz * 1e3)
        guest = sum(res.guest_cycles.values()) if vcpu == -1 else res.guest_cycles.get(vcpu, 0)
        row["guest_cycles"] = guest
        row["slowdown"] = (guest + cyc["cycles_total"]) / guest if guest > 0 else None
        rows.append(row)
    schema = {"trace": pl.Utf8, "policy": pl.Utf8, "vcpu": pl.Int32}
    schema.update(dict.fromkeys(COUNTERS, pl.Int64))
    schema.update({f"cycles_{k}": pl.Float64 for k in COSTS})
    schema.update(
        {
            "cycles_total": pl.Float64,
            "cycles_per_record": pl.Float64,
            "overhead_us": pl.Float64,
            "guest_cycles": pl.Int64,
            "slowdown": pl.Float64,
        }
    )
    summary = pl.DataFrame(rows, schema=schema, orient="row")

    view_rows = [
        {"trace": trace, "policy": policy.name, "view": v, "view_name": policy.view_name(v), **c}
        for v, c in sorted(res.views.items())
    ]
    vschema = {"trace": pl.Utf8, "policy": pl.Utf8, "view": pl.Int32, "view_name": pl.Utf8}
    vschema.update(dict.fromkeys(VIEW_COUNTERS, pl.Int64))
    by_view = pl.DataFrame(view_rows, schema=vschema, orient="row")

    gschema = {"trace": pl.Utf8, "policy": pl.Utf8, "view": pl.Int32, "gfn": pl.UInt64}
    gschema.update(dict.fromkeys(GFN_COUNTERS, pl.Int64))
    n = len(res.gfn_keys)
    by_gfn = pl.DataFrame(
        {
            "trace": [trace] * n,
            "policy": [policy.name] * n,
            "view": res.gfn_keys[:, 0],
            "gfn": res.gfn_keys[:, 1],
            **{c: res.gfn_values[:, i] for i, c in enumerate(GFN_COUNTERS)},
        }
    ).cast(gschema)

    m = len(res.ip_keys)
    ip_schema = {
        "trace": pl.Utf8,
        "policy": pl.Utf8,
        "ip": pl.UInt64,
        "ept_exits": pl.Int64,
        "ve_delivered": pl.Int64,
        "int3_exits": pl.Int64,
    }
    by_ip = pl.DataFrame(
        {
            "trace": [trace] * m,
            "policy": [policy.name] * m,
            "ip": res.ip_keys,
            "ept_exits": res.ip_values[:, 0],
            "ve_delivered": res.ip_values[:, 1],
            "int3_exits": res.ip_values[:, 2],
        }
    ).cast(ip_schema)
    if any(res.ip_other):  # ips the bounded per-ip table folded together: one row, ip null
        other = [
            {
                "trace": trace,
                "policy": policy.name,
                "ip": None,
                "ept_exits": res.ip_other[0],
                "ve_delivered": res.ip_other[1],
                "int3_exits": res.ip_other[2],
            }
        ]
        by_ip = pl.concat([by_ip, pl.DataFrame(other, schema=ip_schema)])

    tl = res.timeline
    win_cycles = np.asarray(cycles(tl, costs)["cycles_total"], dtype=float)
    timeline = pl.DataFrame(
        {
            "trace": [trace] * len(tl["window"]),
            "policy": [policy.name] * len(tl["window"]),
            "window": tl["window"],
            "first_record": tl["first_record"],
            **{name: tl[name] for name in TIMELINE_COUNTERS},
            "cycles_total": win_cycles,
        }
    )
    nw = len(tl["window"])
    views = sorted(res.population)
    population = pl.DataFrame(
        {
            "trace": [trace] * (nw * len(views)),
            "policy": [policy.name] * (nw * len(views)),
            "view": np.repeat(np.asarray(views, dtype=np.int32), nw),
            "view_name": [policy.view_name(v) for v in views for _ in range(nw)],
            "window": np.tile(tl["window"], len(views)),
            "first_record": np.tile(tl["first_record"], len(views)),
            "pages_mapped": np.concatenate([res.population[v] for v in views])
            if views
            else np.zeros(0, np.int64),
        }
    ).cast(
        {
            "trace": pl.Utf8,
            "policy": pl.Utf8,
            "view": pl.Int32,
            "view_name": pl.Utf8,
            "window": pl.Int64,
            "first_record": pl.Int64,
            "pages_mapped": pl.Int64,
        }
    )
    return {
        "summary": summary,
        "by_view": by_view,
        "by_gfn": by_gfn,
        "by_ip": by_ip,
        "timeline": timeline,
        "population": population,
    }
