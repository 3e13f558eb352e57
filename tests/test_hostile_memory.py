"""Tiny inputs must not allocate gigabytes: each runs in a child process under an RSS
watchdog (VmHWM polled from /proc, the child killed past the cap) and ends in a result or
one ``Error:`` line naming what asks for the memory; plus the runtime guards and the
bounded per-ip table."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from altp2m_replay import budget, run, traces
from altp2m_replay.cli import main
from altp2m_replay.engine import simulate, sizing
from altp2m_replay.errors import MemoryBudgetError
from altp2m_replay.policy import load_policy, parse_policy
from altp2m_replay.selectors import TraceFacts

BUDGET = "768M"
RSS_CAP = 1 << 30  # the watchdog's line: the budget plus what a sample can miss
AS_CAP = 16 << 30  # backstop for the machine if a child allocates faster than polls


def _hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _limit_as():
    resource.setrlimit(resource.RLIMIT_AS, (AS_CAP, AS_CAP))


def watched(tmp_path: Path, *args, cap: int = RSS_CAP) -> tuple[int, list[str], int]:
    """Run the CLI in a child process in ``tmp_path``; kill it and fail the test if its peak
    RSS passes ``cap``. Returns (exit code, stderr lines, peak RSS seen)."""
    out, err = tmp_path / ".stdout", tmp_path / ".stderr"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "altp2m_replay", *map(str, args)],
            cwd=tmp_path,
            stdout=o,
            stderr=e,
            preexec_fn=_limit_as,
        )
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _hwm(proc.pid))
            if peak > cap:
                proc.kill()
                proc.wait()
                pytest.fail(
                    f"{args}: peak RSS {peak >> 20} MiB passed the watchdog's {cap >> 20} MiB"
                )
            time.sleep(0.01)
    lines = err.read_text(errors="replace").splitlines()
    out.unlink()
    err.unlink()
    return proc.returncode, lines, peak


def bounded_outcome(tmp_path, code, lines, names: str) -> None:
    """A result, or exactly one Error line that names ``names`` and the budget, and no
    output folder."""
    if code == 0:
        assert (tmp_path / "out" / "summary.parquet").is_file()
        return
    assert code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), lines
    assert names in lines[0] and "--max-memory" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def trace(path, gfns, meta: dict | None = None, column="gfn"):
    data = {column: np.asarray(gfns, np.uint64), "access": np.ones(len(gfns), np.uint8)}
    return traces.write_trace(data, path, meta=meta)


def policy(tmp_path, body: str) -> str:
    (tmp_path / "p.toml").write_text('name = "big"\n' + body, encoding="utf-8")
    return "p.toml"


# --------------------------------------------------------------------------- RAM sizes
@pytest.mark.parametrize("case", ["gpa-top", "csv-gfn", "meta-ram", "policy-ram"])
def test_tiny_inputs_that_describe_huge_ram(tmp_path, case):
    """A 1-row trace at gpa 2^48-1, a CSV row at gfn 0xfffffffff (both with no RAM
    metadata), RAM metadata or a policy [domain] ram of 2^36 gfns."""
    pol = "baseline"
    names = {
        "gpa-top": "highest gfn 0xfffffffff",
        "csv-gfn": 'metadata "ram"',
        "meta-ram": 'metadata "ram"',
        "policy-ram": "[domain] ram",
    }[case]
    if case == "gpa-top":
        trace(tmp_path / "t.parquet", [(1 << 48) - 1], column="gpa")
    elif case == "csv-gfn":
        (tmp_path / "t.csv").write_text("gfn,access\n0xfffffffff,r\n", encoding="utf-8")
        code, lines, _ = watched(tmp_path, "trace", "import", "csv", "t.csv", "-o", "t.parquet")
        assert code == 0, lines
    elif case == "meta-ram":
        trace(tmp_path / "t.parquet", [0x10, 0x11], meta={"ram": [[0, (1 << 36) - 1]]})
    else:
        trace(tmp_path / "t.parquet", [0x10, 0x11])
        pol = policy(tmp_path, "[domain]\nram = [[0, 0xfffffffff]]\n")
    code, lines, _ = watched(
        tmp_path, "replay", "t.parquet", "-p", pol, "-o", "out", "--max-memory", BUDGET, "--no-html"
    )
    bounded_outcome(tmp_path, code, lines, names)


VIEW = '[[view]]\nname = "v"\ndefault_access = "rwx"\n'


@pytest.mark.parametrize(
    ("body", "names"),
    [
        # many add_ram ops, each under the per-op cap of 2^24 gfns
        (
            "".join(
                f'[[setup]]\nop = "add_ram"\ngfns = [{0x100000 + i * (1 << 24)}, '
                f"{0x100000 + (i + 1) * (1 << 24) - 1}]\n"
                for i in range(40)
            ),
            "(add_ram)",
        ),
        # set_mem_access over a whole 512 GiB of RAM: every gfn a 4 KiB entry, whatever the host
        (
            VIEW
            + '[domain]\nram = [[0, 0x7ffffff]]\n[[setup]]\nop = "set_mem_access"\nview = "v"\n'
            'gfns = [0, 0x7ffffff]\naccess = "rx"\n[[on_violation]]\naction = "emulate"\n',
            "setup[0] (set_mem_access)",
        ),
        (
            (
                '[domain]\naltp2m = false\nram = [[0, 0x7ffffff]]\n[[setup]]\nop = "set_mem_access"\n'
                'view = 0\ngfns = [0, 0x7ffffff]\naccess = "rx"\n[[on_violation]]\naction = "emulate"\n'
            ),
            "setup[0] (set_mem_access)",
        ),
        (
            VIEW + '[[setup]]\nop = "add_ram"\ngfns = [0x1000000, 0x1ffffff]\n'
            '[[setup]]\nop = "change_gfn"\nview = "v"\nold = [0x1000000, 0x1ffffff]\nnew = 0x10\n',
            "(change_gfn)",
        ),
    ],
)
def test_setup_ops_that_ask_for_billions_of_entries(tmp_path, body, names):
    trace(tmp_path / "t.parquet", [0x10, 0x11])
    pol = policy(tmp_path, body)
    code, lines, _ = watched(
        tmp_path, "replay", "t.parquet", "-p", pol, "-o", "out", "--max-memory", BUDGET, "--no-html"
    )
    assert code == 2, lines
    bounded_outcome(tmp_path, code, lines, names)
    assert lines[0].startswith("Error: t.parquet: replaying it under 1 policy needs about ")
    assert "p.toml: setup[" in lines[0]


def test_qemu_mem_access_size_of_2_43_bits_stays_small(tmp_path):
    (tmp_path / "q.csv").write_text(
        "insn_vaddr,insn_symbol,mem_vaddr,mem_hwaddr,access_size,access_type,mem_value\n"
        f"0x1000,f,0x2000,,{1 << 43},load,0\n",
        encoding="utf-8",
    )
    code, lines, _ = watched(tmp_path, "trace", "import", "qemu-mem", "q.csv", "-o", "q.parquet")
    assert code == 2 and len(lines) == 1 and "column access_size" in lines[0]
    assert not (tmp_path / "q.parquet").exists()


def _forge_gfn_max(path: Path, old: int, new: int) -> None:
    """Make the footer's uint64 statistics say ``new`` where they say ``old``."""
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[-8:-4], "little")
    start = len(data) - 8 - size
    a, b = old.to_bytes(8, "little"), new.to_bytes(8, "little")
    assert data[start:-8].count(a) >= 1
    data[start:-8] = bytes(data[start:-8]).replace(a, b)
    path.write_bytes(bytes(data))


