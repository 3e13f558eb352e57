"""generate.py's sandbox workload: control rows (CR3 writes, guest VMFUNCs, host drops and
maps), symbols and processes metadata, determinism; existing workloads have no op column."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from altp2m_replay import generate as gen
from altp2m_replay.cli import main
from altp2m_replay.traces import open_trace, validate

N = 200_000


@pytest.fixture(scope="module")
def sandbox():
    return gen.generate_arrays("sandbox", N, seed=1, vcpus=3)


def instructions(t):
    """Row index of each instruction's first row, over rows of op 0-2 (op 3/4 rows belong to
    none): per vCPU, a row starts one when its insn differs from that vCPU's previous row."""
    rows = np.flatnonzero(t["op"] < 3)
    firsts = []
    for v in np.unique(t["vcpu"][rows]):
        mine = rows[t["vcpu"][rows] == v]
        ids = t["insn"][mine]
        firsts.append(mine[np.r_[True, ids[1:] != ids[:-1]]])
    return np.sort(np.concatenate(firsts))


def test_columns_and_metadata(tmp_path):
    p = tmp_path / "s.parquet"
    gen.generate("sandbox", 20_000, seed=2, vcpus=2, output=p, row_group_size=4096)
    tr = open_trace(p)
    assert tr.columns == {"gfn", "access", "vcpu", "insn", "ip", "tsc", "op", "arg"}
    assert len(tr.meta.symbols) == 40 and len(tr.meta.processes) == 6
    assert "__x64_sys_read" in tr.meta.symbols and "entry_SYSCALL_64" in tr.meta.symbols
    assert tr.meta.gfn_sets["balloon"] == [gen.BALLOON]
    st = validate(p)
    # 20,000 // 400 = 50 balloon pages: 50 drops, 50 maps
    assert st.op_counts[3] == 50 and st.op_counts[4] == 50
    assert st.op_counts[1] > 0 and st.op_counts[2] > 0
    assert list(st.vcpus) == [0, 1]


def test_every_instruction_starts_with_a_fetch_and_control_rows_follow_their_site(sandbox):
    t = sandbox
    firsts = instructions(t)
    assert np.all(t["access"][firsts] == 4) and np.all(t["op"][firsts] == 0)
    sym = gen._symbols()
    sites = {2: sym["switch_mm_irqs_off"] + 0x5C, 1: sym["agent_switch_view"] + 0x10}
    kept = np.flatnonzero(t["op"] < 3)  # a drop or map row may sit inside an instruction
    for op, site in sites.items():
        at = np.flatnonzero(t["op"][kept] == op)
        rows, before = kept[at], kept[at - 1]
        assert len(rows) > 50
        assert np.all(t["access"][rows] == 0)
        # the row before (op 3/4 rows aside) is the fetch of the same instruction, at the site
        assert np.all(t["access"][before] == 4) and np.all(t["op"][before] == 0)
        assert np.all(t["insn"][before] == t["insn"][rows]) and np.all(
            t["vcpu"][before] == t["vcpu"][rows]
        )
        assert np.all(t["ip"][before] == site) and np.all(t["ip"][rows] == site)
    assert np.all(t["access"][t["op"] == 0] > 0)


def test_cr3_writes_on_every_vcpu_name_processes_and_vmfuncs_name_views(sandbox):
    t = sandbox
    cr3 = t["op"] == 2
    assert set(np.unique(t["vcpu"][cr3]).tolist()) == {0, 1, 2}
    procs = set(gen._processes().values())
    assert set(np.unique(t["arg"][cr3]).tolist()) == procs  # each of the six shows up
    vmf = t["op"] == 1
    assert set(np.unique(t["arg"][vmf]).tolist()) == {0, 1, 2}
    assert np.all(t["arg"][~(cr3 | vmf)] == 0)


