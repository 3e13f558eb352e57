"""report.html for the Revision 2 counters: livelocks beside crashes, breakpoint (INT3)
hits by frame and by address with symbol names, every cost category, and older folders.

The livelock folder comes from a real `replay` through the CLI. The breakpoint folder is
assembled from `simulate_arrays` + `cell_tables` (the same tables `replay` writes) because
`replay` of a trace file does not yet hand byte addresses and `symbols` to the policy; the
trace file with its `symbols` metadata is written beside it and named in the manifest, as
`replay` names its inputs.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from test_report import _body_ok, _console_errors, _run_chromium

from altp2m_replay.cli import main
from altp2m_replay.costs import COSTS, effective_costs
from altp2m_replay.engine import simulate_arrays
from altp2m_replay.outdir import TABLES, table_digests, write_table
from altp2m_replay.policy import load_policy, parse_policy
from altp2m_replay.report import render_html
from altp2m_replay.report.charts import compact
from altp2m_replay.report.html import SYMBOL_CHARS, _category_colours, _symbol_label
from altp2m_replay.results import cell_tables

FOO, BAR, PLAIN = 0xFFFF_FFFF_8100_0010, 0xFFFF_FFFF_8100_1040, 0xFFFF_FFFF_8100_0020
SYMBOLS = {
    "do_sys_open": FOO,
    "vfs_read": BAR,
    "ksys_read": BAR,
    "never_run": 0xFFFF_FFFF_8200_0000,
}

# breakpoints at two symbols, answered by emulation (SmartVMI's "emul"), in a view that
# keeps the original frames: a hit traps in `bp` and view 0 alike (the writer has no remap)
BP_POLICY = """
name = "bp-emulate"
description = "INT3 at do_sys_open and vfs_read, emulated on a hit."

[[view]]
name = "bp"
default_access = "rwx"

[breakpoints]
at = [{ symbol = ["do_sys_open", "vfs_*"] }]

[[setup]]
op = "write_breakpoints"
view = "bp"

[[setup]]
op = "switch_p2m"
view = "bp"