def test_a_footer_that_claims_a_huge_gfn_is_not_sized_for(tmp_path):
    """Statistics claim a max gfn of 2^35 while every value is below 0xbeef: the run sizes
    from the values (same tables as the honest file) and stays small."""
    gfns = np.array([0x10, 0x2000, 0xBEEF, 0x11] * 50, np.uint64)
    honest = trace(tmp_path / "honest.parquet", gfns)
    liar = tmp_path / "t.parquet"
    liar.write_bytes(honest.read_bytes())
    _forge_gfn_max(liar, 0xBEEF, 1 << 35)
    with pq.ParquetFile(liar) as pf:
        assert pf.metadata.row_group(0).column(0).statistics.max == 1 << 35
    assert traces.quick_stats(liar).max_gfn == 1 << 35  # the footer does lie
    code, lines, _ = watched(
        tmp_path,
        "replay",
        "t.parquet",
        "-p",
        "xen-access-altp2m-write",
        "-o",
        "out",
        "--max-memory",
        BUDGET,
        "--no-html",
    )
    assert code == 0, lines
    run.replay([honest], ["xen-access-altp2m-write"], tmp_path / "ref", jobs=1, html=False)
    for t in ("summary", "by_view", "by_gfn"):
        got = pl.read_parquet(tmp_path / "out" / f"{t}.parquet").drop("trace")
        ref = pl.read_parquet(tmp_path / "ref" / f"{t}.parquet").drop("trace")
        assert got.equals(ref), t


