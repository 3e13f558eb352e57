"""`replay` through the CLI: outputs (SPEC §10), counters and costs (§7, §8), determinism and
scale-out (§7, §14), command line (§11) and errors (§12)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from reference import TOTAL_COUNTERS as COUNTERS

from altp2m_replay import __version__, run
from altp2m_replay.cli import main
from altp2m_replay.traces import write_trace

TABLES = ("summary", "by_view", "by_gfn", "by_ip", "timeline", "population")
THREE = ("xen-access-altp2m-write", "hvmi-ve-pagetables", "memaccess-write")

# SPEC §8, copied from the contract: key -> (default cycles, counters charged).
SPEC_COSTS = {
    "ept_exit": (5000, ("ept_exits",)),
    "lazy_copy": (500, ("lazy_copies",)),
    "vm_event_sync": (
        90000,
        ("mem_access_events", "singlestep_events", "breakpoint_events", "cr3_events"),
    ),
    "monitor_callback": (
        30000,
        ("mem_access_events", "singlestep_events", "breakpoint_events", "cr3_events"),
    ),
    "int3_exit": (5000, ("int3_exits",)),
    "cr3_exit": (3000, ("cr3_exits",)),
    "vmfunc_exit": (5000, ("vmfunc_exits",)),
    "view_reset": (20000, ("view_resets",)),
    "ept_sync_ipi": (4000, ("ept_sync_ipis",)),
    "vm_event_async": (5000, ("async_events",)),
    "mtf_exit": (3000, ("mtf_exits",)),
    "view_switch": (200, ("switches_vm_event", "switches_fast_ss")),
    "vmfunc": (150, ("switches_vmfunc",)),
    "ve_delivery": (500, ("ve_delivered",)),
    "ve_agent": (2500, ("ve_delivered",)),
    "emulation": (10000, ("emulations", "ve_emulations")),
    "access_change": (3000, ("access_changes",)),
    "superpage_split": (8000, ("superpage_splits", "shatters")),
    "mmio": (40000, ("mmio_accesses",)),
}
# SPEC §7 run / vCPU counters (tests/reference.py); the total row is the sum of the vCPU rows for the additive ones.

NOT_ADDITIVE = (
    "crashed",
    "crash_record",
    "livelocked",
    "livelock_record",
    "setup_splits",
    "setup_skipped",
)
ADDITIVE = tuple(c for c in COUNTERS if c not in NOT_ADDITIVE)
CYCLE_COLUMNS = (*tuple(f"cycles_{k}" for k in SPEC_COSTS), "cycles_total")


# --------------------------------------------------------------------------- helpers
def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def replay_ok(*args):
    result = cli("replay", *args)
    assert result.exit_code == 0, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    # not a terminal: no progress display, only warnings on stderr
    assert all(line.startswith(("warning: ", "note: ")) for line in result.stderr.splitlines()), (
        result.stderr
    )
    return result


def replay_error(args, out_dir: Path, *needles) -> str:
    """``replay ARGS -o OUT_DIR`` must exit 2 with one Error line and write nothing at all."""
    result = cli("replay", *args, "-o", out_dir)
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out_dir.exists() or list(out_dir.iterdir()) == [], sorted(out_dir.iterdir())
    return lines[0]


def policy_args(*names) -> list[str]:
    return [a for n in names for a in ("-p", n)]


def tables(out_dir: Path) -> dict[str, pl.DataFrame]:
    return {name: pl.read_parquet(out_dir / f"{name}.parquet") for name in TABLES}


def assert_same_tables(a: Path | dict, b: Path | dict) -> None:
    ta = a if isinstance(a, dict) else tables(a)
    tb = b if isinstance(b, dict) else tables(b)
    for name in TABLES:
        assert ta[name].columns == tb[name].columns, name
        assert ta[name].equals(tb[name]), name


def totals(summary: pl.DataFrame, policy: str, trace: str | None = None) -> dict:
    rows = summary.filter((pl.col("policy") == policy) & (pl.col("vcpu") == -1))
    if trace is not None:
        rows = rows.filter(pl.col("trace") == trace)
    assert rows.height == 1
    return rows.row(0, named=True)


def write_policy(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def copy_trace(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


# --------------------------------------------------------------------------- one run, three policies
@pytest.fixture(scope="module")
def three(tmp_path_factory, kernel_trace) -> Path:
    """The 20k-row, 2-vCPU generated trace under three policies, HTML on."""
    out = tmp_path_factory.mktemp("three") / "out"
    replay_ok(kernel_trace, *policy_args(*THREE), "-o", out, "--jobs", 1)
    return out


def test_replay_writes_every_output(three):
    names = sorted(p.name for p in three.iterdir() if not p.name.startswith("."))
    assert names == sorted([f"{t}.parquet" for t in TABLES] + ["manifest.json", "report.html"])
    # hidden entries may hold resume state (folders), never a left-over temporary file
    leftovers = [p.name for p in three.iterdir() if p.name.startswith(".") and not p.is_dir()]
    assert leftovers == []
    assert (
        (three / "report.html")
        .read_text(encoding="utf-8")
        .lstrip()
        .lower()
        .startswith("<!doctype html")
    )


def test_every_table_has_trace_and_policy_columns(three):
    for name, df in tables(three).items():
        assert {"trace", "policy"} <= set(df.columns), name
        if df.height:
            assert set(df["trace"]) == {"kern"}, name
            assert set(df["policy"]) <= set(THREE), name
    assert set(tables(three)["summary"]["policy"]) == set(THREE)


def test_summary_has_one_row_per_trace_policy_vcpu_plus_total(three):
    s = tables(three)["summary"]
    assert s.height == len(THREE) * 3
    assert s.select("trace", "policy", "vcpu").is_duplicated().sum() == 0
    for policy in THREE:
        assert sorted(s.filter(pl.col("policy") == policy)["vcpu"]) == [-1, 0, 1]


def test_total_row_is_the_sum_of_the_vcpu_rows(three):
    s = tables(three)["summary"]
    for policy in THREE:
        rows = s.filter(pl.col("policy") == policy)
        total = rows.filter(pl.col("vcpu") == -1).row(0, named=True)
        vcpus = rows.filter(pl.col("vcpu") >= 0)
        for col in ADDITIVE + CYCLE_COLUMNS + ("guest_cycles",):
            assert total[col] == vcpus[col].sum(), (policy, col)
        assert total["records"] == 20_000
        for col in ("crashed", "crash_record"):  # repeated in every vCPU row
            assert set(vcpus[col]) == {total[col]}, (policy, col)
        assert set(vcpus["setup_splits"]) == {0} and set(vcpus["setup_skipped"]) == {0}


def test_derived_counters_are_the_sums_spec_7_defines(three):
    s = tables(three)["summary"]
    for row in s.iter_rows(named=True):
        assert row["vm_events"] == (
            row["mem_access_events"] + row["singlestep_events"] + row["async_events"]
        ), row
        assert row["view_switches"] == (
            row["switches_vm_event"] + row["switches_fast_ss"] + row["switches_vmfunc"]
        ), row
    # the three policies exercise what those sums add up
    xa = totals(s, "xen-access-altp2m-write")
    assert (
        xa["mem_access_events"] > 0 and xa["singlestep_events"] > 0 and xa["switches_vm_event"] > 0
    )
    hv = totals(s, "hvmi-ve-pagetables")
    assert hv["ve_delivered"] > 0 and hv["switches_vmfunc"] > 0
    ma = totals(s, "memaccess-write")
    assert ma["mem_access_events"] > 0 and ma["access_changes"] > 0 and ma["view_switches"] == 0


def test_cycles_are_counters_times_the_default_costs(three):
    s = tables(three)["summary"]
    for row in s.iter_rows(named=True):
        for key, (cost, charged) in SPEC_COSTS.items():
            assert row[f"cycles_{key}"] == cost * sum(row[c] for c in charged), (key, row["policy"])
        assert row["cycles_total"] == sum(row[f"cycles_{k}"] for k in SPEC_COSTS)
        if row["records"]:
            assert row["cycles_per_record"] == pytest.approx(row["cycles_total"] / row["records"])


def test_slowdown_follows_spec_8_on_a_trace_with_tsc(three):
    s = tables(three)["summary"]
    assert "slowdown" in s.columns
    for row in s.iter_rows(named=True):
        guest = row["guest_cycles"]
        assert guest > 0
        assert row["slowdown"] == pytest.approx((guest + row["cycles_total"]) / guest)


def test_other_tables_agree_with_the_summary(three):
    t = tables(three)
    for policy in THREE:
        total = totals(t["summary"], policy)
        view = t["by_view"].filter(pl.col("policy") == policy)
        gfn = t["by_gfn"].filter(pl.col("policy") == policy)
        tl = t["timeline"].filter(pl.col("policy") == policy)
        for col in ("ept_exits", "lazy_copies", "access_violations", "ve_delivered"):
            assert view[col].sum() == total[col], (policy, col)
        assert view["switches_in"].sum() == total["view_switches"], policy
        for col in ("ept_exits", "ve_delivered", "lazy_copies"):
            assert gfn[col].sum() == total[col], (policy, col)
        assert (gfn["viol_r"] + gfn["viol_w"] + gfn["viol_x"]).sum() == total["access_violations"]
        assert ((gfn["ept_exits"] > 0) | (gfn["ve_delivered"] > 0)).all(), policy
        for col in ("ept_exits", "vm_events", "ve_delivered", "lazy_copies", "view_switches"):
            assert tl[col].sum() == total[col], (policy, col)
        assert tl["cycles_total"].sum() == pytest.approx(total["cycles_total"])
        # default window: ceil(20000 / 256) = 79 rows, so ceil(20000 / 79) = 254 windows
        assert tl["window"].to_list() == list(range(254))
        assert tl["first_record"].to_list() == [79 * w for w in range(254)]


def test_manifest(three, kernel_trace):
    m = json.loads((three / "manifest.json").read_text())
    assert m["version"] == __version__
    (entry,) = m["inputs"]
    data = kernel_trace.read_bytes()
    assert entry.get("bytes", entry.get("size")) == len(data)
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert [p["name"] for p in m["policies"]] == list(THREE)
    assert isinstance(m["command"], str) and m["command"]
    assert m["timings"]["seconds"] > 0 and m["timings"]["records_per_second"] > 0


def test_manifest_records_the_command_line(small_kernel_trace, tmp_path):
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "altp2m_replay",
        "replay",
        str(small_kernel_trace),
        "-p",
        "baseline",
        "--cost",
        "ept_exit=7",
        "-o",
        str(out),
        "--jobs",
        "1",
        "--no-html",
    ]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    for part in ("replay", str(small_kernel_trace), "-p baseline", "--cost ept_exit=7"):
        assert part in m["command"], (part, m["command"])
    assert not (out / "report.html").exists()
    (cell,) = m["cells"]
    assert cell["costs"]["ept_exit"] == 7 and cell["costs"]["lazy_copy"] == 500


# --------------------------------------------------------------------------- costs (SPEC §8)
@pytest.fixture(scope="module")
def cost_base(tmp_path_factory, small_kernel_trace) -> dict:
    out = tmp_path_factory.mktemp("costs") / "base"
    replay_ok(
        small_kernel_trace, "-p", "xen-access-altp2m-write", "-o", out, "--jobs", 1, "--no-html"
    )
    return totals(pl.read_parquet(out / "summary.parquet"), "xen-access-altp2m-write")


def _summary_total(tmp_path, trace, *args, policy="xen-access-altp2m-write") -> dict:
    out = tmp_path / "out"
    replay_ok(trace, "-o", out, "--jobs", 1, "--no-html", *args)
    return totals(pl.read_parquet(out / "summary.parquet"), policy)


def test_cost_override_changes_its_cycles_only(cost_base, small_kernel_trace, tmp_path):
    row = _summary_total(
        tmp_path, small_kernel_trace, "-p", "xen-access-altp2m-write", "--cost", "ept_exit=1"
    )
    assert cost_base["ept_exits"] > 0
    assert row["ept_exits"] == cost_base["ept_exits"]
    assert row["cycles_ept_exit"] == row["ept_exits"] * 1
    assert cost_base["cycles_ept_exit"] == cost_base["ept_exits"] * 5000
    for key in SPEC_COSTS:
        if key != "ept_exit":
            assert row[f"cycles_{key}"] == cost_base[f"cycles_{key}"], key
    assert row["cycles_total"] == cost_base["cycles_total"] - 4999 * row["ept_exits"]


def test_polling_agent_profile(cost_base, small_kernel_trace, tmp_path):
    row = _summary_total(
        tmp_path, small_kernel_trace, "-p", "xen-access-altp2m-write", "--profile", "polling-agent"
    )
    events = row["mem_access_events"] + row["singlestep_events"]
    assert events > 0
    assert row["cycles_vm_event_sync"] == 15000 * events
    assert row["cycles_monitor_callback"] == 0
    assert row["cycles_ept_exit"] == cost_base["cycles_ept_exit"]


def test_xen_dom0_profile_is_the_default(cost_base, small_kernel_trace, tmp_path):
    row = _summary_total(
        tmp_path, small_kernel_trace, "-p", "xen-access-altp2m-write", "--profile", "xen-dom0"
    )
    assert row == cost_base


def test_command_line_cost_wins_over_policy_costs(cost_base, small_kernel_trace, tmp_path):
    shown = cli("policy", "show", "xen-access-altp2m-write").stdout
    text = shown.replace('name = "xen-access-altp2m-write"', 'name = "priced"')
    text += "\n[costs]\nept_exit = 7\nmtf_exit = 11\n"
    policy = write_policy(tmp_path / "priced.toml", text)
    row = _summary_total(
        tmp_path, small_kernel_trace, "-p", policy, "--cost", "ept_exit=1", policy="priced"
    )
    assert (
        row["ept_exits"] == cost_base["ept_exits"]
        and row["mtf_exits"] == cost_base["mtf_exits"] > 0
    )
    assert row["cycles_ept_exit"] == row["ept_exits"] * 1  # command line wins
    assert row["cycles_mtf_exit"] == row["mtf_exits"] * 11  # the policy's own value stays
    assert row["cycles_lazy_copy"] == row["lazy_copies"] * 500  # untouched default


@pytest.mark.parametrize(
    ("option", "needles"),
    [
        (["--cost", "ept_exits=1"], ["ept_exits", 'did you mean "ept_exit"']),
        (["--cost", "vm_event_synk=1"], ["vm_event_synk", 'did you mean "vm_event_sync"']),
        (["--cost", "ept_exit=abc"], ["ept_exit", "abc"]),
        (["--cost", "ept_exit"], ["ept_exit"]),
        (["--cost", "ept_exit=-5"], ["ept_exit", "-5"]),
        (["--profile", "polling-agnet"], ["polling-agnet", 'did you mean "polling-agent"']),
    ],
)
def test_bad_cost_options(option, needles, small_kernel_trace, tmp_path):
    replay_error(
        [small_kernel_trace, "-p", "baseline", "--jobs", 1, *option], tmp_path / "out", *needles
    )


# --------------------------------------------------------------------------- slowdown
def test_slowdown_is_null_without_tsc(tmp_path):
    trace = write_trace(
        {
            "gfn": np.array([0x200, 0x201, 0x400, 0x401], np.uint64),
            "access": np.array([1, 2, 1, 4], np.uint8),
            "vcpu": np.array([0, 1, 0, 1], np.uint16),
        },
        tmp_path / "notsc.parquet",
    )
    out = tmp_path / "out"
    replay_ok(trace, "-p", "baseline", "-o", out, "--jobs", 1, "--no-html")
    s = pl.read_parquet(out / "summary.parquet")
    assert "slowdown" in s.columns and s.height == 3
    assert s["slowdown"].null_count() == 3


def test_slowdown_hand_computed(tmp_path):
    # baseline: view 0 starts empty, so the first touch of a gfn exits once and lazy-copies once
    # (5000 + 500 cycles); vCPU 0 only touches gfn 0x200, vCPU 1 only 0x400 (another 2 MiB page),
    # vCPU 2 touches 0x200 after vCPU 0 populated it, so it costs nothing.
    #   row vcpu gfn   tsc
    #   0   0    0x200  100
    #   1   1    0x400 1000
    #   2   0    0x200  150
    #   3   2    0x200    7   (vCPU 2's only row: guest cycles 0 -> slowdown null)
    #   4   1    0x400 1500
    #   5   0    0x200  400
    # guest: vCPU 0 = 400 - 100 = 300, vCPU 1 = 1500 - 1000 = 500, vCPU 2 = 0; total 800.
    trace = write_trace(
        {
            "gfn": np.array([0x200, 0x400, 0x200, 0x200, 0x400, 0x200], np.uint64),
            "access": np.ones(6, np.uint8),
            "vcpu": np.array([0, 1, 0, 2, 1, 0], np.uint16),
            "tsc": np.array([100, 1000, 150, 7, 1500, 400], np.uint64),
        },
        tmp_path / "tsc.parquet",
    )
    out = tmp_path / "out"
    replay_ok(trace, "-p", "baseline", "-o", out, "--jobs", 1, "--no-html")
    s = pl.read_parquet(out / "summary.parquet").sort("vcpu")
    rows = {r["vcpu"]: r for r in s.iter_rows(named=True)}
    assert [rows[v]["ept_exits"] for v in (-1, 0, 1, 2)] == [2, 1, 1, 0]
    assert [rows[v]["cycles_total"] for v in (-1, 0, 1, 2)] == [11000, 5500, 5500, 0]
    assert rows[0]["slowdown"] == pytest.approx((300 + 5500) / 300)
    assert rows[1]["slowdown"] == pytest.approx((500 + 5500) / 500)
    assert rows[2]["slowdown"] is None
    assert rows[-1]["slowdown"] == pytest.approx((800 + 11000) / 800)


# --------------------------------------------------------------------------- determinism, inputs
def test_same_replay_twice_gives_identical_tables(small_kernel_trace, tmp_path):
    args = [
        small_kernel_trace,
        *policy_args("xen-access-altp2m-write", "split-rx", "codemon-flip"),
        "--jobs",
        1,
        "--no-html",
    ]
    replay_ok(*args, "-o", tmp_path / "a")
    replay_ok(*args, "-o", tmp_path / "b")
    assert_same_tables(tmp_path / "a", tmp_path / "b")


@pytest.fixture(scope="module")
def two_traces(tmp_path_factory) -> Path:
    """A folder with two small generated traces (a: kernel, b: jit) and a non-trace file."""
    d = tmp_path_factory.mktemp("two") / "traces"
    d.mkdir()
    for name, workload, seed in (("a", "kernel", 2), ("b", "jit", 3)):
        r = cli(
            "trace",
            "generate",
            workload,
            "-n",
            1500,
            "--seed",
            seed,
            "--vcpus",
            2,
            "-o",
            d / f"{name}.parquet",
        )
        assert r.exit_code == 0, r.output
    (d / "notes.txt").write_text("not a trace")
    return d


def test_a_folder_replays_every_parquet_in_it(two_traces, tmp_path):
    pols = policy_args("baseline", "xen-access-altp2m-write")
    replay_ok(two_traces, *pols, "-o", tmp_path / "dir", "--jobs", 1, "--no-html")
    both = tables(tmp_path / "dir")
    assert set(both["summary"]["trace"]) == {"a", "b"}
    m = json.loads((tmp_path / "dir" / "manifest.json").read_text())
    assert sorted(i["trace"] for i in m["inputs"]) == ["a", "b"]
    for name in ("a", "b"):
        replay_ok(
            two_traces / f"{name}.parquet", *pols, "-o", tmp_path / name, "--jobs", 1, "--no-html"
        )
        alone = tables(tmp_path / name)
        for t in TABLES:
            assert both[t].filter(pl.col("trace") == name).equals(alone[t]), (name, t)


def test_two_traces_with_one_name_are_refused(two_traces, tmp_path):
    one = copy_trace(two_traces / "a.parquet", tmp_path / "x" / "same.parquet")
    two = copy_trace(two_traces / "b.parquet", tmp_path / "y" / "same.parquet")
    replay_error([one, two, "-p", "baseline", "--jobs", 1], tmp_path / "out", str(one), str(two))
    # also when the clash comes from a folder argument
    three = copy_trace(two_traces / "a.parquet", tmp_path / "z" / "a.parquet")
    replay_error([two_traces, three, "-p", "baseline", "--jobs", 1], tmp_path / "out", str(three))


def _bad_trace(kind: str, path: Path) -> tuple[Path, list[str]]:
    n = 200
    if kind == "tsc":  # valid schema, a tsc that goes backwards at row 150: found by validation
        tsc = np.arange(n, dtype=np.uint64) * 10
        tsc[150] = 5
        write_trace(
            {
                "gfn": np.arange(n, dtype=np.uint64) + 0x200,
                "access": np.ones(n, np.uint8),
                "tsc": tsc,
            },
            path,
        )
        return path, ["row 150", "tsc"]
    if kind == "gfn-range":  # a gfn beyond 2^36 in the last row
        gfn = np.arange(n, dtype=np.uint64) + 0x200
        gfn[-1] = 1 << 40
        write_trace({"gfn": gfn, "access": np.ones(n, np.uint8)}, path)
        return path, [f"row {n - 1}", "gfn"]
    if kind == "op":  # a control row (SPEC §15), not supported yet
        op = np.zeros(n, np.uint8)
        op[120] = 1
        write_trace(
            {
                "gfn": np.arange(n, dtype=np.uint64) + 0x200,
                "access": np.ones(n, np.uint8),
                "op": op,
            },
            path,
        )
        return path, ["row 120", "op"]
    # schema: gfn stored as double
    pq.write_table(
        pa.table(
            {
                "gfn": pa.array(np.arange(n, dtype=np.float64)),
                "access": pa.array(np.ones(n, np.uint8)),
            }
        ),
        path,
    )
    return path, ["gfn", "double"]


@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.parametrize("kind", ["tsc", "gfn-range", "op", "schema"])
def test_a_bad_trace_among_good_ones_writes_nothing(kind, jobs, two_traces, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(two_traces, folder)
    _bad, needles = _bad_trace(kind, folder / "z_bad.parquet")  # sorted last: replayed last
    replay_error(
        [folder, "-p", "baseline", "-p", "xen-access-altp2m-write", "--jobs", jobs],
        tmp_path / "out",
        "z_bad.parquet",
        *needles,
    )


def test_missing_trace(tmp_path, two_traces):
    missing = tmp_path / "gone.parquet"
    replay_error(
        [two_traces / "a.parquet", missing, "-p", "baseline"], tmp_path / "out", str(missing)
    )


def test_unknown_policy_writes_nothing(small_kernel_trace, tmp_path):
    replay_error(
        [small_kernel_trace, "-p", "baseline", "-p", "xen-acess-altp2m-write"],
        tmp_path / "out",
        "xen-acess-altp2m-write",
        'did you mean "xen-access-altp2m-write"',
    )
    missing = tmp_path / "nope.toml"
    replay_error([small_kernel_trace, "-p", missing], tmp_path / "out", str(missing))


def test_broken_policy_writes_nothing(small_kernel_trace, tmp_path):
    bad = write_policy(
        tmp_path / "bad.toml",
        """
        name = "bad"
        [[view]]
        name = "v"
        default_access = "wx"
        """,
    )
    replay_error(
        [small_kernel_trace, "-p", "baseline", "-p", bad],
        tmp_path / "out",
        str(bad),
        "default_access",
    )


def test_two_policies_with_one_name_are_refused(small_kernel_trace, tmp_path):
    twin = write_policy(tmp_path / "twin.toml", 'name = "baseline"\n')
    replay_error([small_kernel_trace, "-p", "baseline", "-p", twin], tmp_path / "out", "baseline")


def test_output_path_that_is_a_file(small_kernel_trace, tmp_path):
    out = tmp_path / "taken"
    out.write_text("x")
    result = cli("replay", small_kernel_trace, "-p", "baseline", "-o", out, "--jobs", 1)
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and str(out) in errors[0], result.stderr
    assert "Traceback" not in result.output
    assert out.read_text() == "x"


def test_window_option(small_kernel_trace, tmp_path):
    out = tmp_path / "out"
    replay_ok(
        small_kernel_trace,
        "-p",
        "xen-access-altp2m-write",
        "--window",
        300,
        "-o",
        out,
        "--jobs",
        1,
        "--no-html",
    )
    t = tables(out)
    tl = t["timeline"]
    assert tl["window"].to_list() == list(range(7))  # ceil(2000 / 300)
    assert tl["first_record"].to_list() == [300 * w for w in range(7)]
    total = totals(t["summary"], "xen-access-altp2m-write")
    for col in ("ept_exits", "vm_events", "ve_delivered", "lazy_copies", "view_switches"):
        assert tl[col].sum() == total[col], col


def test_summary_rows_are_the_vcpus_that_appear(tmp_path):
    trace = write_trace(
        {
            "gfn": np.array([0x200, 0x201, 0x202], np.uint64),
            "access": np.ones(3, np.uint8),
            "vcpu": np.array([0, 5, 5], np.uint16),
        },
        tmp_path / "gap.parquet",
    )
    out = tmp_path / "out"
    replay_ok(trace, "-p", "baseline", "-o", out, "--jobs", 1, "--no-html")
    s = pl.read_parquet(out / "summary.parquet").sort("vcpu")
    assert s["vcpu"].to_list() == [-1, 0, 5]
    assert s["records"].to_list() == [3, 1, 2]


def test_trace_name_is_the_file_name_without_parquet(tmp_path, two_traces):
    trace = copy_trace(two_traces / "a.parquet", tmp_path / "run.2024-01-01.parquet")
    out = tmp_path / "out"
    replay_ok(trace, "-p", "baseline", "-o", out, "--jobs", 1, "--no-html")
    for name, df in tables(out).items():
        if df.height:
            assert set(df["trace"]) == {"run.2024-01-01"}, name


def test_gpa_trace_replays_like_its_gfn_trace(tmp_path):
    gfn = np.array([0x200, 0x201, 0x400, 0x200, 0x5FF], np.uint64)
    access = np.array([1, 2, 4, 3, 2], np.uint8)
    offsets = np.array([0, 8, 0x10, 0xFFF, 0x800], np.uint64)
    by_gfn = write_trace({"gfn": gfn, "access": access}, tmp_path / "g" / "t.parquet")
    by_gpa = write_trace(
        {"gpa": (gfn << np.uint64(12)) + offsets, "access": access}, tmp_path / "a" / "t.parquet"
    )
    pols = policy_args("xen-access-altp2m-write", "codemon-flip")
    replay_ok(by_gfn, *pols, "-o", tmp_path / "og", "--jobs", 1, "--no-html")
    replay_ok(by_gpa, *pols, "-o", tmp_path / "oa", "--jobs", 1, "--no-html")
    assert_same_tables(tmp_path / "og", tmp_path / "oa")


def test_setup_warnings_reach_stderr_manifest_and_report(small_kernel_trace, tmp_path):
    policy = write_policy(
        tmp_path / "v0.toml",
        """
        name = "view0-restriction"
        [[setup]]
        op = "set_mem_access"
        view = 0
        gfns = [0x1000, 0x10ff]
        access = "rx"
        [[on_violation]]
        action = "emulate"
        """,
    )
    out = tmp_path / "out"
    result = replay_ok(small_kernel_trace, "-p", policy, "-o", out, "--jobs", 1)
    warnings = result.stderr.splitlines()
    assert (
        len(warnings) == 1 and "setup[0]" in warnings[0] and "view-0-restriction" not in warnings[0]
    )
    assert "small" in warnings[0] and "view0-restriction" in warnings[0]
    (cell,) = json.loads((out / "manifest.json").read_text())["cells"]
    assert len(cell["warnings"]) == 1 and "setup[0]" in cell["warnings"][0]
    assert "setup[0]" in (out / "report.html").read_text(encoding="utf-8")


def test_resume_gives_the_same_tables(two_traces, tmp_path):
    pols = policy_args("xen-access-altp2m-write", "codemon-flip")
    fresh = tmp_path / "fresh"
    replay_ok(two_traces, *pols, "-p", "split-rx", "-o", fresh, "--jobs", 1, "--no-html")
    out = tmp_path / "out"
    replay_ok(two_traces, *pols, "-o", out, "--jobs", 1, "--no-html")
    first = tables(out)
    replay_ok(two_traces, *pols, "-o", out, "--jobs", 1, "--no-html", "--resume")
    assert_same_tables(first, tables(out))
    # one more policy: its cells are computed, the others reused; same as a fresh run
    replay_ok(two_traces, *pols, "-p", "split-rx", "-o", out, "--jobs", 1, "--no-html", "--resume")
    assert_same_tables(fresh, out)


# --------------------------------------------------------------------------- batch size, jobs
def _drop_timing(t: dict[str, pl.DataFrame]) -> dict[str, pl.DataFrame]:
    timing = ("seconds", "elapsed", "records_per_second", "time")
    return {
        k: v.select([c for c in v.columns if not any(w in c for w in timing)]) for k, v in t.items()
    }


def test_batch_size_does_not_change_results(small_kernel_trace, tmp_path):
    pols = [
        "xen-access-altp2m-write",
        "hvmi-ve-pagetables",
        "drakvuf-hidden-breakpoints-fast",
        "split-rx",
        "codemon-flip",
    ]
    run.replay([str(small_kernel_trace)], pols, tmp_path / "default", jobs=1, html=False)
    run.replay(
        [str(small_kernel_trace)], pols, tmp_path / "seven", jobs=1, html=False, batch_rows=7
    )
    assert_same_tables(
        _drop_timing(tables(tmp_path / "default")), _drop_timing(tables(tmp_path / "seven"))
    )


@pytest.mark.parametrize("which", ["two traces", "one trace, three policies"])
def test_jobs_do_not_change_results(which, two_traces, tmp_path):
    if which == "two traces":
        inputs = [two_traces]
        pols = policy_args("xen-access-altp2m-write", "codemon-flip")
    else:
        inputs = [two_traces / "b.parquet"]
        pols = policy_args("xen-access-altp2m-write", "codemon-flip", "hvmi-ve-pagetables")
    replay_ok(*inputs, *pols, "-o", tmp_path / "one", "--jobs", 1, "--no-html")
    replay_ok(*inputs, *pols, "-o", tmp_path / "two", "--jobs", 2, "--no-html")
    assert_same_tables(tmp_path / "one", tmp_path / "two")


# --------------------------------------------------------------------------- crash, runtime errors
CRASH_POLICY = """
    name = "crash"
    [domain]
    monitor = false
    access_required = {required}
    [[view]]
    name = "ro"
    default_access = "r"
    [[setup]]
    op = "switch_p2m"
    view = "ro"
    """


def _crash_trace(path: Path) -> Path:
    # row vcpu gfn   access tsc
    # 0    0   0x200 r       10   exit, lazy copy into "ro" (access r), completes
    # 1    1   0x200 r      100   completes
    # 2    0   0x201 r       30   completes (same copied leaf)
    # 3    1   0x201 w      150   first violation: no monitor, access_required -> crash
    # 4    0   0x202 w     1000   never processed
    return write_trace(
        {
            "gfn": np.array([0x200, 0x200, 0x201, 0x201, 0x202], np.uint64),
            "access": np.array([1, 1, 1, 2, 2], np.uint8),
            "vcpu": np.array([0, 1, 0, 1, 0], np.uint16),
            "tsc": np.array([10, 100, 30, 150, 1000], np.uint64),
        },
        path,
    )


def test_a_crash_is_a_result(tmp_path):
    trace = _crash_trace(tmp_path / "crash.parquet")
    policy = write_policy(tmp_path / "crash.toml", CRASH_POLICY.replace("{required}", "true"))
    out = tmp_path / "out"
    replay_ok(trace, "-p", policy, "-o", out, "--jobs", 1)
    s = pl.read_parquet(out / "summary.parquet")
    rows = {r["vcpu"]: r for r in s.iter_rows(named=True)}
    assert set(rows) == {-1, 0, 1}
    for r in rows.values():
        assert r["crashed"] == 1 and r["crash_record"] == 3
    # records include the crashing row; row 4 is never processed
    assert [rows[v]["records"] for v in (-1, 0, 1)] == [4, 2, 2]
    assert rows[-1]["access_violations"] == 1 and rows[-1]["mem_access_events"] == 0
    # guest cycles count the rows processed only: vCPU 0 30 - 10, vCPU 1 150 - 100
    assert [rows[v]["guest_cycles"] for v in (-1, 0, 1)] == [70, 20, 50]
    assert (out / "report.html").exists()


def test_without_access_required_the_entry_is_relaxed(tmp_path):
    trace = _crash_trace(tmp_path / "crash.parquet")
    policy = write_policy(tmp_path / "crash.toml", CRASH_POLICY.replace("{required}", "false"))
    out = tmp_path / "out"
    replay_ok(trace, "-p", policy, "-o", out, "--jobs", 1, "--no-html")
    total = totals(pl.read_parquet(out / "summary.parquet"), "crash")
    # rows 3 and 4 each violate once, relax their gfn to rwx and retry, with no event
    assert (total["crashed"], total["crash_record"], total["records"]) == (0, -1, 5)
    assert total["access_violations"] == 2 and total["access_changes"] == 2
    assert total["vm_events"] == 0


UNMATCHED_POLICY = """
    name = "partial"
    [[view]]
    name = "ro"
    default_access = "rx"
    [[setup]]
    op = "switch_p2m"
    view = "ro"
    [[on_violation]]
    kind = "w"
    gfns = [0x300, 0x300]
    action = "step"
    to = 0
    """


def test_an_unmatched_violation_names_the_row(tmp_path):
    # row 1 writes 0x300 (covered: stepped in view 0); row 3 writes 0x201: no rule matches
    trace = write_trace(
        {
            "gfn": np.array([0x200, 0x300, 0x201, 0x201, 0x202], np.uint64),
            "access": np.array([1, 2, 1, 2, 2], np.uint8),
        },
        tmp_path / "partial.parquet",
    )
    policy = write_policy(tmp_path / "partial.toml", UNMATCHED_POLICY)
    line = replay_error([trace, "-p", policy, "--jobs", 1], tmp_path / "out", "row 3")
    assert "partial.parquet" in line  # SPEC §12: the line names the file


# Two views that answer every violation by switching to the other: an instruction that
# faults in both never retires (a livelock).
SWITCH_LOOP = """
    name = "loop"
    [[view]]
    name = "a"
    default_access = "rx"
    [[view]]
    name = "b"
    default_access = "rx"
    [[setup]]
    op = "switch_p2m"
    view = "a"
    [[on_violation]]
    view = "a"
    action = "switch"
    to = "b"
    [[on_violation]]
    view = "b"
    action = "switch"
    to = "a"
    """


def test_a_switch_loop_is_a_livelock_result_naming_the_row(tmp_path):
    trace = write_trace(
        {"gfn": np.array([0x200, 0x300], np.uint64), "access": np.array([1, 2], np.uint8)},
        tmp_path / "loop.parquet",
    )
    policy = write_policy(tmp_path / "loop.toml", SWITCH_LOOP)
    # Row 0 (r 0x200) lazy-copies 2 MiB rx into a and completes. Row 1 (w 0x300) faults in a,
    # switches to b, lazy-copies there, faults, switches back, ...: after 64 restarts the
    # instruction never retires. SPEC §5: a livelock is a result (exit 0), not an error.
    # restarts: 1 (row 0's lazy copy) + 64 (row 1).
    replay_ok(trace, "-p", policy, "--jobs", 1, "-o", tmp_path / "out", "--no-html")
    total = tables(tmp_path / "out")["summary"].filter(pl.col("vcpu") == -1).row(0, named=True)
    assert (total["livelocked"], total["livelock_record"], total["restarts"]) == (1, 1, 65)
    assert (total["crashed"], total["crash_record"], total["records"]) == (0, -1, 2)


# --------------------------------------------------------------------------- entry points
def test_python_dash_m_help_and_version():
    help_ = subprocess.run(
        [sys.executable, "-m", "altp2m_replay", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert help_.returncode == 0, help_.stderr
    for command in ("replay", "report", "compare", "trace", "policy", "bench"):
        assert command in help_.stdout
    version = subprocess.run(
        [sys.executable, "-m", "altp2m_replay", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert version.returncode == 0, version.stderr
    assert __version__ in version.stdout


def test_version_and_replay_help_in_process():
    result = cli("--version")
    assert result.exit_code == 0 and __version__ in result.stdout
    result = cli("replay", "--help")
    assert result.exit_code == 0
    for option in (
        "--policy",
        "--output",
        "--cost",
        "--profile",
        "--window",
        "--jobs",
        "--no-html",
    ):
        assert option in result.stdout


def test_replay_without_policy_is_a_usage_error(small_kernel_trace):
    result = cli("replay", small_kernel_trace)
    assert result.exit_code == 2
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- views in by_view
def test_by_view_lists_every_view_of_each_policy(three):
    v = tables(three)["by_view"]
    views = {p: sorted(v.filter(pl.col("policy") == p)["view"]) for p in THREE}
    assert views == {
        "xen-access-altp2m-write": [0, 1],
        "hvmi-ve-pagetables": [0, 1, 2],
        "memaccess-write": [0],
    }
    names = dict(
        zip(
            v.filter(pl.col("policy") == "hvmi-ve-pagetables")["view"],
            v.filter(pl.col("policy") == "hvmi-ve-pagetables")["view_name"],
            strict=True,
        )
    )
    assert names[1] == "untrusted" and names[2] == "protected"


def test_views_take_explicit_indexes_first_then_the_lowest_free(tmp_path):
    # SPEC §4: b takes its index 1 first; a and c then take the lowest free indexes, 2 and 3
    policy = write_policy(
        tmp_path / "idx.toml",
        """
        name = "idx"
        [[view]]
        name = "a"
        [[view]]
        name = "b"
        index = 1
        [[view]]
        name = "c"
        [[view]]
        name = "d"
        index = 7
        """,
    )
    trace = write_trace(
        {"gfn": np.array([0x200], np.uint64), "access": np.ones(1, np.uint8)},
        tmp_path / "one.parquet",
    )
    out = tmp_path / "out"
    replay_ok(trace, "-p", policy, "-o", out, "--jobs", 1, "--no-html")
    v = pl.read_parquet(out / "by_view.parquet").sort("view")
    assert v["view"].to_list() == [0, 1, 2, 3, 7]
    assert v["view_name"].to_list()[1:] == ["b", "a", "c", "d"]
