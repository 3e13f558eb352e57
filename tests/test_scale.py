"""Scale-out paths give the same tables as a plain run: processes, a real Dask cluster over TCP,
resumed runs, and a run killed half-way then resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from altp2m_replay import generate, run
from altp2m_replay.results import TABLES

POLICIES = ["xen-access-altp2m-write", "hvmi-ve-pagetables", "split-rx"]
TIMING = {"seconds"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    generate.generate("kernel", 30_000, seed=3, vcpus=2, output=d / "k.parquet")
    generate.generate("jit", 20_000, seed=4, vcpus=3, output=d / "j.parquet")
    generate.generate("scan", 10_000, seed=5, vcpus=1, output=d / "s.parquet")
    return d


def tables(out: Path) -> dict[str, pl.DataFrame]:
    return {name: pl.read_parquet(out / f"{name}.parquet") for name in TABLES}


def assert_same(a: Path, b: Path) -> None:
    ta, tb = tables(a), tables(b)
    for name in TABLES:
        assert ta[name].shape[0] > 0
        assert ta[name].equals(tb[name]), f"{name} differs"


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    run.replay([corpus], POLICIES, out, jobs=1, html=False)
    return out


def test_processes_match_one_process(corpus, reference_run, tmp_path):
    run.replay([corpus], POLICIES, tmp_path, jobs=2, html=False)
    assert_same(reference_run, tmp_path)


def test_dask_cluster_over_tcp_matches_local(corpus, reference_run, tmp_path):
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        protocol="tcp",
        host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        manifest = run.replay(
            [corpus], POLICIES, tmp_path, scheduler=cluster.scheduler_address, html=False
        )
    assert manifest["timings"]["scheduler"].startswith("tcp://")
    assert_same(reference_run, tmp_path)


def test_resume_skips_finished_cells_and_keeps_results(corpus, reference_run, tmp_path):
    run.replay([corpus], POLICIES, tmp_path, jobs=1, html=False)
    again = run.replay([corpus], POLICIES, tmp_path, jobs=1, html=False, resume=True)
    assert again["timings"]["resumed_cells"] == 9
    assert_same(reference_run, tmp_path)
    # a changed cost invalidates the stored cells: they are computed again
    third = run.replay(
        [corpus],
        POLICIES,
        tmp_path,
        jobs=1,
        html=False,
        resume=True,
        cost_overrides={"ept_exit": 1.0},
    )
    assert third["timings"]["resumed_cells"] == 0


def test_killed_run_resumes_without_losing_cells(tmp_path):
    """Interrupt a run after its first cells are stored; the rerun with --resume reuses them
    and its tables equal an uninterrupted run's. A hard kill (SIGKILL) mid-write may leave a
    temporary cell folder: the next run removes it and never reads it."""
    corpus = tmp_path / "c"
    corpus.mkdir()
    generate.generate("kernel", 2_000_000, seed=8, vcpus=2, output=corpus / "a.parquet")
    generate.generate("kernel", 2_000_000, seed=9, vcpus=2, output=corpus / "b.parquet")
    out = tmp_path / "out"
    base = [
        sys.executable,
        "-m",
        "altp2m_replay",
        "replay",
        str(corpus),
        "-p",
        "xen-access-altp2m-write",
        "-p",
        "codemon-flip",
        "--jobs",
        "1",
        "--no-html",
    ]
    cmd = [*base, "-o", str(out)]
    cells = out / ".cells"

    def finished() -> list[str]:
        return (
            sorted(p.name for p in cells.iterdir() if p.is_dir() and not p.name.startswith("."))
            if cells.is_dir()
            else []
        )

    for sig in (signal.SIGINT, signal.SIGKILL):
        proc = subprocess.Popen(
            cmd + (["--resume"] if sig == signal.SIGKILL else []),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.time() + 120
        while time.time() < deadline and not finished() and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert finished(), f"no cell was stored before the signal: {err.decode()[-500:]}"
        if proc.returncode != 0:
            # interrupted before the end: no final table of a partial run
            assert not (out / "summary.parquet").exists() or sig == signal.SIGKILL
        if sig == signal.SIGKILL:
            break
        (out / "summary.parquet").unlink(missing_ok=True)
    stored = finished()
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert not [p.name for p in cells.iterdir() if p.name.startswith(".")], (
        "stale temporary cell left"
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["timings"]["resumed_cells"] >= len(stored)
    fresh = tmp_path / "fresh"
    subprocess.run([*base, "-o", str(fresh)], check=True, capture_output=True, timeout=300)
    assert_same(fresh, out)
    assert os.path.getsize(out / "summary.parquet") > 0