# --------------------------------------------------------------------------- the budget
@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("8G", 8 << 30),
        ("512M", 512 << 20),
        ("1.5GiB", 3 << 29),
        ("1073741824", 1 << 30),
        ("64k", None),
        ("2 g", 2 << 30),
        ("lots", None),
        ("-1G", None),
        ("", None),
    ],
)
def test_max_memory_sizes(text, nbytes):
    from altp2m_replay.errors import ReplayError

    if nbytes is None:
        with pytest.raises(ReplayError, match="--max-memory"):
            budget.parse_size(text)
    else:
        assert budget.parse_size(text) == nbytes


def test_max_memory_defaults_to_half_the_ram(monkeypatch):
    monkeypatch.setenv(budget.ENV, "1G")  # recorded, so the test leaves the environment as it was
    monkeypatch.delenv(budget.ENV)
    assert budget.limit() == budget.machine_ram() // 2
    budget.set_limit(3 << 30)
    assert budget.limit() == 3 << 30 and os.environ[budget.ENV] == str(3 << 30)


def test_bad_max_memory_is_one_error_line(tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "replay",
            "x.parquet",
            "-p",
            "baseline",
            "--max-memory",
            "12 parsecs",
            "-o",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("Error: --max-memory: expected a size such as 8G")


@pytest.mark.parametrize(
    ("ram", "order"),
    [
        ([[0, 0x9F], [0xC0, 0x3FFFF]], 9),
        ([[0, 0x9F], [0xC0, 0x3FFFF]], 18),
        ([[0, 0x9F], [0xC0, 0x3FFFF]], 0),
        ([[5, 5], [0x200, 0x200], [0x40000, 0x80000]], 18),
        ([[0x3FFFF, 0x40000]], 9),
        ([[0x7FFFFFF, 0x8000000]], 18),
    ],
)
def test_host_estimate_matches_the_engine(ram, order):
    """Leaves and nodes predicted from the RAM ranges are what building the host p2m
    takes (the engine's own count; nodes never fewer than predicted would let it pass)."""
    from altp2m_replay.engine import Replayer
    from altp2m_replay.engine import _kernels as K
    from altp2m_replay.engine.simulate import carve_ram
    from altp2m_replay.policy import parse_policy

    pol = parse_policy(
        f'name = "h"\n[domain]\naltp2m = false\nhost_order = {order}\nram = {ram}\n', "h"
    )
    leaves, nodes = sizing.host_need(np.asarray(ram, np.int64), order)
    assert leaves == len(carve_ram(np.asarray(ram), order)[0])
    rep = Replayer(pol, TraceFacts(max_gfn=0x10), [0], 1)
    assert int(rep.gs[K.GS_NFREE]) == nodes


def test_the_estimate_names_the_op_that_passes_the_budget(monkeypatch):
    monkeypatch.setattr(budget, "rss", lambda: 0)
    monkeypatch.setenv(budget.ENV, str(300 << 20))
    from altp2m_replay.policy import parse_policy

    ops = "".join(
        f'[[setup]]\nop = "add_ram"\ngfns = [{(i + 1) << 24}, {((i + 2) << 24) - 1}]\n'
        for i in range(3)
    )
    pol = parse_policy('name = "a"\n' + ops, "a.toml")
    needs = sizing.estimate(pol, TraceFacts(max_gfn=0x10), 10)
    assert [n.what.split(" (")[0] for n in needs[1:4]] == [f"a.toml: setup[{i}]" for i in range(3)]
    # each op: 2^24 gfns as 4 KiB entries = 2^15 tables + 64 + 1 above them, twice (growth)
    assert needs[1].nbytes == ((1 << 15) + 64 + 1) * 4096 * 2
    with pytest.raises(
        MemoryBudgetError,
        match=r"a.toml: setup\[1\] \(add_ram\) \(16,777,216 gfns\) asks for 256.5 MiB",
    ):
        sizing.check(needs, "")


# --------------------------------------------------------------------------- runtime guards
def _random_trace(path, n=60_000, seed=1):
    rng = np.random.default_rng(seed)
    return traces.write_trace(
        {
            "gfn": rng.integers(0x100, 0x40000, n).astype(np.uint64),
            "access": rng.choice(np.array([1, 2, 4], np.uint8), n),
            "ip": rng.integers(0, 1 << 40, n).astype(np.uint64),
        },
        path,
        meta={"ram": [[0, 0x3FFFF]]},
    )


@pytest.mark.parametrize("pol", ["xen-access-altp2m-exec", "xen-access-altp2m-write"])
def test_growth_past_the_budget_is_one_clean_error(tmp_path, monkeypatch, pol):
    """Sized up front within the budget, the replay then needs more (lazy copies, exits on
    many gfns and ips): the first growth that does not fit stops it with one Error line
    naming the trace, the policy and the table, and no output folder."""
    path = _random_trace(tmp_path / "t.parquet")
    monkeypatch.setattr(sizing, "check_cell", lambda *a, **k: None)
    monkeypatch.setattr(sizing, "check_run", lambda paths, pols, prepared, window: prepared)
    monkeypatch.setattr(budget, "rss", budget.limit)  # no room left at all
    result = CliRunner().invoke(
        main, ["replay", str(path), "-p", pol, "-o", str(tmp_path / "out"), "--jobs", "1"]
    )
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {path}: policy {pol!r}: the "), lines
    assert "takes the process past --max-memory" in lines[0]
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- per-ip table
def test_per_ip_table_is_bounded_with_exact_totals(tmp_path, monkeypatch):
    """With the per-ip table capped at 1024 rows, a trace of 12,000 distinct faulting ips
    gives at most 768 named rows plus one `other` row (ip null); column totals equal the
    uncapped run's, hot ips keep their exact counts, no named count is more than the truth,
    and every other table is unchanged."""
    from altp2m_replay.engine import _kernels, simulate

    n = 30_000
    rng = np.random.default_rng(4)
    hot = np.arange(10, dtype=np.uint64) + 0x1000
    ip = np.where(
        rng.random(n) < 0.4, hot[rng.integers(0, 10, n)], 0x100000 + np.arange(n, dtype=np.uint64)
    )
    path = traces.write_trace(
        {
            "gfn": rng.integers(0x100, 0x4000, n).astype(np.uint64),
            "access": np.full(n, 2, np.uint8),
            "ip": ip,
        },
        tmp_path / "ips.parquet",
        meta={"ram": [[0, 0x3FFFF]]},
    )
    pol = ["xen-access-altp2m-write"]
    run.replay([path], pol, tmp_path / "full", jobs=1, html=False)
    monkeypatch.setattr(simulate, "IP_ROWS", 1024)
    monkeypatch.setattr(simulate, "LOG_ROWS", _kernels.LOG_SLACK + 5)
    run.replay([path], pol, tmp_path / "capped", jobs=1, html=True)

    full = pl.read_parquet(tmp_path / "full" / "by_ip.parquet")
    capped = pl.read_parquet(tmp_path / "capped" / "by_ip.parquet")
    assert full["ip"].null_count() == 0 and full.height > 12_000
    named, other = capped.filter(pl.col("ip").is_not_null()), capped.filter(pl.col("ip").is_null())
    assert named.height <= 768 and other.height == 1
    exits = pl.read_parquet(tmp_path / "full" / "summary.parquet").filter(pl.col("vcpu") == -1)[
        "ept_exits"
    ][0]
    assert capped["ept_exits"].sum() == full["ept_exits"].sum() == exits
    truth = dict(zip(full["ip"].to_list(), full["ept_exits"].to_list(), strict=True))
    got = dict(zip(named["ip"].to_list(), named["ept_exits"].to_list(), strict=True))
    assert all(got[int(h)] == truth[int(h)] for h in hot)
    assert all(v <= truth[k] for k, v in got.items())
    for t in ("summary", "by_view", "by_gfn", "timeline", "population"):
        assert pl.read_parquet(tmp_path / "capped" / f"{t}.parquet").equals(
            pl.read_parquet(tmp_path / "full" / f"{t}.parquet")
        ), t
    assert "other ips" in (tmp_path / "capped" / "report.html").read_text(encoding="utf-8")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(-(2**63), 2**63 - 1), unique=True, max_size=60),
    st.data(),
)
def test_compaction_keeps_the_ips_with_most_events(ips, data):
    """The per-ip table's compaction keeps the rows first by (events descending, ip as
    unsigned ascending): the same set a full sort picks, ties at the cut included."""
    n = len(ips)
    events = np.array(data.draw(st.lists(st.integers(1, 4), min_size=n, max_size=n)), np.int64)
    keep = data.draw(st.integers(-1, n + 1))
    ip = np.array(ips, dtype=np.int64)
    order = np.lexsort((ip.view(np.uint64), -events))
    got = simulate._most_events(ip, events, keep)
    assert sorted(got.tolist()) == sorted(order[: max(keep, 0)].tolist())


