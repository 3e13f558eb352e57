"""Replay checks trace values on the batches it decodes (traces.replay_facts, traces.Validator):
the same errors as ``trace validate``, the same tables as a run checked up front."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from altp2m_replay import run, traces, unit
from altp2m_replay.cli import main
from altp2m_replay.errors import TraceError
from altp2m_replay.policy import load_policy
from altp2m_replay.results import TABLES

POLICIES = ["xen-access-altp2m-write", "hvmi-ve-pagetables"]


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _grouped_trace(path, n=4000, group=500, **bad) -> tuple:
    """A 4-vCPU trace in row groups of ``group`` rows; ``bad`` maps a column to (row, value)."""
    rng = np.random.default_rng(3)
    data = {
        "gfn": rng.integers(0x100, 0x900, n).astype(np.uint64),
        "access": rng.choice(np.array([1, 2, 4], np.uint8), n),
        "vcpu": (np.arange(n) // 7 % 4).astype(np.uint16),
        "insn": np.arange(n, dtype=np.uint64),
        "tsc": np.arange(n, dtype=np.uint64) * 3 + 1000,
    }
    for col, (row, value) in bad.items():
        data[col][row] = value
    return traces.write_trace(data, path, row_group_size=group), data


def test_quick_stats_match_the_full_pass(tmp_path):
    path, data = _grouped_trace(tmp_path / "t.parquet")
    quick = traces.quick_stats(path)
    full = traces.validate(path)
    assert quick.rows == full.rows == 4000
    assert quick.max_gfn == full.max_gfn == int(data["gfn"].max())
    assert np.array_equal(quick.vcpus, full.vcpus) and list(quick.vcpus) == [0, 1, 2, 3]


def test_without_statistics_replay_checks_up_front_and_agrees(tmp_path):
    path, data = _grouped_trace(tmp_path / "t.parquet")
    bare = tmp_path / "nostats.parquet"
    table = pq.read_table(path)
    pq.write_table(table, bare, row_group_size=500, write_statistics=False)
    assert traces.quick_stats(bare) is None
    stats, _facts, checked = traces.replay_facts(bare, False)
    assert checked and stats.max_gfn == int(data["gfn"].max())
    run.replay([path], POLICIES, tmp_path / "a", jobs=1, html=False)
    run.replay([bare], POLICIES, tmp_path / "b", jobs=1, html=False)
    for t in TABLES:
        a = pl.read_parquet(tmp_path / "a" / f"{t}.parquet")
        b = pl.read_parquet(tmp_path / "b" / f"{t}.parquet")
        if "trace" in a.columns:
            a, b = a.drop("trace"), b.drop("trace")
        assert a.equals(b), t


def test_checked_while_replaying_gives_the_tables_of_a_checked_run(tmp_path):
    path, _ = _grouped_trace(tmp_path / "t.parquet")
    pols = [load_policy(p) for p in POLICIES]
    streamed = unit.replay_trace(path, pols, {}, None, None)
    assert traces.replay_facts(path, False)[2] is False  # this trace takes the streaming path
    checked = unit.replay_trace(
        path, pols, {}, None, None, prepared=(*traces.trace_facts(path, False), True)
    )
    for s, c in zip(streamed, checked, strict=True):
        for t in TABLES:
            assert s.tables[t].equals(c.tables[t]), (s.policy, t)


@pytest.mark.parametrize(
    ("col", "row", "value", "needle"),
    [
        ("tsc", 2701, 5, 'row 2701, column "tsc": expected non-decreasing tsc per vCPU'),
        ("access", 3999, 0, 'row 3999, column "access"'),
        ("vcpu", 1234, 5000, 'row 1234, column "vcpu"'),
    ],
)
def test_a_bad_row_in_a_late_row_group_stops_replay_with_the_validate_message(
    tmp_path, col, row, value, needle
):
    path, _ = _grouped_trace(tmp_path / "t.parquet", **{col: (row, value)})
    with pytest.raises(TraceError) as expected:
        traces.validate(path)
    assert needle in str(expected.value)
    with pytest.raises(TraceError) as got:
        unit.replay_trace(path, [load_policy("xen-access-altp2m-write")], {}, None, None)
    assert str(got.value) == str(expected.value)
    # through the CLI: one Error line, exit 2, no output folder left behind
    out = tmp_path / "out"
    result = _cli("replay", path, "-p", "xen-access-altp2m-write", "-o", out, "--jobs", 1)
    assert result.exit_code == 2 and result.stderr.strip() == f"Error: {expected.value}"
    assert not out.exists()


def test_rows_after_a_crash_are_still_checked(tmp_path):
    """Every policy crashes the guest in the first row group; a bad tsc later still fails."""
    path, _ = _grouped_trace(tmp_path / "t.parquet", tsc=(3500, 0))
    crash = tmp_path / "crash.toml"
    crash.write_text(
        'name = "crash"\n[domain]\nmonitor = false\naccess_required = true\n'
        '[[view]]\nname = "ro"\ndefault_access = "r"\n'
        '[[setup]]\nop = "switch_p2m"\nview = "ro"\n',
        encoding="utf-8",
    )
    with pytest.raises(TraceError, match='row 3500, column "tsc"'):
        unit.replay_trace(path, [load_policy(str(crash))], {}, None, None)


def test_statistics_that_disagree_with_the_values_are_not_trusted(tmp_path, monkeypatch):
    """If the metadata's gfn range were wrong, the replay is redone from checked facts."""
    path, data = _grouped_trace(tmp_path / "t.parquet")
    pols = [load_policy(p) for p in POLICIES]
    expected = unit.replay_trace(
        path, pols, {}, None, None, prepared=(*traces.trace_facts(path, False), True)
    )
    real = traces.quick_stats

    def lying(p):
        st = real(p)
        st.max_gfn = int(data["gfn"].max()) - 5  # as if a writer had stored a wrong max
        return st

    made = []
    real_replayer = unit.Replayer
    monkeypatch.setattr(traces.facts, "quick_stats", lying)  # where replay_facts looks it up
    monkeypatch.setattr(
        unit, "Replayer", lambda *a, **k: made.append(a[0].name) or real_replayer(*a, **k)
    )
    got = unit.replay_trace(path, pols, {}, None, None)
    assert made == POLICIES * 2  # the replay was redone once the checks knew the real range
    for g, e in zip(got, expected, strict=True):
        for t in TABLES:
            assert g.tables[t].equals(e.tables[t]), (g.policy, t)


