"""report.html of a small fixed run, byte for byte against a committed snapshot.

The page is a pure function of the output folder, so any change to the template, the
formatting or the charts shows up here as a diff to review. When the change is meant,
rewrite the snapshot and commit it:

    UPDATE_SNAPSHOTS=1 pytest tests/test_report_snapshot.py

The run: two generated traces (one without ``tsc``, so its overview column shows cycles
per record) under three built-in policies, one of which livelocks. What the manifest
records about this machine and this moment (absolute paths, the command line, timings)
and the input files' sizes and digests (their Parquet bytes depend on the Parquet
writer's version) are set to fixed values before rendering, so the page depends only on
the replay's results, the tool's version and the report code.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import polars as pl
from click.testing import CliRunner

from altp2m_replay.cli import main
from altp2m_replay.report import render_html

SNAPSHOT = Path(__file__).parent / "snapshots" / "small-report.html"
POLICIES = ("none", "split-rx", "xen-access-altp2m-write")
DIFF_LINES = 40  # lines of unified diff in a failure message


def cli(*args) -> None:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output


def _small_run(root: Path) -> Path:
    cli(
        "trace",
        "generate",
        "kernel",
        "-n",
        600,
        "--seed",
        5,
        "--vcpus",
        2,
        "-o",
        root / "kern.parquet",
    )
    cli("trace", "generate", "jit", "-n", 400, "--seed", 2, "-o", root / "jit.parquet")
    pl.read_parquet(root / "jit.parquet").drop("tsc").write_parquet(root / "notsc.parquet")
    args = ["replay", root / "kern.parquet", root / "notsc.parquet", "--window", 50]
    for p in POLICIES:
        args += ["-p", p]
    cli(*args, "--jobs", 1, "--no-html", "-o", root / "out")
    out = root / "out"
    mpath = out / "manifest.json"
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    manifest["command"] = "altp2m-replay replay kern.parquet notsc.parquet " + " ".join(
        f"-p {p}" for p in POLICIES
    )
    for entry in manifest["inputs"]:
        entry["path"] = f"{entry['trace']}.parquet"
        entry["bytes"] = 1000
        entry["sha256"] = "0" * 64
    for cell in manifest["cells"]:
        cell["seconds"] = 0.001
    manifest["timings"].update(seconds=0.25, records_per_second=8000)
    mpath.write_text(json.dumps(manifest), encoding="utf-8")
    return out


def _first_difference(expected: str, actual: str) -> str:
    diff = difflib.unified_diff(
        expected.splitlines(),
        actual.splitlines(),
        fromfile=f"{SNAPSHOT.name} (committed)",
        tofile=f"{SNAPSHOT.name} (rendered now)",
        lineterm="",
        n=2,
    )
    lines = list(diff)
    shown = "\n".join(line[:200] for line in lines[:DIFF_LINES])
    more = f"\n… {len(lines) - DIFF_LINES} more diff lines" if len(lines) > DIFF_LINES else ""
    return shown + more


def test_small_report_matches_the_snapshot(tmp_path):
    page = render_html(_small_run(tmp_path))
    assert str(tmp_path) not in page  # nothing of this machine's paths in the page
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_bytes(page.encode("utf-8"))
    assert SNAPSHOT.exists(), (
        f"no snapshot at tests/snapshots/{SNAPSHOT.name}: write it with "
        "UPDATE_SNAPSHOTS=1 pytest tests/test_report_snapshot.py and commit it"
    )
    expected = SNAPSHOT.read_bytes().decode("utf-8")
    assert page.encode("utf-8") == SNAPSHOT.read_bytes(), (
        "report.html differs from the committed snapshot; if the change is meant, rerun with "
        "UPDATE_SNAPSHOTS=1 and commit tests/snapshots/"
        + SNAPSHOT.name
        + ". First differences:\n"
        + _first_difference(expected, page)
    )


def test_the_snapshot_run_covers_what_the_report_shows():
    """The snapshot is worth keeping only if it exercises the overview's cases."""
    page = SNAPSHOT.read_text(encoding="utf-8")
    overview = page[page.index('id="overview"') : page.index('id="alerts"')]
    assert "slowdown</span>" in overview and "cycles / record</span>" in overview
    assert "✕ livelock @" in overview and 'aria-label="cheapest">✓</span>' in overview
    for anchor in ("trace-kern", "trace-notsc"):
        assert f'href="#{anchor}"' in overview and f'id="{anchor}"' in page
    assert "/tmp/" not in page and "/home/" not in page and "/work/" not in page