def test_page_counts_ask_the_budget_before_they_merge(tmp_path, monkeypatch):
    """Policies that select gfns by page counts (and trace info) count rows per distinct
    gfn: on a trace of millions of distinct gfns that table asks the budget too."""
    path = _random_trace(tmp_path / "t.parquet", n=5000)
    monkeypatch.setattr(budget, "rss", budget.limit)
    with pytest.raises(
        MemoryBudgetError, match=r"t.parquet: counting rows per page \(\d[\d,]* gfn counts\)"
    ):
        traces.validate(path, page_counts=True)
    assert traces.validate(path).rows == 5000  # without page counts nothing is merged


def test_statistics_are_read_again_only_when_they_would_size_a_big_host(tmp_path, monkeypatch):
    """Ten policies over an honest 1 GiB trace keep the one-pass replay (no validation pass
    first); a footer implying a host p2m past TRUSTED_STATS_BYTES gets one. The policies
    model a restored domain before xen 4.21 (4 KiB host pages): with a fresh domain's 1 GiB
    pages even a footer claiming gfn 2^35 sizes a small host."""
    path = _random_trace(tmp_path / "t.parquet", n=3000)
    restored = parse_policy(
        'name = "restored"\n[domain]\norigin = "restore"\nxen = "4.20"\n', "test"
    )
    pols = [load_policy("xen-access-altp2m-write"), restored] * 5
    passes = []
    real = traces.validate
    monkeypatch.setattr(traces, "validate", lambda *a, **k: passes.append(a) or real(*a, **k))
    prepared = [traces.replay_facts(path, False)]
    assert prepared[0][2] is False  # sized from statistics, values not checked yet
    assert sizing.check_run([path], pols, prepared, None)[0][2] is False and passes == []
    stats, _facts, _ = prepared[0]
    lying = TraceFacts(max_gfn=1 << 35, meta_ram=None)
    out = sizing.check_run([path], pols, [(stats, lying, False)], None)
    assert len(passes) == 1 and out[0][2] is True and out[0][1].max_gfn == stats.max_gfn
