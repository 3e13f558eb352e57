"""`compare BASE NEW`: the CI gate, through the CLI with its exit codes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from altp2m_replay.cli import main

POLICIES = ("none", "baseline", "xen-access-altp2m-write")


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    trace = root / "kern.parquet"
    r = cli("trace", "generate", "kernel", "-n", 5_000, "--seed", 5, "--vcpus", 2, "-o", trace)
    assert r.exit_code == 0, r.output
    args = ["replay", trace, "--no-html", "--jobs", 1, "-o", root / "base"]
    for p in POLICIES:
        args += ["-p", p]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    return root / "base"


@pytest.fixture
def variant(base, tmp_path):
    """variant(edit) -> a copy of BASE whose summary went through ``edit(df) -> df``."""
    count = iter(range(100))

    def make(edit) -> Path:
        d = tmp_path / f"v{next(count)}"
        shutil.copytree(base, d)
        edit(pl.read_parquet(d / "summary.parquet")).write_parquet(d / "summary.parquet")
        resign(d)
        return d

    return make


def resign(d: Path) -> None:
    """Record an edited summary in the manifest, as if one run had written it."""
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["files"]["summary.parquet"] = hashlib.sha256(
        (d / "summary.parquet").read_bytes()
    ).hexdigest()
    (d / "manifest.json").write_text(json.dumps(manifest))


def cell(policy, vcpu=-1):
    return (pl.col("policy") == policy) & (pl.col("vcpu") == vcpu)


def setv(df, where, column, value):
    return df.with_columns(
        pl.when(where)
        .then(pl.lit(value, dtype=df.schema[column]))
        .otherwise(pl.col(column))
        .alias(column)
    )


def total(base, policy, column):
    df = pl.read_parquet(base / "summary.parquet").filter(cell(policy))
    return df[column][0]


def gate(*args):
    r = cli("compare", *args)
    return r, r.exit_code


def one_error_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


# ----------------------------------------------------------------------------- verdicts
def test_equal_passes(base):
    r, code = gate(base, base)
    assert code == 0, r.output
    assert "PASS" in r.stdout and "GREW" not in r.stdout
    assert r.stderr == ""


def test_improvement_passes(base, variant):
    cycles = total(base, "xen-access-altp2m-write", "cycles_total")
    new = variant(lambda df: setv(df, cell("xen-access-altp2m-write"), "cycles_total", cycles / 2))
    r, code = gate(base, new)
    assert code == 0, r.output
    assert "improved" in r.stdout and "-50.00%" in r.stdout


def test_regression_fails_with_exit_1(base, variant):
    exits = total(base, "xen-access-altp2m-write", "ept_exits")
    new = variant(lambda df: setv(df, cell("xen-access-altp2m-write", 1), "ept_exits", exits + 1))
    r, code = gate(base, new)
    assert code == 1, r.output
    line = next(ln for ln in r.stdout.splitlines() if "GREW" in ln)
    assert "xen-access-altp2m-write" in line and "ept_exits" in line and "+1" in line
    assert "FAIL" in r.stdout
    one_error_line(r)
    # the same growth passes once the threshold allows it
    r, code = gate(base, new, "--max-increase", 1000)
    assert code == 0, r.output


def test_threshold_edge_exactly_at_the_limit_passes(base, variant):
    old = variant(lambda df: setv(df, cell("baseline"), "cycles_total", 1000.0))
    at = variant(lambda df: setv(df, cell("baseline"), "cycles_total", 1001.0))
    past = variant(lambda df: setv(df, cell("baseline"), "cycles_total", 1001.5))
    # 1000 * (1 + 0.1/100) is 1000.9999999999999 in floats: the rule must be exact
    assert gate(old, at, "--max-increase", 0.1)[1] == 0
    assert gate(old, past, "--max-increase", 0.1)[1] == 1
    r, _code = gate(old, at, "--max-increase", 0.1)
    assert "increased" in r.stdout and "+0.10%" in r.stdout
    # default threshold 0: any increase fails
    assert gate(old, at)[1] == 1


def test_zero_base(base, variant):
    assert total(base, "none", "ept_exits") == 0
    new = variant(lambda df: setv(df, cell("none"), "ept_exits", 5))
    r, code = gate(base, new, "--max-increase", 50)
    assert code == 1, r.output
    line = next(ln for ln in r.stdout.splitlines() if "GREW" in ln)
    assert "+inf%" in line and "none" in line
    r = cli("compare", base, new, "--format", "json")
    doc = json.loads(r.stdout)
    none_total = next(c for c in doc["cells"] if c["policy"] == "none" and c["vcpu"] == -1)
    m = none_total["metrics"]["ept_exits"]
    assert m == {
        "base": 0,
        "new": 5,
        "change": 5,
        "change_pct": None,
        "status": "grew",
        "grew": True,
    }
    # zero to zero is equal
    zero = none_total["metrics"]["vm_events"]
    assert zero["status"] == "equal" and zero["change_pct"] == 0.0


def test_missing_cells_fail_and_new_cells_do_not(base, variant):
    dropped = variant(lambda df: df.filter(pl.col("policy") != "baseline"))
    r, code = gate(base, dropped)
    assert code == 1, r.output
    assert "missing from new" in r.stdout and "baseline · vcpu total" in r.stdout
    one_error_line(r)
    # the other way round: BASE lacks the policy, NEW has it -> reported, not gated
    r, code = gate(dropped, base)
    assert code == 0, r.output
    assert "new cells (not gated)" in r.stdout and "baseline · vcpu 1" in r.stdout
    doc = json.loads(cli("compare", dropped, base, "--format", "json").stdout)
    added = {(c["policy"], c["vcpu"]) for c in doc["new_cells"]}
    assert added == {("baseline", v) for v in (-1, 0, 1)}
    assert doc["missing_cells"] == [] and doc["failed"] is False


def test_metric_option(base, variant):
    new = variant(lambda df: setv(df, cell("baseline"), "lazy_copies", 10**6))
    assert gate(base, new)[1] == 0  # not a default metric
    r, code = gate(base, new, "--metric", "lazy_copies")
    assert code == 1 and "lazy_copies" in r.stdout
    assert "cycles_total" not in r.stdout  # only the metrics asked for


REVISION_2_COUNTERS = (
    "int3_exits",
    "livelocked",
    "restarts",
    "breakpoint_events",
    "cr3_events",
    "cr3_exits",
    "vmfunc_exits",
    "view_resets",
    "ept_sync_ipis",
    "livelock_record",
    "cycles_int3_exit",
    "cycles_view_reset",
)


def test_revision_2_counters_are_metrics(base, variant):
    args = [a for m in REVISION_2_COUNTERS for a in ("--metric", m)]
    r, code = gate(base, base, *args, "--format", "json")
    assert code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["metrics"] == list(REVISION_2_COUNTERS)
    statuses = {m: c["metrics"][m]["status"] for c in doc["cells"] for m in REVISION_2_COUNTERS}
    assert set(statuses.values()) == {"equal"}
    # a policy that starts to livelock, to hit breakpoints or to restart more fails the gate
    restarts = total(base, "xen-access-altp2m-write", "restarts")
    assert restarts > 0
    for metric, value in (("livelocked", 1), ("int3_exits", 7), ("restarts", restarts * 2)):
        new = variant(lambda df, m=metric, v=value: setv(df, cell("xen-access-altp2m-write"), m, v))
        r, code = gate(base, new, "--metric", metric, "--max-increase", 10)
        assert code == 1, (metric, r.output)
        assert metric in r.stdout and "xen-access-altp2m-write" in r.stdout


# ----------------------------------------------------------------------------- formats
def test_text_is_an_aligned_table(base):
    r, _ = gate(base, base)
    lines = r.stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("trace"))
    rows = lines[head + 2 : head + 2 + 3 * len(POLICIES) * 3]
    assert all(
        ln.index("cycles_total") == rows[0].index("cycles_total")
        for ln in rows
        if "cycles_total" in ln
    )
    assert set(lines[head + 1]) <= {"-", " "}
    assert len(rows) == 27 and all(ln.endswith("equal") for ln in rows)


def test_markdown_has_a_verdict_and_a_table(base, variant):
    r, code = gate(base, base, "--format", "markdown")
    assert code == 0
    assert r.stdout.startswith("### ✅")
    assert "| trace | policy | vCPU | metric |" in r.stdout
    assert r.stdout.count("\n| kern | ") == 27
    new = variant(lambda df: setv(df, cell("baseline"), "vm_events", 7))
    r, code = gate(base, new, "--format", "markdown")
    assert code == 1 and r.stdout.startswith("### ❌") and "❌ grew" in r.stdout


def test_json_is_machine_readable(base, variant):
    new = variant(lambda df: setv(df, cell("baseline"), "cycles_total", 1e12))
    r, code = gate(base, new, "--format", "json", "--metric", "cycles_total", "--max-increase", 5)
    assert code == 1
    doc = json.loads(r.stdout)
    assert doc["failed"] is True and doc["max_increase"] == 5.0
    assert doc["metrics"] == ["cycles_total"]
    assert len(doc["cells"]) == 3 * len(POLICIES)
    grew = [c for c in doc["cells"] if c["failed"]]
    assert [(c["policy"], c["vcpu"]) for c in grew] == [("baseline", -1)]
    m = grew[0]["metrics"]["cycles_total"]
    assert m["new"] == 1e12 and m["grew"] is True and m["change"] == 1e12 - m["base"]
    assert doc["counts"]["grew"] == 1
    assert json.loads(cli("compare", base, base, "--format", "json").stdout)["failed"] is False


# ----------------------------------------------------------------------------- bad input
def test_missing_folder_or_summary(base, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in ((tmp_path / "nope", base), (base, tmp_path / "nope"), (base, empty)):
        r, code = gate(*args)
        assert code == 2, r.output
        assert "nope" in one_error_line(r) or "summary.parquet" in one_error_line(r)


def test_unreadable_parquet(base, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(base, bad)
    (bad / "summary.parquet").write_bytes(b"PAR1 garbage")
    resign(bad)  # past the mixed-folder check, to the Parquet reader
    r, code = gate(base, bad)
    assert code == 2
    assert "summary.parquet" in one_error_line(r) and "not a readable Parquet" in r.stderr


def test_no_common_cells(base, variant):
    other = variant(lambda df: df.with_columns(pl.lit("other").alias("trace")))
    r, code = gate(base, other)
    assert code == 2
    assert "share no" in one_error_line(r)


def test_unknown_and_non_numeric_metrics(base):
    r, code = gate(base, base, "--metric", "ept_exit")
    assert code == 2
    assert 'did you mean "ept_exits"' in one_error_line(r)
    r, code = gate(base, base, "--metric", "policy")
    assert code == 2
    assert "not a numeric column" in one_error_line(r)


def test_negative_threshold_and_unknown_format_are_usage_errors(base):
    assert gate(base, base, "--max-increase", -1)[1] == 2
    assert gate(base, base, "--format", "yaml")[1] == 2


def test_duplicate_cells_are_refused(base, variant):
    doubled = variant(lambda df: pl.concat([df, df.head(1)]))
    r, code = gate(base, doubled)
    assert code == 2
    assert "appears 2 times" in one_error_line(r)
