"""generate.py: seeded workloads, determinism, instruction/vCPU structure, CLI."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from altp2m_replay import generate as gen
from altp2m_replay.cli import main, trace_generate
from altp2m_replay.errors import TraceError
from altp2m_replay.traces import info_text, open_trace, validate


def read_all(path):
    cols = ("gfn", "access", "vcpu", "insn", "tsc", "ip")
    parts = list(open_trace(path).batches(columns=cols))
    return {c: np.concatenate([getattr(b, c) for b in parts]) for c in cols}


def check_structure(t, vcpus):
    """Instructions: a fetch row then 0-2 data rows with the same (vcpu, insn); per-vCPU
    insn ids count up by one per instruction; tsc non-decreasing per vCPU."""
    n = len(t["gfn"])
    new = np.r_[True, (t["vcpu"][1:] != t["vcpu"][:-1]) | (t["insn"][1:] != t["insn"][:-1])]
    assert np.all(t["access"][new] == 4), "every instruction starts with a fetch"
    assert np.all(np.isin(t["access"][~new], [1, 2, 3])), "then data rows only"
    starts = np.flatnonzero(new)
    sizes = np.diff(np.r_[starts, n])
    assert sizes.max() <= 3
    for v in range(vcpus):
        mine = t["vcpu"] == v
        assert mine.any(), f"vCPU {v} never runs"
        ids = t["insn"][new & mine]
        np.testing.assert_array_equal(ids, np.arange(len(ids)))
        assert np.all(np.diff(t["tsc"][mine].astype(np.int64)) >= 0)
        # ip is constant within an instruction
    ip_start = t["ip"][starts]
    np.testing.assert_array_equal(np.repeat(ip_start, sizes), t["ip"])


# sandbox has control rows and its own tests (test_control_rows_generate.py)
@pytest.mark.parametrize("workload", sorted(set(gen.WORKLOADS) - {"sandbox"}))
@pytest.mark.parametrize("vcpus", [1, 3])
def test_every_workload_roundtrip(tmp_path, workload, vcpus):
    p = tmp_path / f"{workload}.parquet"
    n = 30_000
    out = gen.generate(workload, n, seed=5, vcpus=vcpus, output=p, row_group_size=8192)
    assert out == p
    st = validate(p, page_counts=True)
    tr = open_trace(p)
    assert st.rows == n and tr.row_groups == 4
    assert tr.columns == frozenset({"gfn", "access", "vcpu", "insn", "ip", "tsc"})
    assert list(st.vcpus) == list(range(vcpus))
    assert tr.meta.source == f"generate {workload} seed=5" and tr.meta.vcpus == vcpus
    (ram,) = tr.meta.ram
    assert ram == (0, 0xFFFFF) and st.max_gfn <= ram[1]
    for ranges in tr.meta.gfn_sets.values():
        assert all(ram[0] <= a <= b <= ram[1] for a, b in ranges)
    assert {"page_tables", "kernel_code"} <= set(tr.meta.gfn_sets)
    t = read_all(p)
    check_structure(t, vcpus)
    # Superpage logic needs several 2 MiB regions and (for most workloads) a 1 GiB boundary.
    assert len(np.unique(t["gfn"] >> np.uint64(9))) >= 4
    if workload != "random":
        lo = t["gfn"][(t["gfn"] >= 0x3FE00) & (t["gfn"] < 0x40000)]
        hi = t["gfn"][(t["gfn"] >= 0x40000) & (t["gfn"] < 0x40200)]
        assert len(lo) and len(hi), "no accesses on both sides of the 1 GiB boundary"
    text = info_text(p)
    assert "30,000" in text and f"generate {workload} seed=5" in text


def test_kernel_mix_is_realistic(tmp_path):
    t = gen.generate_arrays("kernel", 200_000, seed=1, vcpus=2)
    acc = np.bincount(t["access"], minlength=8)
    assert acc[4] > acc[1] > acc[2] > acc[3] > 0 and acc[5:].sum() == 0
    x = t["gfn"][t["access"] == 4]
    assert np.all((x >= gen.KERNEL_CODE[0]) & (x <= gen.KERNEL_CODE[1]))
    # Zipf-like: the 20 hottest code pages take a large share of fetches.
    _, counts = np.unique(x, return_counts=True)
    assert np.sort(counts)[::-1][:20].sum() > 0.3 * len(x)
    pt = np.zeros(len(t["gfn"]), bool)
    for a, b in gen.PAGE_TABLES:
        pt |= (t["gfn"] >= a) & (t["gfn"] <= b)
    assert pt.any() and np.all(np.isin(t["access"][pt], [2, 3]))
    # runs: vCPUs alternate in runs of several instructions
    switches = np.count_nonzero(t["vcpu"][1:] != t["vcpu"][:-1])
    assert 200_000 / 200 < switches < 200_000 / 10


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    a, b, c = (tmp_path / f"{x}.parquet" for x in "abc")
    gen.generate("kernel", 50_000, seed=7, vcpus=2, output=a)
    gen.generate("kernel", 50_000, seed=7, vcpus=2, output=b)
    gen.generate("kernel", 50_000, seed=8, vcpus=2, output=c)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_chunks_continue_state(monkeypatch):
    """Chunk boundaries keep insn ids, tsc and vCPU runs going (small chunks to force many)."""
    monkeypatch.setattr(gen, "CHUNK_ROWS", 1000)
    t = gen.generate_arrays("jit", 20_500, seed=2, vcpus=4)
    assert len(t["gfn"]) == 20_500
    check_structure(t, 4)


def test_row_group_size_does_not_change_rows(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    gen.generate("scan", 12_345, seed=3, output=a, row_group_size=1000)
    gen.generate("scan", 12_345, seed=3, output=b)
    assert open_trace(a).row_groups == 13 and open_trace(b).row_groups == 1
    ta, tb = read_all(a), read_all(b)
    for col in ta:
        np.testing.assert_array_equal(ta[col], tb[col])
    arrays = gen.generate_arrays("scan", 12_345, seed=3)
    np.testing.assert_array_equal(arrays["gfn"], ta["gfn"])


def test_jit_writes_before_executing():
    t = gen.generate_arrays("jit", 300_000, seed=4)
    lo, hi = gen.JIT_POOL
    in_pool = (t["gfn"] >= lo) & (t["gfn"] <= hi)
    x = in_pool & (t["access"] == 4)
    w = in_pool & (t["access"] == 2)
    assert x.sum() > 1000 and w.sum() > 1000
    first_w = {}
    for i in np.flatnonzero(w):
        first_w.setdefault(int(t["gfn"][i]), i)
    for i in np.flatnonzero(x)[:2000]:
        g = int(t["gfn"][i])
        assert g in first_w and first_w[g] < i, "JIT page executed before it was written"


def test_unknown_workload_and_bad_args(tmp_path):
    with pytest.raises(
        TraceError, match='unknown workload "kernal" \\(did you mean "kernel"\\?\\)'
    ):
        gen.generate("kernal", 10, output=tmp_path / "x.parquet")
    with pytest.raises(TraceError, match="--vcpus"):
        gen.generate("kernel", 10, vcpus=5000, output=tmp_path / "x.parquet")
    with pytest.raises(TraceError, match="-n"):
        gen.generate("kernel", 0, output=tmp_path / "x.parquet")
    assert not list(tmp_path.iterdir())


def test_cli_generate(tmp_path):
    out = tmp_path / "sub" / "k.parquet"
    r = CliRunner().invoke(
        main,
        [
            "trace",
            "generate",
            "kernel",
            "-n",
            "5000",
            "--seed",
            "3",
            "--vcpus",
            "2",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "5,000 rows" in r.output and validate(out).rows == 5000


def test_cli_generate_unknown_workload(tmp_path):
    out = tmp_path / "x.parquet"
    r = CliRunner().invoke(main, ["trace", "generate", "scna", "-n", "10", "-o", str(out)])
    assert r.exit_code == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert '"scna"' in lines[0] and 'did you mean "scan"' in lines[0]
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_help_lists_every_workload():
    for name in gen.WORKLOADS:
        assert name in trace_generate.help
