"""Trace counts against numpy on the whole trace: page counts (``validate(page_counts=True)``:
what ``set = "executed"`` and the other page-count selectors read) and instruction starts
(``insn_stats=True``: what breakpoints by address and symbol read)."""

import numpy as np
import pytest
from test_traces import brute_stats

from altp2m_replay.traces import validate, write_trace


@pytest.mark.parametrize(
    ("rows", "pages", "batch"),
    [
        (1, 1, 1),  # one row
        (5_000, 3, 1_000),  # few pages, many rows each
        (60_000, 40_000, 25_000),  # more distinct pages per batch than the first table holds
        (30_000, 1 << 36, 30_000),  # pages spread over the whole gfn range
    ],
)
def test_page_counts_match_numpy(tmp_path, rows, pages, batch):
    rng = np.random.default_rng(rows)
    gfn = rng.integers(0, pages, rows, dtype=np.uint64)
    access = rng.integers(1, 8, rows, dtype=np.uint8)
    op = np.where(rng.random(rows) < 0.05, 3, 0).astype(np.uint8)  # some host-drop rows
    access[op != 0] = 0
    vcpu = np.zeros(rows, np.uint16)
    insn = np.arange(rows, dtype=np.uint64)
    arg = np.zeros(rows, np.uint64)
    path = tmp_path / "t.parquet"
    write_trace(
        {"gfn": gfn, "access": access, "vcpu": vcpu, "insn": insn, "op": op, "arg": arg},
        path,
        row_group_size=batch,
    )
    st = validate(path, page_counts=True)
    want = brute_stats(gfn[op == 0], access[op == 0], None)  # control rows touch no page
    for key in ("touched", "read", "written", "executed"):
        got_keys, got_counts = st.page_counts[key]
        np.testing.assert_array_equal(got_keys, want[key][0], err_msg=key)
        np.testing.assert_array_equal(got_counts, want[key][1], err_msg=key)
    assert st.distinct_gfns == len(want["touched"][0])


@pytest.mark.parametrize("start", [2, 1 << 11])
def test_instruction_starts_and_first_address_per_ip_match_numpy(tmp_path, monkeypatch, start):
    """Every row a fetch and its own instruction (no insn column): each row starts an
    instruction at its byte address; ip_first keeps the address of each ip's first row."""
    from altp2m_replay.traces import checker

    monkeypatch.setattr(checker, "_TALLY_START", start)  # 2: the tables grow many times
    rng = np.random.default_rng(5)
    n = 20_000
    gpa = (rng.integers(0, 3_000, n, dtype=np.uint64) << np.uint64(12)) | rng.integers(
        0, 4, n, dtype=np.uint64
    )
    ip = rng.integers(0, 5_000, n, dtype=np.uint64) + np.uint64(0xFFFF_8000_0000_0000)
    path = tmp_path / "f.parquet"
    write_trace(
        {"gpa": gpa, "access": np.full(n, 4, np.uint8), "ip": ip}, path, row_group_size=3_000
    )
    st = validate(path, insn_stats=True)
    addrs, counts = np.unique(gpa, return_counts=True)
    np.testing.assert_array_equal(st.insn_starts[0], addrs)
    np.testing.assert_array_equal(st.insn_starts[1], counts)
    ips, first = np.unique(ip, return_index=True)
    np.testing.assert_array_equal(st.ip_first[0], ips)
    np.testing.assert_array_equal(st.ip_first[1], gpa[first])
