"""Processes (issue 12, docs/reliability.md "Folders and processes"), with real processes and
signals: no orphaned workers when the main process is killed, one Error line when a worker
dies, Ctrl-C prompt with one line and resumable cells, one run per folder at a time; and a
Dask run sends each trace's checked facts once, not once per policy."""

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

from altp2m_replay import executors, generate, run
from altp2m_replay.outdir import LOCK, TABLES

POLICIES = ("xen-access-altp2m-write", "codemon-flip")
PROMPT = 5.0  # seconds: generous bound for "promptly"


# --------------------------------------------------------------------------- helpers
def children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and alive(int(d.name)):
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def workers(pid: int) -> list[int]:
    """The worker processes of a run (spawned interpreters)."""
    found = []
    for c in children(pid):
        try:
            cmd = Path(f"/proc/{c}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmd:
            found.append(c)
    return found


def wait_for(cond, timeout: float, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    return cond()


def all_gone(pids, timeout: float) -> list[int]:
    """The pids still alive after ``timeout`` seconds (an empty list: all gone)."""
    wait_for(lambda: not any(alive(p) for p in pids), timeout)
    return [p for p in pids if alive(p)]


def replay_cmd(traces: Path, out: Path, *extra, html: bool = False) -> list[str]:
    args = [sys.executable, "-m", "altp2m_replay", "replay", str(traces)]
    for p in POLICIES:
        args += ["-p", p]
    return [*args, *([] if html else ["--no-html"]), "-o", str(out), *map(str, extra)]


def start(cmd) -> subprocess.Popen:
    # a session of its own: signals can go to the whole group, as a terminal's Ctrl-C does
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def finished_cells(out: Path) -> list[str]:
    cells = out / ".cells"
    return (
        sorted(p.name for p in cells.iterdir() if not p.name.startswith("."))
        if cells.is_dir()
        else []
    )


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """Two 2 M-row traces: long enough to be interrupted in the middle."""
    d = tmp_path_factory.mktemp("big")
    generate.generate("kernel", 2_000_000, seed=8, vcpus=2, output=d / "a.parquet")
    generate.generate("kernel", 2_000_000, seed=9, vcpus=2, output=d / "b.parquet")
    return d


@pytest.fixture(scope="module")
def fresh(big, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fresh")
    run.replay([big], list(POLICIES), out, jobs=1, html=False)
    return out


def same_tables(a: Path, b: Path) -> None:
    for t in TABLES:
        assert pl.read_parquet(a / f"{t}.parquet").equals(pl.read_parquet(b / f"{t}.parquet")), t


# --------------------------------------------------------------------------- orphans
WATCHED = """
import os, sys, time
from altp2m_replay.executors import Processes
if __name__ == "__main__":
    pool = Processes(2)
    for _ in pool.submit_all(time.sleep, [600, 600]):
        pass
"""


def test_workers_exit_when_their_parent_is_killed(tmp_path):
    """A parent whose two workers each sleep for ten minutes is killed (SIGKILL, as the OOM
    killer does): the workers notice and exit, instead of sleeping on as orphans."""
    script = tmp_path / "parent.py"
    script.write_text(WATCHED)
    parent = start([sys.executable, str(script)])
    pids = []
    try:
        pids = wait_for(lambda: len(workers(parent.pid)) == 2 and workers(parent.pid), 60)
        assert pids, parent.stderr.read() if parent.poll() is not None else "no workers"
        time.sleep(0.5)  # both are sleeping in their task now
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        assert all_gone(pids, PROMPT) == []
    finally:
        parent.kill()
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)


def test_killing_a_replay_leaves_no_worker_running(big, tmp_path):
    proc = start(replay_cmd(big, tmp_path / "out", "--jobs", 2))
    pids = wait_for(lambda: len(workers(proc.pid)) == 2 and workers(proc.pid), 60)
    assert pids, proc.communicate()[1]
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert all_gone(pids, PROMPT) == []


def test_a_worker_that_dies_is_one_error_line(big, tmp_path):
    out = tmp_path / "out"
    proc = start(replay_cmd(big, out, "--jobs", 2))
    pids = wait_for(lambda: len(workers(proc.pid)) == 2 and workers(proc.pid), 60)
    assert pids, proc.communicate()[1]
    time.sleep(0.5)
    os.kill(pids[0], signal.SIGKILL)  # as the OOM killer would
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(
        "Error: a worker process died (killed by SIGKILL), often for lack of memory; "
    ), lines[0]
    assert "Traceback" not in err and "BrokenProcessPool" not in err
    assert all_gone(pids, PROMPT) == []
    assert not (out / "summary.parquet").exists()
    # what finished is kept for --resume, which completes the run
    r = subprocess.run(
        replay_cmd(big, out, "--jobs", 2, "--resume"), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------- Ctrl-C
@pytest.mark.parametrize("jobs", [1, 2])
def test_ctrl_c_is_one_line_prompt_and_resumable(big, fresh, tmp_path, jobs):
    out = tmp_path / "out"
    proc = start(replay_cmd(big, out, "--jobs", jobs))
    assert wait_for(lambda: finished_cells(out) or proc.poll() is not None, 180)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    pids = workers(proc.pid)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # to the whole group, workers too, as a terminal does
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - t0
    assert took < PROMPT, f"took {took:.1f} s to stop"
    assert proc.returncode == 130, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: interrupted; "), err
    kept = finished_cells(out)
    assert kept and f"{len(kept)} finished cell" in lines[0] and "--resume" in lines[0]
    assert all_gone(pids, PROMPT) == []
    assert not (out / "summary.parquet").exists()
    assert not (out / LOCK).exists()
    r = subprocess.run(
        replay_cmd(big, out, "--jobs", jobs, "--resume"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["timings"]["resumed_cells"] >= len(kept)
    same_tables(out, fresh)


# --------------------------------------------------------------------------- one run per folder
def test_a_second_run_while_the_first_writes_is_refused(big, fresh, tmp_path):
    out = tmp_path / "out"
    first = start(replay_cmd(big, out, "--jobs", 1))
    assert wait_for(lambda: (out / LOCK).exists() or first.poll() is not None, 60)
    second = subprocess.run(
        replay_cmd(big, out, "--jobs", 1), capture_output=True, text=True, timeout=120
    )
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 2, second.stderr
    assert second.stderr == (
        f"Error: {out}: another run is writing into this folder "
        f"(pid {first.pid}); wait for it to finish or choose another folder\n"
    )
    same_tables(out, fresh)


# --------------------------------------------------------------------------- Dask
def test_dask_sends_each_trace_facts_once(tmp_path, monkeypatch):
    """Policies that need page counts: each replay unit on the cluster takes its trace's
    checked facts as a future (computed and kept on a worker), not as data from the client."""
    from distributed import Future, LocalCluster

    corpus = tmp_path / "c"
    corpus.mkdir()
    generate.generate("kernel", 20_000, seed=3, vcpus=2, output=corpus / "k.parquet")
    generate.generate("jit", 20_000, seed=4, vcpus=2, output=corpus / "j.parquet")
    pols = ["codemon-flip", "split-rx", "memaccess-write"]  # each needs page counts
    sent = []
    real = executors.Dask.submit_all

    def spy(self, fn, items):
        sent.extend(items)
        return real(self, fn, items)

    monkeypatch.setattr(executors.Dask, "submit_all", spy)
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        protocol="tcp",
        host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:
        run.replay(
            [corpus], pols, tmp_path / "dask", scheduler=cluster.scheduler_address, html=False
        )
    assert len(sent) == 2 * len(pols)  # one unit per trace x policy on a cluster
    facts = [u[6] for u in sent]
    assert all(isinstance(f, Future) for f in facts), [type(f) for f in facts]
    assert len({f.key for f in facts}) == 2  # one per trace
    run.replay([corpus], pols, tmp_path / "local", jobs=1, html=False)
    same_tables(tmp_path / "dask", tmp_path / "local")


# --------------------------------------------------------------------------- killed at any moment
def test_a_replay_killed_at_any_moment_leaves_one_runs_files(tmp_path):
    """SIGKILL a replay into a folder holding an earlier run's output, at moments from its
    last cell being stored to past its end (the span in which it replaces the files): the
    folder then shows the earlier run's files or the new run's, never a mix, and its report
    (if any) is of the same run; `compare` refuses only a switch left half done, which
    `report` finishes."""
    corpus = tmp_path / "c"
    corpus.mkdir()
    generate.generate("kernel", 200_000, seed=5, vcpus=2, output=corpus / "k.parquet")
    earlier, later = tmp_path / "earlier", tmp_path / "later"
    run.replay([corpus], ["baseline"], earlier, jobs=1)
    run.replay([corpus], list(POLICIES), later, jobs=1)
    seen = set()
    for k, delay in enumerate((0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.8, 3.0)):
        out = tmp_path / f"out{k}"
        run.replay([corpus], ["baseline"], out, jobs=1)
        proc = start(replay_cmd(corpus, out, "--jobs", 1, html=True))
        assert wait_for(lambda: len(finished_cells(out)) == 3 or proc.poll() is not None, 120)  # noqa: B023
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        r = subprocess.run(
            [sys.executable, "-m", "altp2m_replay", "compare", str(out), str(out)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if r.returncode != 0:
            assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
            assert "a replay was stopped while replacing its files" in r.stderr
            r = subprocess.run(
                [sys.executable, "-m", "altp2m_replay", "report", str(out)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert r.returncode == 0, r.stderr
            seen.add("half switched")
        policies = {p["name"] for p in json.loads((out / "manifest.json").read_text())["policies"]}
        which = "later" if policies == set(POLICIES) else "earlier"
        same_tables(out, later if which == "later" else earlier)
        seen.add(which)
        if (out / "report.html").exists():  # the report, when there is one, is of the same run
            assert ("codemon-flip" in (out / "report.html").read_text(encoding="utf-8")) == (
                which == "later"
            )
    assert {"earlier", "later"} <= seen, seen  # kills landed before and after the switch


def test_a_dask_worker_that_dies_is_one_error_line(big, tmp_path):
    """A Dask worker killed mid-cell (no retries allowed) ends the run with one Error line
    through the CLI's path (WorkerLost, exit 1), not a KilledWorker traceback."""
    import threading

    import dask
    from distributed import Client, LocalCluster

    from altp2m_replay.errors import WorkerLost

    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            protocol="tcp",
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster.scheduler_address) as client,
    ):
        (pid,) = client.run(os.getpid).values()
        caught = []

        def go():
            try:
                run.replay(
                    [big],
                    list(POLICIES),
                    tmp_path / "out",
                    scheduler=cluster.scheduler_address,
                    html=False,
                )
            except BaseException as exc:
                caught.append(exc)

        t = threading.Thread(target=go)
        t.start()
        assert wait_for(lambda: any(client.processing().values()), 120)
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        t.join(120)
    assert len(caught) == 1 and isinstance(caught[0], WorkerLost), caught
    assert str(caught[0]).startswith("a Dask worker died, often for lack of memory ("), caught[0]
    assert "\n" not in str(caught[0])


def test_ctrl_c_during_the_switch_waits_for_its_end(tmp_path):
    """SIGINT arriving while the files are being moved in is held until the last move."""
    from altp2m_replay import outdir

    moved = []
    with pytest.raises(KeyboardInterrupt), outdir.interrupts_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # a handler that raised would have raised by now
        moved.append("all")
    assert moved == ["all"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
