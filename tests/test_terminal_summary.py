"""The table ``replay`` prints when it ends (altp2m_replay/terminal_summary.py)."""

from pathlib import Path

import numpy as np
import polars as pl
from click.testing import CliRunner
from test_replay_cli import SWITCH_LOOP, write_policy

from altp2m_replay.cli import main
from altp2m_replay.terminal_summary import MAX_TRACES, summary_text
from altp2m_replay.traces import write_trace


def _trace(path: Path, tsc=None) -> Path:
    cols = {"gfn": np.array([0x200, 0x300], np.uint64), "access": np.array([1, 2], np.uint8)}
    if tsc is not None:
        cols["tsc"] = np.array(tsc, np.uint64)
    return write_trace(cols, path)


def _replay(tmp_path, *args):
    result = CliRunner().invoke(main, ["replay", *map(str, args), "--jobs", "1"])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_policies_cheapest_first_and_a_livelock_last(tmp_path):
    trace = _trace(tmp_path / "loop.parquet")
    write_policy(tmp_path / "loop.toml", SWITCH_LOOP)
    out = tmp_path / "out"
    pols = ("-p", tmp_path / "loop.toml", "-p", "xen-access-altp2m-write", "-p", "none")
    stdout = _replay(tmp_path, trace, *pols, "-o", out, "--no-html")
    lines = stdout.splitlines()
    start = lines.index("loop (2 records)")
    header, *rows = lines[start + 1 : start + 5]
    assert header.split() == ["policy", "exits", "events", "#VEs", "cycles", "slowdown"]
    # none costs nothing; the write policy prices row 1's write; the livelock goes last
    assert [r.split()[0] for r in rows] == ["none", "xen-access-altp2m-write", "loop"]
    assert rows[0].split()[1:] == ["0", "0", "0", "0", "0", "cyc/rec"]  # no tsc: per record
    assert rows[2].endswith("livelock at record 1")
    total = pl.read_parquet(out / "summary.parquet").filter(pl.col("vcpu") == -1)
    for row in rows:
        want = total.filter(pl.col("policy") == row.split()[0]).row(0, named=True)
        assert row.split()[1:4] == [
            f"{want['ept_exits']:,}",
            f"{want['vm_events']:,}",
            f"{want['ve_delivered']:,}",
        ]
    assert "report:" not in stdout  # --no-html


def test_slowdown_with_tsc_and_the_report_path(tmp_path):
    # SPEC §7: guest cycles 1000 - 0; `none` adds no cycles: slowdown (1000 + 0) / 1000
    trace = _trace(tmp_path / "timed.parquet", tsc=[0, 1000])
    out = tmp_path / "out"
    stdout = _replay(tmp_path, trace, "-p", "none", "-o", out)
    lines = stdout.splitlines()
    i = lines.index("timed (2 records)")
    assert lines[i + 2].split() == ["none", "0", "0", "0", "0", "1.0000x"]
    assert lines[-1] == f"report: {out / 'report.html'}"


def test_many_traces_are_cut_with_a_count(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for k in range(MAX_TRACES + 2):
        _trace(folder / f"t{k:02d}.parquet")
    out = tmp_path / "out"
    _replay(tmp_path, folder, "-p", "none", "-o", out, "--no-html")
    text = summary_text(out, html=False)
    assert sum(line.endswith("(2 records)") for line in text.splitlines()) == MAX_TRACES
    assert text.splitlines()[-1] == "... and 2 more traces"
