"""Control rows (op 1-4) and instructions in the trace format (SPEC §2): every check through
``trace validate``, ``trace info`` and ``replay`` (exit 2, one Error line, nothing written),
what op 3/4 rows leave out, symbols/processes metadata, CSV import."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from altp2m_replay import traces, unit
from altp2m_replay.cli import main
from altp2m_replay.errors import TraceError
from altp2m_replay.policy import load_policy
from altp2m_replay.traces import META_KEY, open_trace, validate, write_trace


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def fails_everywhere(tmp_path, path, *needles):
    """validate, info and replay all exit 2 with the same single Error line; replay writes
    nothing. Returns that line."""
    lines = []
    for args in (
        ["trace", "validate", path],
        ["trace", "info", path],
        ["replay", path, "-p", "baseline", "-o", tmp_path / "out", "--jobs", 1],
    ):
        r = cli(*args)
        assert r.exit_code == 2, (args, r.output)
        err = r.stderr.splitlines()
        assert len(err) == 1 and err[0].startswith(f"Error: {path}: "), r.stderr
        assert "Traceback" not in r.output
        lines.append(err[0])
        assert not (tmp_path / "out").exists()
    assert lines[0] == lines[1] == lines[2]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def table(**cols):
    """Columns given as lists; canonical types for the known ones."""
    return {
        c: np.asarray(v, dtype=traces.TRACE_SCHEMA[c].to_pandas_dtype()) for c, v in cols.items()
    }


# --------------------------------------------------------------------------- value checks
def test_unknown_op(tmp_path):
    p = write_trace(table(gfn=[1, 2, 3], access=[4, 0, 0], op=[0, 2, 5]), tmp_path / "t.parquet")
    fails_everywhere(tmp_path, p, 'row 2, column "op"', "expected an op in 0..4", "found 5")


def test_access_must_be_zero_on_a_control_row(tmp_path):
    p = write_trace(table(gfn=[1, 2, 3], access=[4, 0, 1], op=[0, 4, 3]), tmp_path / "t.parquet")
    fails_everywhere(
        tmp_path, p, 'row 2, column "access"', "expected 0 on a control row (op 3)", "found 1"
    )


def test_access_must_not_be_zero_on_an_access_row(tmp_path):
    p = write_trace(table(gfn=[1, 2, 3], access=[4, 0, 0], op=[0, 1, 0]), tmp_path / "t.parquet")
    fails_everywhere(
        tmp_path, p, 'row 2, column "access"', "1..7 on an access row (op 0)", "found 0"
    )


def test_access_above_7_with_an_op_column(tmp_path):
    cols = {
        "gfn": pa.array([1, 2], pa.uint64()),
        "access": pa.array([4, 9], pa.uint8()),
        "op": pa.array([0, 0], pa.uint8()),
    }
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table(cols), p)
    fails_everywhere(tmp_path, p, 'row 1, column "access"', "found 9")


def test_vcpu_bound_holds_on_host_rows_too(tmp_path):
    p = write_trace(
        table(gfn=[1, 2], access=[4, 0], op=[0, 3], vcpu=[0, 4096]), tmp_path / "t.parquet"
    )
    fails_everywhere(tmp_path, p, 'row 1, column "vcpu"', "found 4096")


def test_tsc_rule_skips_host_rows_but_not_vmfunc_or_cr3_rows(tmp_path):
    # op 3/4 rows with tsc 0 between tsc 100 and 110 of vCPU 0: valid
    ok = write_trace(
        table(
            gfn=[1, 2, 3, 4],
            access=[4, 0, 0, 4],
            op=[0, 3, 4, 0],
            vcpu=[0, 0, 0, 0],
            tsc=[100, 0, 0, 110],
        ),
        tmp_path / "ok.parquet",
    )
    assert validate(ok).rows == 4
    # an op 2 row is a row of its vCPU: its tsc 50 after 100 is a decrease
    bad = write_trace(
        table(gfn=[1, 2, 3], access=[4, 0, 4], op=[0, 2, 0], vcpu=[1, 1, 1], tsc=[100, 50, 120]),
        tmp_path / "bad.parquet",
    )
    fails_everywhere(tmp_path, bad, 'row 1, column "tsc"', "vCPU 1 was at 100 in row 0", "found 50")


def long_insn(n, vcpu=None, insn=None, op=None):
    cols = {
        "gfn": np.full(n, 7),
        "access": np.full(n, 1),
        "insn": np.full(n, 3) if insn is None else insn,
    }
    cols["access"][0] = 4
    if vcpu is not None:
        cols["vcpu"] = vcpu
    if op is not None:
        cols["op"] = op
        cols["access"] = np.where(op == 0, cols["access"], 0)
    return table(**cols)


LIMIT_MSG = "instruction has more than 1024 rows (insn ids must change per instruction)"


def test_an_instruction_of_1024_rows_is_fine_1025_is_not(tmp_path):
    assert validate(write_trace(long_insn(1024), tmp_path / "ok.parquet")).rows == 1024
    p = write_trace(long_insn(1025), tmp_path / "t.parquet", row_group_size=100)
    line = fails_everywhere(tmp_path, p, f"{p}: row 1024: {LIMIT_MSG}", "vCPU 0, insn 3")
    assert 'column "' not in line


def test_without_insn_every_row_is_an_instruction(tmp_path):
    cols = long_insn(3000)
    del cols["insn"]
    assert validate(write_trace(cols, tmp_path / "t.parquet")).rows == 3000


def test_cr3_and_vmfunc_rows_count_towards_the_limit(tmp_path):
    # 1,000 access rows, then 25 op 1/2 rows of the same instruction: row 1,024 is the 1,025th
    op = np.r_[np.zeros(1000, int), np.tile([1, 2], 13)[:25]]
    p = write_trace(long_insn(1025, op=op), tmp_path / "t.parquet")
    fails_everywhere(tmp_path, p, f"row 1024: {LIMIT_MSG}")


def test_host_rows_neither_count_nor_end_an_instruction(tmp_path):
    # 1,024 rows of insn 3 with 500 op 3 rows among them: valid
    op = np.zeros(1524, int)
    op[np.arange(1, 1001, 2)] = 3  # 500 host rows at odd rows 1..999: 1,024 rows of op 0 remain
    p = write_trace(long_insn(1524, op=op), tmp_path / "ok.parquet")
    st = validate(p)
    assert st.op_counts.tolist() == [1024, 0, 0, 500, 0]
    # one more access row of insn 3 after another host row: the instruction's 1,025th row
    op2 = np.r_[op, 4, 0]
    p2 = write_trace(long_insn(1526, op=op2), tmp_path / "t.parquet", row_group_size=333)
    fails_everywhere(tmp_path, p2, f"row 1525: {LIMIT_MSG}")


def test_other_vcpus_rows_do_not_end_an_instruction(tmp_path):
    # vCPU 0 runs insn 3 for 1,025 rows, interleaved with vCPU 1 rows (each its own insn)
    n = 2050
    vcpu = np.tile([0, 1], n // 2)
    insn = np.where(vcpu == 0, 3, np.arange(n) + 100)
    p = write_trace(long_insn(n, vcpu=vcpu, insn=insn), tmp_path / "t.parquet", row_group_size=64)
    # vCPU 0's 1,025th row is row 2 * 1024 = 2048
    fails_everywhere(tmp_path, p, f"row 2048: {LIMIT_MSG}", "vCPU 0, insn 3")
    # each vCPU's own run: 1,024 rows of insn 3 on vCPU 0 and on vCPU 1, interleaved: valid
    both = long_insn(2048, vcpu=np.tile([0, 1], 1024), insn=np.full(2048, 3))
    both["access"][1] = 4
    assert validate(write_trace(both, tmp_path / "ok.parquet")).rows == 2048


def test_a_changed_insn_id_starts_a_new_instruction(tmp_path):
    # ids 3 (1,000 rows), 4 (1,000 rows), 3 again (1,000 rows): three instructions
    insn = np.repeat([3, 4, 3], 1000)
    assert validate(write_trace(long_insn(3000, insn=insn), tmp_path / "t.parquet")).rows == 3000


def test_replay_checking_while_it_replays_gives_the_validate_message(tmp_path):
    # No op column and clean statistics: replay checks each batch as it decodes it.
    n = 6000
    insn = np.arange(n)
    insn[4000:5100] = 4000  # 1,100 rows of one instruction: row 5024 is the 1,025th
    cols = table(
        gfn=np.arange(n) % 50 + 0x100,
        access=np.where(insn == np.r_[-1, insn[:-1]], 1, 4),
        insn=insn,
    )
    p = write_trace(cols, tmp_path / "t.parquet", row_group_size=1000)
    assert traces.quick_stats(p) is not None  # the replay does not validate up front
    with pytest.raises(TraceError) as exc:
        unit.replay_trace(p, [load_policy("baseline")], {}, None, None)
    assert str(exc.value) == f"{p}: row 5024: {LIMIT_MSG}: vCPU 0, insn 4000"
    fails_everywhere(tmp_path, p, "row 5024")


# --------------------------------------------------------------------------- replay guard
def test_replay_replays_control_rows(tmp_path):
    p = write_trace(
        table(gfn=[1, 2, 3, 4], access=[4, 1, 0, 4], op=[0, 0, 3, 0]), tmp_path / "t.parquet"
    )
    assert validate(p).control_records == 1
    r = cli("replay", p, "-p", "baseline", "-o", tmp_path / "out", "--jobs", 1, "--no-html")
    assert r.exit_code == 0, r.output
    s = pl.read_parquet(tmp_path / "out" / "summary.parquet")
    total = s.filter(pl.col("vcpu") == -1).row(0, named=True)
    vcpu0 = s.filter(pl.col("vcpu") == 0).row(0, named=True)
    # Default RAM: [0, 0x9f] and [0xc0, 2^18 - 1]; the first 2 MiB are 4 KiB host pages (the
    # VGA hole). No insn column: each row is an instruction, but the drop (op 3) is nobody's.
    # x 1, r 2, x 4: each a fresh 4K lazy copy in view 0 (regions at 0, hole 0) and a restart.
    # drop 3: the host's 4K rwx leaf becomes a hole: one EPT sync, an IPI to the one vCPU;
    # view 0 does not hold 3. Domain counters are in the total row only (SPEC §7).
    assert {
        k: total[k]
        for k in (
            "records",
            "instructions",
            "ept_exits",
            "lazy_copies_4k",
            "restarts",
            "control_records",
            "host_drops",
            "ept_syncs",
            "ept_sync_ipis",
        )
    } == {
        "records": 3,
        "instructions": 3,
        "ept_exits": 3,
        "lazy_copies_4k": 3,
        "restarts": 3,
        "control_records": 1,
        "host_drops": 1,
        "ept_syncs": 1,
        "ept_sync_ipis": 1,
    }
    assert (vcpu0["control_records"], vcpu0["host_drops"], vcpu0["ept_syncs"]) == (0, 0, 0)


def test_control_rows_its_statistics_hide_are_still_replayed(tmp_path, monkeypatch):
    """Statistics that claim op 0 everywhere send replay down the streaming path (values
    checked batch by batch); the control rows are replayed all the same."""
    p = write_trace(
        table(gfn=[1, 2, 3, 4], access=[4, 1, 0, 4], op=[0, 0, 1, 0]), tmp_path / "t.parquet"
    )
    checked_cells = unit.replay_trace(p, [load_policy("baseline")], {}, None, None)
    monkeypatch.setattr(
        traces.checker, "_proven_clean", lambda col, stat: (0, 0) if col == "op" else (1, 4)
    )
    stats, facts, checked = traces.replay_facts(p, False)
    assert not checked
    (cell,) = unit.replay_trace(
        p, [load_policy("baseline")], {}, None, None, prepared=(stats, facts, checked)
    )
    assert cell.tables["summary"].equals(checked_cells[0].tables["summary"])
    total = cell.tables["summary"].filter(pl.col("vcpu") == -1).row(0, named=True)
    # a guest VMFUNC without enable_notify: the CPU exits and Xen injects #UD (SPEC §6.5)
    assert (total["control_records"], total["vmfunc_exits"], total["guest_vmfuncs"]) == (1, 1, 0)


def test_an_op_column_of_zeros_replays(tmp_path):
    p = write_trace(
        table(gfn=[0x100, 0x101, 0x100], access=[4, 2, 4], op=[0, 0, 0], arg=[0, 0, 0]),
        tmp_path / "t.parquet",
    )
    r = cli("replay", p, "-p", "baseline", "-o", tmp_path / "out", "--jobs", 1, "--no-html")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "summary.parquet").exists()


# --------------------------------------------------------------------------- what op 3/4 leave out
def test_stats_leave_control_rows_out_where_the_spec_says(tmp_path):
    cols = table(
        gfn=[0x10, 0x9999, 0x20, 0x500, 0x8888, 0x10, 0x30],
        access=[4, 0, 2, 0, 0, 1, 0],
        op=[0, 2, 0, 3, 1, 0, 4],
        vcpu=[1, 1, 2, 7, 1, 2, 9],
    )
    p = write_trace(cols, tmp_path / "t.parquet")
    st = validate(p, page_counts=True)
    assert st.vcpus.tolist() == [1, 2]  # vCPUs 7 and 9 only have op 3/4 rows
    assert st.max_gfn == 0x500 and st.min_gfn == 0x10  # op 3 counts, op 1/2 do not
    assert st.op_counts.tolist() == [3, 1, 1, 1, 1] and st.control_records == 4
    gfns, counts = st.page_counts["touched"]  # access rows only
    assert gfns.tolist() == [0x10, 0x20] and counts.tolist() == [2, 1]
    assert st.page_counts["written"][0].tolist() == [0x20]
    assert st.access_counts.tolist() == [4, 1, 1, 0, 1, 0, 0, 0]
    text = traces.info_text(p)
    for needle in (
        "vCPUs:",
        "2 (1, 2)",
        "gfn range:",
        "0x10 - 0x500",
        "control records:     4",
        "guest vmfuncs (1):",
        "cr3 writes (2):",
        "host drops (3):",
        "host maps (4):",
        "distinct gfns:       2 ",
    ):
        assert needle in text, (needle, text)
    # access mix percentages are of the 3 access rows: x 1 of 3
    assert any(ln.startswith("  x (4):") and ln.endswith("33.3 %") for ln in text.splitlines()), (
        text
    )


def test_batches_carry_op_and_arg(tmp_path):
    cols = table(
        gfn=[1, 2, 3, 4, 5], access=[4, 0, 0, 0, 1], op=[0, 1, 2, 4, 0], arg=[0, 2, 0x1234000, 0, 0]
    )
    p = write_trace(cols, tmp_path / "t.parquet")
    got = list(open_trace(p).batches(batch_rows=2, columns=("gfn", "op", "arg")))
    assert [b.start for b in got] == [0, 2, 4]
    assert np.concatenate([b.op for b in got]).tolist() == [0, 1, 2, 4, 0]
    assert np.concatenate([b.arg for b in got]).tolist() == [0, 2, 0x1234000, 0, 0]
    assert got[0].op.dtype == np.uint8 and got[0].arg.dtype == np.uint64 and len(got[0]) == 2
    # other integer widths convert; absent columns are None
    q = tmp_path / "w.parquet"
    pq.write_table(
        pa.table(
            {
                "gfn": pa.array([1, 2], pa.uint64()),
                "access": pa.array([4, 0], pa.uint8()),
                "op": pa.array([0, 2], pa.int64()),
                "arg": pa.array([0, 77], pa.int32()),
            }
        ),
        q,
    )
    (b,) = open_trace(q).batches(columns=("gfn", "op", "arg"))
    assert b.op.tolist() == [0, 2] and b.op.dtype == np.uint8 and b.arg.tolist() == [0, 77]
    (b,) = open_trace(tmp_path / "t.parquet").batches(columns=("gfn", "insn", "op"))
    assert b.insn is None and b.arg is None


# --------------------------------------------------------------------------- metadata
def test_symbols_and_processes_roundtrip_and_show_in_info(tmp_path):
    meta = {
        "symbols": {"__x64_sys_read": 0xFFFFFFFF81234560, "vfs_read": 2**64 - 1},
        "processes": {"bash": 0x1A2B000, "init": 0, "sshd": 0x3000, "nginx": 0x4000},
    }
    p = write_trace(table(gfn=[1], access=[4]), tmp_path / "t.parquet", meta=meta)
    m = open_trace(p).meta
    assert m.symbols == meta["symbols"] and m.processes == meta["processes"]
    stored = json.loads(pq.ParquetFile(p).metadata.metadata[META_KEY.encode()])
    assert stored["symbols"]["vfs_read"] == 2**64 - 1
    text = traces.info_text(p)
    assert "symbols:" in text and "2 names" in text and "processes:" in text and "4 names" in text
    plain = write_trace(table(gfn=[1], access=[4]), tmp_path / "plain.parquet")
    assert open_trace(plain).meta.symbols == {} and open_trace(plain).meta.processes == {}


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (
            '{"symbols": [1, 2]}',
            '"symbols" must be an object of NAME: a virtual address, found [1, 2]',
        ),
        (
            '{"symbols": {"f": -1}}',
            '"symbols.f" must be a virtual address, an integer in 0..2^64-1, found -1',
        ),
        ('{"symbols": {"f": 18446744073709551616}}', '"symbols.f" must be a virtual address'),
        ('{"symbols": {"f": "0x10"}}', 'found "0x10"'),
        (
            '{"processes": {"bash": true}}',
            '"processes.bash" must be a CR3 value, an integer in 0..2^64-1, found true',
        ),
        ('{"processes": {"bash": 1.5}}', '"processes.bash"'),
        (
            '{"processes": "bash"}',
            '"processes" must be an object of NAME: a CR3 value, found "bash"',
        ),
    ],
)
def test_bad_symbols_or_processes_name_the_key(tmp_path, raw, needle):
    p = tmp_path / "m.parquet"
    t = pa.table({"gfn": pa.array([1], pa.uint64()), "access": pa.array([4], pa.uint8())})
    pq.write_table(t.replace_schema_metadata({META_KEY: raw}), p)
    for cmd in ("validate", "info"):
        r = cli("trace", cmd, p)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1
        assert (
            r.stderr.startswith(f'Error: {p}: metadata key "{META_KEY}": ') and needle in r.stderr
        ), r.stderr


def test_trace_writer_refuses_bad_symbols(tmp_path):
    p = tmp_path / "t.parquet"
    with pytest.raises(TraceError, match=r'"symbols\.f" must be a virtual address'):
        write_trace(table(gfn=[1], access=[4]), p, meta={"symbols": {"f": -5}})
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- CSV import
def test_csv_import_of_control_rows(tmp_path):
    src = tmp_path / "c.csv"
    src.write_text(
        "gfn,access,vcpu,insn,op,arg\n"
        "0x10,x,0,1,0,0\n"
        "0x9999,0,0,1,2,0x1a2b000\n"
        "0x77,0,3,0,3,0\n"
        "0x11,rw,1,2,0,0\n"
        "0x12,0,1,3,1,2\n"
        "0x77,0,0,0,4,0\n"
    )
    out = tmp_path / "c.parquet"
    r = cli("trace", "import", "csv", src, "-o", out)
    assert r.exit_code == 0, r.output
    (b,) = open_trace(out).batches(columns=("gfn", "access", "vcpu", "op", "arg"))
    assert b.op.tolist() == [0, 2, 3, 0, 1, 4]
    assert b.arg.tolist() == [0, 0x1A2B000, 0, 0, 2, 0]
    assert b.access.tolist() == [4, 0, 0, 3, 0, 0]
    st = validate(out)
    assert st.vcpus.tolist() == [0, 1] and st.control_records == 4
    # ram: up to the highest gfn of access and op 3/4 rows (0x77), not op 2's 0x9999
    assert open_trace(out).meta.ram == [(0, 0x77)]


@pytest.mark.parametrize(
    ("body", "lineno", "needle"),
    [
        (
            "gfn,access,op\n1,x,0\n2,r,2\n",
            3,
            "column \"access\": expected 0 on a control row (op 2), found 'r'",
        ),
        (
            "gfn,access,op\n1,x,0\n2,0,0\n",
            3,
            (
                'column "access": expected 1..7 or letters r, w, x on an access row '
                "(op 0), found '0'"
            ),
        ),
        ("gfn,access,op\n1,x,0\n2,0,5\n", 3, 'column "op": expected an op in 0..4'),
        (
            "gfn,access\n1,x\n2,0\n",
            3,
            "column \"access\": expected 1..7 or letters r, w, x (e.g. rw), found '0'",
        ),
    ],
)
def test_csv_import_control_row_errors(tmp_path, body, lineno, needle):
    src = tmp_path / "bad.csv"
    src.write_text(body)
    out = tmp_path / "bad.parquet"
    r = cli("trace", "import", "csv", src, "-o", out)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"Error: {src}: line {lineno}: ") and needle in r.stderr, r.stderr
    assert not out.exists()


def test_batches_carry_full_gpas_for_byte_addresses(tmp_path):
    gpa = [0x100123, 0x200FFF, 0x1000]
    p = write_trace(table(gpa=gpa, access=[4, 1, 4]), tmp_path / "t.parquet")
    got = list(open_trace(p).batches(batch_rows=2, columns=("gfn", "gpa")))
    assert np.concatenate([b.gpa for b in got]).tolist() == gpa
    assert np.concatenate([b.gfn for b in got]).tolist() == [0x100, 0x200, 0x1]
    assert got[0].gpa.dtype == np.uint64
