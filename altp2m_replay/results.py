"""Results: engine counters -> the polars tables of SPEC §10 (written by ``run`` via ``outdir``).

Column names, order and dtypes come from ``schema``; this module only fills them in.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from altp2m_replay.costs import cycles
from altp2m_replay.engine.simulate import SimResult
from altp2m_replay.schema import GFN_COUNTERS, IP_COUNTERS, TABLES, TIMELINE_COUNTERS, polars_schema

SUMMARY_SCHEMA = polars_schema("summary")
BY_VIEW_SCHEMA = polars_schema("by_view")
BY_GFN_SCHEMA = polars_schema("by_gfn")
BY_IP_SCHEMA = polars_schema("by_ip")
TIMELINE_SCHEMA = polars_schema("timeline")
POPULATION_SCHEMA = polars_schema("population")

__all__ = ["TABLES", "cell_tables"]


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
    summary = pl.DataFrame(rows, schema=SUMMARY_SCHEMA, orient="row")

    view_rows = [
        {"trace": trace, "policy": policy.name, "view": v, "view_name": policy.view_name(v), **c}
        for v, c in sorted(res.views.items())
    ]
    by_view = pl.DataFrame(view_rows, schema=BY_VIEW_SCHEMA, orient="row")

    n = len(res.gfn_keys)
    by_gfn = pl.DataFrame(
        {
            "trace": [trace] * n,
            "policy": [policy.name] * n,
            "view": res.gfn_keys[:, 0],
            "gfn": res.gfn_keys[:, 1],
            **{c: res.gfn_values[:, i] for i, c in enumerate(GFN_COUNTERS)},
        }
    ).cast(BY_GFN_SCHEMA)

    m = len(res.ip_keys)
    by_ip = pl.DataFrame(
        {
            "trace": [trace] * m,
            "policy": [policy.name] * m,
            "ip": res.ip_keys,
            **{c: res.ip_values[:, i] for i, c in enumerate(IP_COUNTERS)},
        }
    ).cast(BY_IP_SCHEMA)
    if any(res.ip_other):  # ips the bounded per-ip table folded together: one row, ip null
        other = [
            {
                "trace": trace,
                "policy": policy.name,
                "ip": None,
                **dict(zip(IP_COUNTERS, res.ip_other, strict=True)),
            }
        ]
        by_ip = pl.concat([by_ip, pl.DataFrame(other, schema=BY_IP_SCHEMA)])

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
    ).cast(TIMELINE_SCHEMA)
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
    ).cast(POPULATION_SCHEMA)
    return {
        "summary": summary,
        "by_view": by_view,
        "by_gfn": by_gfn,
        "by_ip": by_ip,
        "timeline": timeline,
        "population": population,
    }
