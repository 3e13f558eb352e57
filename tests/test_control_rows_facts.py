"""What breakpoint selectors and CR3 rules learn from a trace (TraceFacts): instruction starts
by byte address, each ip's first byte address, byte_addresses, symbols and processes — on
small hand-built traces, whatever the batch and row-group boundaries."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from altp2m_replay import traces
from altp2m_replay.selectors import facts_from_arrays
from altp2m_replay.traces import open_trace, validate, write_trace

U = np.uint64

# Two vCPUs interleaved; instructions by (vCPU, insn), byte address = (gfn << 12) | (ip & 0xfff)
# when the first row is a fetch:
#   v0 insn 10: rows 0, 2, 4, 5 (row 1 is v1's, row 3 a host drop: neither ends it; rows 2
#               and 4 fetch too, as an instruction that crosses a page does, but do not
#               start an instruction) fetch gfn 0x100 ip ...0123 -> 0x100123
#   v1 insn 20: row 1, fetch gfn 0x200 ip ...0456 -> 0x200456
#   v1 insn 21: row 6, a read: no byte address
#   v0 insn 11: row 7, fetch gfn 0x100 ip ...0123 -> 0x100123 (second start there)
#   v1 insn 22: row 8, a VMFUNC row alone: no byte address
#   v1 insn 23: row 9, fetch gfn 0x600 ip ...0456 -> 0x600456 (ip ...0456 was first at 0x200456)
#   v0 insn 12: row 10, access 5 (r + x: a fetch) gfn 0x201 ip ...1000 -> 0x201000
ROWS = [  # vcpu, insn, op, access, gfn, ip, tsc
    (0, 10, 0, 4, 0x100, 0xFFFF0123, 100),
    (1, 20, 0, 4, 0x200, 0xFFFF0456, 50),
    (0, 10, 0, 4, 0x300, 0xFFFF0123, 110),
    (0, 0, 3, 0, 0x700, 0, 0),  # vCPU 0 here too: ignored on op 3 rows
    (0, 10, 0, 4, 0x301, 0xFFFF0123, 115),
    (0, 10, 2, 0, 0x9999, 0xFFFF0123, 120),
    (1, 21, 0, 1, 0x500, 0xFFFF0777, 60),
    (0, 11, 0, 4, 0x100, 0xFFFF0123, 130),
    (1, 22, 1, 0, 0x8888, 0xFFFF0999, 70),
    (1, 23, 0, 4, 0x600, 0xFFFF0456, 80),
    (0, 12, 0, 5, 0x201, 0xFFFF1000, 140),
]
STARTS = ([0x100123, 0x200456, 0x201000, 0x600456], [2, 1, 1, 1])
IP_FIRST = ([0xFFFF0123, 0xFFFF0456, 0xFFFF1000], [0x100123, 0x200456, 0x201000])


def columns(rows=ROWS):
    v, i, o, a, g, ip, t = (np.array(c, dtype=np.uint64) for c in zip(*rows, strict=True))
    return {
        "gfn": g,
        "access": a.astype(np.uint8),
        "vcpu": v.astype(np.uint16),
        "insn": i,
        "ip": ip,
        "tsc": t,
        "op": o.astype(np.uint8),
        "arg": np.zeros(len(rows), np.uint64),
    }


def check(stats, starts, ip_first):
    got_a, got_n = stats.insn_starts
    assert got_a.dtype == np.uint64 and got_n.dtype == np.int64
    assert got_a.tolist() == starts[0] and got_n.tolist() == starts[1]
    got_ip, got_at = stats.ip_first
    assert got_ip.dtype == np.uint64 and got_at.dtype == np.uint64
    assert got_ip.tolist() == ip_first[0] and got_at.tolist() == ip_first[1]


@pytest.mark.parametrize("row_group_size", [1, 2, 3, 4, 10])
def test_gfn_and_ip_whatever_the_row_groups(tmp_path, row_group_size):
    p = write_trace(columns(), tmp_path / "t.parquet", row_group_size=row_group_size)
    st = validate(p, insn_stats=True)
    check(st, STARTS, IP_FIRST)
    assert st.vcpus.tolist() == [0, 1] and st.max_gfn == 0x700


@pytest.mark.parametrize("batch_rows", [1, 2, 3, 7])
def test_while_streaming_batches(tmp_path, batch_rows):
    p = write_trace(columns(), tmp_path / "t.parquet")
    tr = open_trace(p)
    v = traces.Validator(tr, insn_stats=True)
    n = sum(len(b) for b in tr.batches(batch_rows=batch_rows, columns=("gfn",), validator=v))
    assert n == len(ROWS)
    check(v.result(), STARTS, IP_FIRST)


def test_without_the_flag_nothing_is_gathered(tmp_path):
    p = write_trace(columns(), tmp_path / "t.parquet")
    st = validate(p)
    assert st.insn_starts is None and st.ip_first is None


def test_gpa_is_the_byte_address(tmp_path):
    cols = columns()
    # the gpa's page offset differs from the ip's: gpa wins
    cols["gpa"] = (cols.pop("gfn") << U(12)) | U(0xAB)
    p = write_trace(cols, tmp_path / "t.parquet", row_group_size=3)
    st = validate(p, insn_stats=True)
    check(
        st,
        ([0x1000AB, 0x2000AB, 0x2010AB, 0x6000AB], [2, 1, 1, 1]),
        ([0xFFFF0123, 0xFFFF0456, 0xFFFF1000], [0x1000AB, 0x2000AB, 0x2010AB]),
    )
    # gpa without ip: starts, and no ip table
    del cols["ip"]
    p = write_trace(cols, tmp_path / "noip.parquet")
    st = validate(p, insn_stats=True)
    assert st.insn_starts[0].tolist() == [0x1000AB, 0x2000AB, 0x2010AB, 0x6000AB]
    assert len(st.ip_first[0]) == 0 and len(st.ip_first[1]) == 0
    assert open_trace(p).byte_addresses


def test_gfn_without_ip_has_no_byte_addresses(tmp_path):
    cols = columns()
    del cols["ip"]
    p = write_trace(cols, tmp_path / "t.parquet")
    assert not open_trace(p).byte_addresses
    st = validate(p, insn_stats=True)
    assert len(st.insn_starts[0]) == 0 and len(st.ip_first[0]) == 0
    _, facts = traces.trace_facts(p, False, insn_stats=True)
    assert facts.byte_addresses is False


def test_without_insn_each_row_is_an_instruction(tmp_path):
    # two fetches at one address and a read: with one insn id, one instruction starts there;
    # without the column, two do
    cols = {
        "gfn": np.array([1, 1, 2], np.uint64),
        "access": np.array([4, 4, 1], np.uint8),
        "ip": np.array([0x10, 0x10, 0x10], np.uint64),
        "insn": np.array([5, 5, 5], np.uint64),
    }
    st = validate(write_trace(cols, tmp_path / "a.parquet"), insn_stats=True)
    assert st.insn_starts[0].tolist() == [0x1010] and st.insn_starts[1].tolist() == [1]
    del cols["insn"]
    st = validate(write_trace(cols, tmp_path / "b.parquet"), insn_stats=True)
    assert st.insn_starts[0].tolist() == [0x1010] and st.insn_starts[1].tolist() == [2]


def test_a_returning_insn_id_starts_a_new_instruction_and_ip_first_keeps_the_earliest(tmp_path):
    # vCPU 0: insn 1 at gfn 5, insn 2 at gfn 6, insn 1 again at gfn 7, all with ip 0x3210:
    # three starts; the ip's first instruction is the one at gfn 5 (0x5210), in a batch of
    # its own before the others
    cols = {
        "gfn": np.array([5, 6, 7], np.uint64),
        "access": np.array([4, 4, 4], np.uint8),
        "ip": np.full(3, 0x3210, np.uint64),
        "insn": np.array([1, 2, 1], np.uint64),
    }
    p = write_trace(cols, tmp_path / "t.parquet", row_group_size=1)
    st = validate(p, insn_stats=True)
    assert st.insn_starts[0].tolist() == [0x5210, 0x6210, 0x7210] and st.insn_starts[
        1
    ].tolist() == [1, 1, 1]
    assert st.ip_first[0].tolist() == [0x3210] and st.ip_first[1].tolist() == [0x5210]


def test_instructions_straddle_many_batches_on_interleaved_vcpus(tmp_path):
    # 4 vCPUs in turn, each instruction 5 rows (fetch + 4 reads) spread over 20 trace rows;
    # instruction k of vCPU v fetches from gfn 0x1000 + k at offset 0x40 * v
    vcpus, per = 4, 30
    n = vcpus * per * 5
    r = np.arange(n)
    v = r % vcpus
    k = r // (vcpus * 5)  # instruction number of the row's vCPU
    first = (r // vcpus) % 5 == 0
    cols = {
        "gfn": (0x1000 + k).astype(np.uint64),
        "access": np.where(first, 4, 1).astype(np.uint8),
        "vcpu": v.astype(np.uint16),
        "insn": k.astype(np.uint64),
        "ip": (0xFFFF0000 + 0x40 * v + (k % 3) * 0x1000).astype(np.uint64),
    }
    p = write_trace(cols, tmp_path / "t.parquet", row_group_size=7)
    tr = open_trace(p)
    v_ = traces.Validator(tr, insn_stats=True)
    for _ in tr.batches(batch_rows=3, columns=("gfn",), validator=v_):
        pass
    st = v_.result()
    # every instruction starts once: 4 * 30 distinct byte addresses
    expect = sorted(((0x1000 + kk) << 12) | (0x40 * vv) for kk in range(per) for vv in range(vcpus))
    assert st.insn_starts[0].tolist() == expect and st.insn_starts[1].tolist() == [1] * len(expect)
    # ip 0xFFFF0000 + 0x40 v + 0x1000 j is first executed by instruction k = j on vCPU v
    ips = sorted(
        (0xFFFF0000 + 0x40 * vv + 0x1000 * j, vv, j) for vv in range(vcpus) for j in range(3)
    )
    assert st.ip_first[0].tolist() == [ip for ip, _, _ in ips]
    assert st.ip_first[1].tolist() == [((0x1000 + j) << 12) | (0x40 * vv) for _, vv, j in ips]


def test_run_facts_carry_metadata_and_stats(tmp_path):
    meta = {
        "symbols": {"__x64_sys_read": 0xFFFF0123, "vfs_read": 0xFFFF1000},
        "processes": {"bash": 0x1A2B000},
    }
    p = write_trace(columns(), tmp_path / "t.parquet", meta=meta, row_group_size=4)
    stats, facts = traces.trace_facts(p, False, insn_stats=True)
    assert facts.symbols == meta["symbols"] and facts.processes == meta["processes"]
    assert facts.byte_addresses is True and facts.max_gfn == 0x700
    assert facts.insn_starts[0].tolist() == STARTS[0] and facts.ip_first[1].tolist() == IP_FIRST[1]
    # without the flag: no stats, metadata still there
    _, facts = traces.trace_facts(p, False)
    assert facts.insn_starts is None and facts.ip_first is None and facts.symbols == meta["symbols"]
    # replay_facts with insn_stats takes the full pass (values checked), control rows and all
    stats, facts, checked = traces.replay_facts(p, False, insn_stats=True)
    assert checked and stats.control_records > 0
    assert facts.insn_starts[0].tolist() == STARTS[0]


def test_replay_facts_with_insn_stats_on_a_trace_without_control_rows(tmp_path):
    rows = [r for r in ROWS if r[2] == 0]  # the access rows: starts and ip_first are the same
    cols = columns(rows)
    del cols["op"], cols["arg"]
    p = write_trace(cols, tmp_path / "t.parquet", meta={"processes": {"init": 0x1000}})
    _stats, facts, checked = traces.replay_facts(p, False, insn_stats=True)
    assert checked and facts.processes == {"init": 0x1000}
    assert facts.insn_starts[0].tolist() == STARTS[0] and facts.insn_starts[1].tolist() == STARTS[1]
    assert facts.ip_first[0].tolist() == IP_FIRST[0] and facts.ip_first[1].tolist() == IP_FIRST[1]
    # the quick path (no flag) leaves them out
    _, facts, checked = traces.replay_facts(p, False)
    assert not checked and facts.insn_starts is None and facts.byte_addresses


# --------------------------------------------------------------------------- against the row walk
@st.composite
def control_traces(draw):
    """Random small traces with control rows, few vCPUs and insn ids that repeat, so that
    instructions run across other vCPUs' rows, host rows and batch ends."""
    n = draw(st.integers(1, 80))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    op = rng.choice(np.array([0, 0, 0, 0, 1, 2, 3, 4], np.uint8), n)
    access = np.where(op == 0, rng.choice(np.array([1, 2, 3, 4, 4, 5, 7], np.uint8), n), 0).astype(
        np.uint8
    )
    cols = {"access": access, "op": op, "vcpu": rng.integers(0, 3, n).astype(np.uint16)}
    if draw(st.booleans()):
        cols["gpa"] = rng.integers(0, 1 << 20, n).astype(np.uint64)
    else:
        cols["gfn"] = rng.integers(0, 64, n).astype(np.uint64)
    if draw(st.booleans()):
        cols["ip"] = rng.integers(0, 8, n).astype(np.uint64) * np.uint64(0x404)
    if draw(st.booleans()):
        cols["insn"] = rng.integers(0, 3, n).astype(np.uint64)
    return cols


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cols=control_traces(), batch_rows=st.integers(1, 9))
def test_streaming_stats_match_policy_row_walk(tmp_path, cols, batch_rows):
    """The streaming pass and selectors.facts_from_arrays (one row at a time, in Python) agree."""
    p = write_trace(cols, tmp_path / "h.parquet", row_group_size=5)
    tr = open_trace(p)
    v = traces.Validator(tr, insn_stats=True)
    for _ in tr.batches(batch_rows=batch_rows, columns=("gfn",), validator=v):
        pass
    st_ = v.result()
    arrays = dict(cols)
    if "gpa" in arrays:
        arrays["gfn"] = arrays["gpa"] >> np.uint64(12)
    ref = facts_from_arrays(arrays, insn_stats=True)
    assert tr.byte_addresses == ref.byte_addresses
    assert st_.max_gfn == ref.max_gfn
    if ref.byte_addresses:
        for mine, theirs in ((st_.insn_starts, ref.insn_starts), (st_.ip_first, ref.ip_first)):
            assert mine[0].tolist() == theirs[0].tolist() and mine[1].tolist() == theirs[1].tolist()
    else:
        assert len(st_.insn_starts[0]) == 0 and len(st_.ip_first[0]) == 0