def test_a_null_vcpu_falls_back_to_the_full_pass(tmp_path):
    path, _ = _grouped_trace(tmp_path / "t.parquet")
    table = pq.read_table(path)
    vcpu = table["vcpu"].to_pylist()
    vcpu[3333] = None
    nulls = table.set_column(
        table.schema.get_field_index("vcpu"), "vcpu", pa.array(vcpu, pa.uint16())
    )
    bad = tmp_path / "null.parquet"
    pq.write_table(nulls.replace_schema_metadata(table.schema.metadata), bad, row_group_size=500)
    assert traces.quick_stats(bad) is None
    with pytest.raises(TraceError, match='row 3333, column "vcpu": expected a value'):
        unit.replay_trace(bad, [load_policy("none")], {}, None, None)


def test_vcpu_numbers_with_gaps_report_only_the_vcpus_in_the_trace(tmp_path):
    """Statistics give vCPUs 2..9; replay has slots for all of them but reports 2, 5 and 9."""
    n = 3000
    vcpu = np.array([2, 5, 9], np.uint16)[np.arange(n) // 11 % 3]
    path = traces.write_trace(
        {
            "gfn": np.random.default_rng(5).integers(0x100, 0x300, n).astype(np.uint64),
            "access": np.where(np.arange(n) % 5 == 0, 2, 1).astype(np.uint8),
            "vcpu": vcpu,
            "insn": np.arange(n, dtype=np.uint64),
            "tsc": np.arange(n, dtype=np.uint64),
        },
        tmp_path / "gaps.parquet",
        row_group_size=1000,
    )
    assert list(traces.quick_stats(path).vcpus) == list(range(2, 10))
    run.replay([path], POLICIES, tmp_path / "out", jobs=1, html=False)
    summary = pl.read_parquet(tmp_path / "out" / "summary.parquet")
    assert sorted(set(summary["vcpu"])) == [-1, 2, 5, 9]
    per_vcpu = summary.filter(pl.col("vcpu") >= 0).group_by("vcpu").agg(pl.col("records").first())
    assert dict(per_vcpu.iter_rows()) == {v: int((vcpu == v).sum()) for v in (2, 5, 9)}


def test_gfns_past_2_63_never_index_the_fast_path_cache(monkeypatch):
    """The kernel sees gfns as int64: 2^63 and up are negative there. Traces are checked
    before they reach it, but a file whose statistics lie could slip one past; the cache must
    then be skipped, giving what a run without the cache gives (and no crash)."""
    from altp2m_replay.engine import Replayer, simulate
    from altp2m_replay.selectors import TraceFacts

    gfn = np.array([5, 1 << 63, (1 << 64) - 1, 6, 1 << 63, 5], np.uint64)
    access = np.array([2, 2, 1, 4, 1, 1], np.uint8)
    for name in ("baseline", "xen-access-altp2m-write", "memaccess-write"):
        results = []
        for cache in (simulate.PMAP_BYTES, 0):
            monkeypatch.setattr(simulate, "PMAP_BYTES", cache)
            rep = Replayer(
                load_policy(name),
                TraceFacts(
                    max_gfn=0x1000,
                    meta_ram=[(0, 0xFFF)],
                    page_counts={"written": (np.array([5], np.uint64), np.array([1]))},
                ),
                [0],
                len(gfn),
            )
            assert rep.pmap.shape[1] == (0x1001 if cache else 1)
            rep.feed(gfn, access)
            results.append(rep.finish())
        assert results[0].total == results[1].total, name
        assert np.array_equal(results[0].gfn_values, results[1].gfn_values), name


def test_validate_names_the_file_as_given(tmp_path, monkeypatch):
    _path, _ = _grouped_trace(tmp_path / "t.parquet", access=(7, 0))
    monkeypatch.chdir(tmp_path)
    result = _cli("trace", "validate", "./t.parquet")
    assert result.exit_code == 2
    assert result.stderr.startswith('Error: ./t.parquet: row 7, column "access"'), result.stderr


def test_validate_reads_the_address_column_whatever_its_statistics(tmp_path):
    """gfns index the engine's tables: their range comes from the values, so a file whose
    statistics are wrong cannot smuggle a gfn past the checks. insn and ip too: replay reads
    and checks them, so validate must agree with it whatever the statistics say."""
    path, _ = _grouped_trace(tmp_path / "t.parquet")
    tr = traces.open_trace(path)
    v = traces.Validator(tr)
    with pq.ParquetFile(path) as pf:
        for g in range(tr.row_groups):
            assert v.plan(pf, g) == ["gfn", "access", "vcpu", "insn", "tsc"]