[on_breakpoint]
action = "emulate"
"""


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _write_trace(path: Path) -> dict[str, np.ndarray]:
    """300 instructions cycling over three code addresses, each fetch then a data read."""
    gpa, access, insn, ip = [], [], [], []
    code = [(0x1010, FOO), (0x1020, PLAIN), (0x2040, BAR)]
    for i in range(300):
        g, addr = code[i % 3]
        gpa += [g, 0x5000 + 8 * (i % 5)]
        access += [4, 1]
        insn += [i, i]
        ip += [addr, addr]
    arrays = {
        "gpa": np.asarray(gpa, np.uint64),
        "access": np.asarray(access, np.uint8),
        "insn": np.asarray(insn, np.uint64),
        "ip": np.asarray(ip, np.uint64),
    }
    table = pa.table({k: pa.array(v) for k, v in arrays.items()})
    meta = {"format": 1, "source": "test", "symbols": SYMBOLS}
    pq.write_table(table.replace_schema_metadata({"altp2m_replay": json.dumps(meta)}), path)
    return arrays


def _assemble(out: Path, trace_path: Path, arrays, policies) -> None:
    """Write the tables and manifest of a replay of ``trace_path`` under ``policies``."""
    out.mkdir()
    trace = trace_path.stem
    cells, tables = [], {name: [] for name in TABLES}
    for pol in policies:
        costs = effective_costs(pol.costs)
        res = simulate_arrays(pol, arrays, symbols=SYMBOLS)
        for name, df in cell_tables(trace, pol, res, costs).items():
            tables[name].append(df)
        cells.append(
            {
                "trace": trace,
                "policy": pol.name,
                "records": int(res.total["records"]),
                "seconds": 0.0,
                "costs": costs,
                "warnings": list(res.warnings),
            }
        )
    for name, dfs in tables.items():
        write_table(pl.concat(dfs), out / f"{name}.parquet")
    data = trace_path.read_bytes()
    manifest = {
        "tool": "altp2m-replay",
        "version": "test",
        "command": "assembled by the test",
        "inputs": [
            {
                "trace": trace,
                "path": str(trace_path),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "rows": len(arrays["gpa"]),
            }
        ],
        "policies": [
            {"name": p.name, "source": p.source, "description": p.description, "text": p.text}
            for p in policies
        ],
        "cells": cells,
        "timings": {"seconds": 0.0},
        "files": table_digests(out),
    }
    (out / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def bp_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bp")
    trace = root / "bptrace.parquet"
    arrays = _write_trace(trace)
    policies = [load_policy("none"), parse_policy(BP_POLICY, "bp-emulate.toml")]
    _assemble(root / "out", trace, arrays, policies)
    (root / "out" / "report.html").write_text(render_html(root / "out"), encoding="utf-8")
    return root / "out"


@pytest.fixture(scope="module")
def livelock_dir(tmp_path_factory) -> Path:
    """split-rx livelocks on the generated kernel trace: an instruction fetches from a page
    that is execute-only in one view and reads a page that is read/write-only in the other."""
    root = tmp_path_factory.mktemp("livelock")
    trace = root / "kern.parquet"
    r = cli("trace", "generate", "kernel", "-n", 5_000, "--seed", 3, "--vcpus", 2, "-o", trace)
    assert r.exit_code == 0, r.output
    r = cli(
        "replay",
        trace,
        "-p",
        "none",
        "-p",
        "split-rx",
        "-p",
        "xen-access-altp2m-write",
        "--jobs",
        1,
        "-o",
        root / "out",
    )
    assert r.exit_code == 0, r.output
    return root / "out"


def _total(out: Path, policy: str) -> dict:
    s = pl.read_parquet(out / "summary.parquet")
    return s.filter((pl.col("policy") == policy) & (pl.col("vcpu") == -1)).to_dicts()[0]


def _section(page: str, start: str, end: str) -> str:
    return page[page.index(start) : page.index(end)]


def _bp_section(page: str) -> str:
    hot = _section(page, 'id="hotspots"', 'id="run"')
    return hot[hot.index("Breakpoint hits (INT3 exits)") :]


# ----------------------------------------------------------------------------- livelocks
def test_livelock_is_shown_at_the_top_with_its_record(livelock_dir):
    row = _total(livelock_dir, "split-rx")
    assert row["livelocked"] == 1 and row["livelock_record"] >= 0  # the fixture livelocks
    assert _total(livelock_dir, "none")["livelocked"] == 0
    page = render_html(livelock_dir)
    alerts = _section(page, 'id="alerts"', 'id="comparison"')
    items = re.findall(r'<li class="livelock">(.*?)</li>', alerts, re.S)
    assert items == [
        (
            f"<b>split-rx</b> on <b>kern</b>: livelocked at record "
            f"{row['livelock_record']:,}, after {row['records']:,} records"
        )
    ]
    assert "restarts an instruction forever" in alerts and "guest would hang" in alerts
    assert "1 livelock<" in page[: page.index('id="alerts"')]  # the header's alert count
    cmp = _section(page, 'id="comparison"', 'id="timeline"')
    assert f"livelocked @ {row['livelock_record']:,}</span>" in cmp
    assert "No crashes, no livelocks" not in page


def test_comparison_table_has_the_new_counters(livelock_dir):
    page = render_html(livelock_dir)
    cmp = _section(page, 'id="comparison"', "Cycles by category")
    row = _total(livelock_dir, "xen-access-altp2m-write")
    assert row["restarts"] > 0  # the write policy restarts every faulting instruction
    assert '<th class="n">restarts</th>' in cmp
    cells = re.search(r"xen-access-altp2m-write</td>(.*?)</tr>", cmp, re.S).group(1)
    values = re.findall(r'<td class="n">([^<]*)</td>', cells)
    # records, EPT exits, vm_events, #VE, switches, lazy copies, then restarts
    assert values[6] == f"{row['restarts']:,}"
    # the Δ column is compact (the table must fit the page), exact in its tooltip
    delta = row["cycles_total"] - _total(livelock_dir, "none")["cycles_total"]
    assert f'<td class="n" title="+{round(delta):,} cycles">+{compact(delta)}</td>' in cells
    # no policy here hits a breakpoint or writes CR3: those columns are named, not drawn
    for label in ("INT3 exits", "breakpoint events", "CR3 events"):
        assert f'<th class="n">{label}</th>' not in cmp
    assert "INT3 exits, breakpoint events, CR3 events: 0 for every policy on this trace" in cmp


def test_chromium_shows_the_livelock_first(livelock_dir, tmp_path):
    r = _run_chromium(livelock_dir / "report.html", tmp_path, "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    assert _body_ok(dom) and not _console_errors(r.stderr)
    row = _total(livelock_dir, "split-rx")
    hit = dom.index(f"livelocked at record {row['livelock_record']:,}")
    assert dom.index('id="alerts"') < hit < dom.index('id="comparison"')


# ----------------------------------------------------------------------------- breakpoints
def test_breakpoint_hits_by_address_carry_symbol_names(bp_dir):
    by_ip = pl.read_parquet(bp_dir / "by_ip.parquet").filter(pl.col("policy") == "bp-emulate")
    hits = {r["ip"]: r["int3_exits"] for r in by_ip.to_dicts() if r["int3_exits"]}
    assert set(hits) == {FOO, BAR} and all(v > 0 for v in hits.values())
    section = _bp_section(render_html(bp_dir))
    rows = re.findall(
        r'<td class="n mono">(0x[0-9a-f]+)</td>\s*<td class="mono sym" '
        r'title="([^"]*)">([^<]*)</td>\s*<td class="n">([\d,]+)<',
        section,
    )
    assert [(int(ip, 16), full, shown, n) for ip, full, shown, n in rows] == [
        (
            ip,
            *{
                FOO: ("do_sys_open", "do_sys_open"),
                BAR: ("ksys_read, vfs_read", "ksys_read (+1 aliases)"),
            }[ip],
            f"{hits[ip]:,}",
        )
        for ip in sorted(hits, key=lambda ip: (-hits[ip], ip))
    ]
    assert "Symbol names from the <code>symbols</code> metadata of" in section
    assert "bp-emulate<span>" in section and "none<span>" not in section  # only policies with hits


def test_breakpoint_hits_by_frame(bp_dir):
    by_gfn = pl.read_parquet(bp_dir / "by_gfn.parquet")
    hit = by_gfn.filter((pl.col("policy") == "bp-emulate") & (pl.col("int3_exits") > 0))
    assert sorted(hit["gfn"].to_list()) == [0x1, 0x2]  # the frames of 0x1010 and 0x2040
    section = _bp_section(render_html(bp_dir))
    table = re.search(r'<table class="bp-gfns">.*?</table>', section, re.S).group(0)
    for r in hit.to_dicts():
        assert re.search(
            rf">{r['gfn']:#x}</td>\s*<td>{r['view']} · bp</td>\s*"
            rf'<td class="n">{r["int3_exits"]:,}<',
            table,
        )


def test_ip_table_names_symbols_and_comparison_counts_hits(bp_dir):
    page = render_html(bp_dir)
    row = _total(bp_dir, "bp-emulate")
    assert row["int3_exits"] == row["breakpoint_events"] > 0
    cmp = _section(page, 'id="comparison"', "Cycles by category")
    cells = re.search(r"bp-emulate</td>(.*?)</tr>", cmp, re.S).group(1)
    assert re.findall(r'<td class="n">([^<]*)</td>', cells)[6:9] == [
        f"{row['int3_exits']:,}"
    ] * 2 + [f"{row['restarts']:,}"]
    assert "CR3 events: 0 for every policy on this trace" in cmp
    assert "INT3 exits" in page[page.index('id="vcpus"') : page.index('id="hotspots"')]
    # the views table counts hits per view: every hit is in `bp`, no view was reset
    views = _section(page, "Views at the end of the run", 'id="vcpus"')
    assert '<th class="n">INT3 exits</th>' in views and ">resets</th>" not in views
    hits = re.search(r"<td class=\"n\">1</td>\s*<td>bp</td>(.*?)</tr>", views, re.S).group(1)
    assert f'<td class="n">{row["int3_exits"]:,}</td>' in hits
    # the EPT-exit ranking keeps to instructions with EPT exits or #VEs; they get a symbol
    # column too, since the trace has symbols (this one is not a symbol: a dash)
    hot = _section(page, "Top faulting instructions", "Breakpoint hits (INT3 exits)")
    assert re.findall(r'<td class="n mono">(0x[0-9a-f]+)</td>', hot) == [f"{PLAIN:#x}"]
    assert '<td class="mono sym" title="">—</td>' in hot


def test_every_cost_category_appears(bp_dir):
    page = render_html(bp_dir)
    table = re.search(r'<details class="hot categories">.*?</details>', page, re.S).group(0)
    keys = re.findall(r'<td class="mono"><span class="swatch"[^>]*></span>([a-z0-9_]+)</td>', table)
    assert keys == list(COSTS)  # every key, in the cost model's order
    assert "int3_exits</td>" in table and "ept_sync_ipis</td>" in table  # what each is charged per
    # the chart draws the categories this run spent: INT3 exits and emulations among them
    legend = _section(page, "<figcaption>Cycles by category</figcaption>", "</figure>")
    assert "int3 exit</span>" in legend and "emulation</span>" in legend
    colours = _category_colours(list(COSTS))
    assert len(set(colours.values())) == len(COSTS)  # no two categories share a colour


def test_timeline_has_an_int3_panel(bp_dir):
    page = render_html(bp_dir)
    tl = _section(page, 'id="timeline"', 'id="lazy"')
    svg = re.search(
        r'<svg[^>]*aria-label="INT3 exits \(breakpoint hits\) per window, bptrace"'
        r".*?</svg>",
        tl,
        re.S,
    )
    assert svg and svg.group(0).count("<polyline") == 2  # one line per policy


def test_chromium_renders_breakpoints_and_every_category(bp_dir, tmp_path):
    r = _run_chromium(bp_dir / "report.html", tmp_path, "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    assert _body_ok(dom) and not _console_errors(r.stderr)
    section = _bp_section(dom)
    assert f">{FOO:#x}</td>" in section and ">do_sys_open</td>" in section
    assert ">ksys_read (+1 aliases)</td>" in section
    table = re.search(r'<details class="hot categories">.*?</details>', dom, re.S).group(0)
    for key in COSTS:
        assert f"</span>{key}</td>" in table
    assert 'aria-label="INT3 exits (breakpoint hits) per window, bptrace"' in dom


def test_symbols_degrade_when_the_trace_is_gone_or_changed(bp_dir, tmp_path):
    manifest = json.loads((bp_dir / "manifest.json").read_text())
    trace = Path(manifest["inputs"][0]["path"])
    moved = tmp_path / "moved.parquet"
    trace.rename(moved)
    try:
        section = _bp_section(render_html(bp_dir))
        assert "is not there any more: addresses without symbol names" in section
        assert "do_sys_open" not in section and f">{FOO:#x}</td>" in section
        trace.write_bytes(moved.read_bytes() + b"\0")  # another file at that path
        section = _bp_section(render_html(bp_dir))
        assert "changed since the replay" in section and "do_sys_open" not in section
        trace.write_bytes(b"\0" * moved.stat().st_size)  # same size, not Parquet
        section = _bp_section(render_html(bp_dir))
        assert "could not be read: addresses without symbol names" in section
        assert "do_sys_open" not in section
    finally:
        moved.replace(trace)
    assert "do_sys_open" in _bp_section(render_html(bp_dir))


# ----------------------------------------------------------------------------- older folders
NEW_COLUMNS = {
    "summary": (
        "int3_exits",
        "breakpoint_events",
        "cr3_events",
        "restarts",
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
        "livelocked",
        "livelock_record",
        "cycles_int3_exit",
        "cycles_cr3_exit",
        "cycles_vmfunc_exit",
        "cycles_view_reset",
        "cycles_ept_sync_ipi",
    ),
    "by_view": ("int3_exits", "resets"),
    "by_gfn": ("int3_exits",),
    "by_ip": ("int3_exits",),
    "timeline": ("int3_exits",),
}


def test_a_folder_from_before_revision_2_still_renders(bp_dir, tmp_path):
    """Older folders lack the new columns: the page renders without them (no error)."""
    old = tmp_path / "old"
    old.mkdir()
    for name in TABLES:
        df = pl.read_parquet(bp_dir / f"{name}.parquet")
        df = df.drop([c for c in NEW_COLUMNS.get(name, ()) if c in df.columns])
        if name == "by_gfn":  # older tables held only gfns with an EPT exit or a #VE
            df = df.filter((pl.col("ept_exits") > 0) | (pl.col("ve_delivered") > 0))
        df.write_parquet(old / f"{name}.parquet")
    manifest = json.loads((bp_dir / "manifest.json").read_text())
    manifest["files"] = table_digests(old)
    (old / "manifest.json").write_text(json.dumps(manifest))
    r = cli("report", old)
    assert r.exit_code == 0, r.output
    page = (old / "report.html").read_text(encoding="utf-8")
    assert ">INT3 exits</th>" not in page and "livelocked" not in page
    assert "Breakpoint hits (INT3 exits)" not in page and "INT3 exits (breakpoint hits)" not in page
    assert "No crashes, no livelocks and no setup warnings" in page
    table = re.search(r'<details class="hot categories">.*?</details>', page, re.S).group(0)
    assert "int3_exit<" not in table and "ept_exit<" in table


def test_symbol_labels_are_bounded():
    assert _symbol_label(None) == ("", "")
    assert _symbol_label(["a"]) == ("a", "a")
    long = "x" * 5000
    shown, full = _symbol_label([long])
    assert len(shown) == SYMBOL_CHARS and shown.endswith("…") and full == shown
    names = [f"alias{i:02d}" for i in range(20)]
    shown, full = _symbol_label(names)
    assert shown == "alias00 (+19 aliases)"
    assert full.startswith("alias00, alias01") and full.endswith(", … (20 names)")
    assert "alias08" not in full