def test_balloon_pages_dropped_once_mapped_later_and_untouched_between(sandbox):
    t = sandbox
    pages = min(gen.BALLOON[1] - gen.BALLOON[0] + 1, N // 400)  # 500
    drops, maps = np.flatnonzero(t["op"] == 3), np.flatnonzero(t["op"] == 4)
    assert len(drops) == len(maps) == pages
    expect = np.arange(gen.BALLOON[0], gen.BALLOON[0] + pages)
    np.testing.assert_array_equal(t["gfn"][drops], expect)
    np.testing.assert_array_equal(t["gfn"][maps], expect)
    assert drops.min() >= 0.3 * N and drops.max() < 0.4 * N
    assert maps.min() >= 0.65 * N and maps.max() < 0.75 * N
    for col in ("vcpu", "insn", "ip", "tsc", "access"):
        assert np.all(t[col][drops] == 0) and np.all(t[col][maps] == 0)
    in_balloon = (t["gfn"] >= gen.BALLOON[0]) & (t["gfn"] <= gen.BALLOON[1]) & (t["op"] == 0)
    touched = np.flatnonzero(in_balloon)
    assert np.any(touched < drops[0]) and np.any(touched > maps[-1]), (
        "used as page cache before and after"
    )
    assert not np.any((touched > drops[0]) & (touched < maps[-1]))


def test_symbols_are_executed_at_consistent_byte_addresses(sandbox):
    t = sandbox
    fetch = t["access"] == 4
    ips = set(t["ip"][fetch].tolist())
    sym = gen._symbols()
    assert all(ip in ips for ip in sym.values())
    assert all(ip % 16 == 0 for ip in sym.values()) and len(set(sym.values())) == len(sym)
    # kernel text is mapped linearly: a fetch's gfn is the page of its ip
    k = np.uint64(gen.KTEXT_VA)
    page = (t["ip"][fetch] - k) >> np.uint64(12)
    np.testing.assert_array_equal(t["gfn"][fetch], np.uint64(gen.KERNEL_CODE[0]) + page)
    # syscall entries are called: some instruction starts at __x64_sys_read's ip
    firsts = instructions(t)
    assert np.count_nonzero(t["ip"][firsts] == sym["__x64_sys_read"]) > 5


def test_tsc_and_insn_ids_per_vcpu(sandbox):
    t = sandbox
    for v in range(3):
        mine = (t["vcpu"] == v) & (t["op"] < 3)
        assert np.all(np.diff(t["tsc"][mine].astype(np.int64)) >= 0)
        assert np.all(np.diff(t["insn"][mine].astype(np.int64)) >= 0)


def test_same_seed_same_bytes_and_small_chunks_keep_the_schedule(tmp_path, monkeypatch):
    a, b, c = (tmp_path / f"{x}.parquet" for x in "abc")
    gen.generate("sandbox", 30_000, seed=7, vcpus=2, output=a)
    gen.generate("sandbox", 30_000, seed=7, vcpus=2, output=b)
    gen.generate("sandbox", 30_000, seed=8, vcpus=2, output=c)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    # 1,000-row chunks: drop and map rows land across many chunk boundaries
    monkeypatch.setattr(gen, "CHUNK_ROWS", 1000)
    t = gen.generate_arrays("sandbox", 20_500, seed=2, vcpus=4)
    assert len(t["op"]) == 20_500
    pages = 20_500 // 400  # 51
    drops, maps = np.flatnonzero(t["op"] == 3), np.flatnonzero(t["op"] == 4)
    # row of drop k: 0.3 n + k * (n // 10) // pages (floor division, as the schedule says)
    np.testing.assert_array_equal(drops, 6150 + np.arange(pages) * 2050 // pages)
    np.testing.assert_array_equal(maps, 13325 + np.arange(pages) * 2050 // pages)
    firsts = instructions(t)
    assert np.all(t["access"][firsts] == 4)


@pytest.mark.parametrize("n", [1, 399, 400])
def test_short_traces(tmp_path, n):
    p = tmp_path / "s.parquet"
    gen.generate("sandbox", n, seed=0, output=p)
    st = validate(p)
    assert st.rows == n
    # n // 400 balloon pages: none below 400 rows, one at 400 (dropped at row 120, mapped at 260)
    assert st.op_counts[3] == st.op_counts[4] == n // 400


def test_older_workloads_have_no_control_rows():
    for w in ("kernel", "scan", "random", "jit"):
        t = gen.generate_arrays(w, 5000, seed=1, vcpus=2)
        assert "op" not in t and "arg" not in t
        assert "symbols" not in gen.metadata(w, 1, 2) and "processes" not in gen.metadata(w, 1, 2)


def test_cli_generate_and_info(tmp_path):
    p = tmp_path / "s.parquet"
    r = CliRunner().invoke(
        main, ["trace", "generate", "sandbox", "-n", "8000", "--vcpus", "2", "-o", str(p)]
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["trace", "info", str(p)])
    assert r.exit_code == 0, r.output
    for needle in (
        "control records:",
        "cr3 writes (2):",
        "guest vmfuncs (1):",
        "symbols:",
        "40 names",
        "processes:",
        "6 names",
    ):
        assert needle in r.output, (needle, r.output)
    # 8,000 // 400 = 20 balloon pages
    assert [
        ln.split()[-1]
        for ln in r.output.splitlines()
        if ln.strip().startswith(("host drops", "host maps"))
    ] == ["20", "20"]
