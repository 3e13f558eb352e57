"""Policies of one trace replayed side by side in threads (SPEC §13): the same bytes in every
output table whatever the thread count, the sequential order's errors, no thread left behind,
and the --jobs / --threads defaults."""

from __future__ import annotations

import hashlib
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from altp2m_replay import run
from altp2m_replay.cli import main
from altp2m_replay.errors import ReplayRuntimeError, TraceError
from altp2m_replay.policy import builtin_names, load_policy
from altp2m_replay.results import TABLES
from altp2m_replay.traces import write_trace

BUILTIN = builtin_names()


def _digests(out: Path) -> dict[str, str]:
    return {name: hashlib.sha256((out / f"{name}.parquet").read_bytes()).hexdigest() for name in TABLES}


def _workers_alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("replay-", "prefetch"))]


@pytest.fixture(scope="module")
def jit_trace(tmp_path_factory) -> Path:
    """Code written then executed on 3 vCPUs: exercises the exec and W^X policies too."""
    path = tmp_path_factory.mktemp("jit") / "jit.parquet"
    result = CliRunner().invoke(main, ["trace", "generate", "jit", "-n", "12000", "--seed", "3",
                                       "--vcpus", "3", "-o", str(path)])
    assert result.exit_code == 0, result.output
    return path


def test_there_are_ten_builtin_policies():
    assert len(BUILTIN) == 10  # the side-by-side tests below cover every one of them


@pytest.mark.parametrize("which", ["kernel", "jit"])
def test_thread_count_does_not_change_any_output_table(which, kernel_trace, jit_trace, tmp_path):
    trace = kernel_trace if which == "kernel" else jit_trace
    # small batches: many hand-overs, so lanes run ahead of and behind each other
    digests = {}
    for threads in (1, 2, 3, 4, 10):
        out = tmp_path / f"t{threads}"
        m = run.replay([trace], BUILTIN, out, jobs=1, threads=threads, html=False, batch_rows=997)
        assert m["timings"]["threads"] == threads
        digests[threads] = _digests(out)
    for threads, d in digests.items():
        assert d == digests[1], threads
    assert _workers_alive() == []


def test_threads_inside_processes_give_the_same_bytes(kernel_trace, jit_trace, tmp_path):
    pols = ["xen-access-altp2m-write", "hvmi-ve-pagetables", "codemon-flip", "split-rx"]
    run.replay([kernel_trace, jit_trace], pols, tmp_path / "seq", jobs=1, threads=1, html=False)
    run.replay([kernel_trace, jit_trace], pols, tmp_path / "par", jobs=2, threads=2, html=False)
    assert _digests(tmp_path / "seq") == _digests(tmp_path / "par")


def test_replay_trace_cells_come_back_in_policy_order(kernel_trace):
    pols = [load_policy(n) for n in reversed(BUILTIN)]
    cells = run.replay_trace(kernel_trace, pols, {}, None, None, batch_rows=4096, threads=3)
    assert [c.policy for c in cells] == [p.name for p in pols]
    assert all(c.records == 20_000 for c in cells)


# --------------------------------------------------------------------------- errors
# Two policies that each stop at one unmatched write: "a" at the write to 0x300 (row 40),
# "b" at the write to 0x500 (row 10).
PARTIAL = '''
    name = "{name}"
    [domain]
    altp2m = false
    [[setup]]
    op = "set_mem_access"
    view = 0
    gfns = [0x300, 0x5ff]
    access = "rx"
    [[on_violation]]
    kind = "w"
    gfns = [{covered}, {covered}]
    action = "set-access"
    access = "rwx"
    '''


def _partial(tmp_path: Path, name: str, covered: int):
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(PARTIAL.format(name=name, covered=hex(covered))).lstrip(),
                    encoding="utf-8")
    return load_policy(str(path))


def _write_trace(tmp_path: Path, bad_tsc_row: int | None = None) -> Path:
    n = 64
    gfn = np.full(n, 0x200, np.uint64)
    access = np.ones(n, np.uint8)
    gfn[10], access[10] = 0x500, 2
    gfn[40], access[40] = 0x300, 2
    tsc = np.arange(n, dtype=np.uint64) * 10 + 100
    if bad_tsc_row is not None:
        tsc[bad_tsc_row] = 1  # goes backwards: a trace value error found while replaying
    return write_trace({"gfn": gfn, "access": access, "tsc": tsc}, tmp_path / "two-errors.parquet")


def _error(trace, pols, batch_rows, threads):
    with pytest.raises((ReplayRuntimeError, TraceError)) as info:
        run.replay_trace(trace, pols, {}, None, None, batch_rows=batch_rows, threads=threads)
    assert _workers_alive() == []
    return type(info.value), str(info.value)


@pytest.mark.parametrize("threads", [2, 3, 4])
@pytest.mark.parametrize("batch_rows, row, policy", [
    (8, 10, "b"),    # different batches: the earlier batch's error, whatever the policy order
    (64, 40, "a"),   # one batch: the first policy's error, as one after the other
])
def test_a_worker_error_is_the_sequential_order_error(threads, batch_rows, row, policy, tmp_path):
    trace = _write_trace(tmp_path)
    # with two threads "b" is in the first lane and "a" in the second
    pols = [load_policy("baseline"), _partial(tmp_path, "a", 0x500), _partial(tmp_path, "b", 0x300),
            load_policy("none")]
    expected = _error(trace, pols, batch_rows, 1)
    assert expected[0] is ReplayRuntimeError
    assert f"row {row}:" in expected[1] and f"policy {policy!r}" in expected[1]
    assert str(trace) in expected[1]
    assert _error(trace, pols, batch_rows, threads) == expected


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("bad_row, raised", [(3, TraceError), (50, ReplayRuntimeError)])
def test_a_trace_value_error_and_a_replay_error_come_in_row_order(threads, bad_row, raised, tmp_path):
    # the bad tsc is checked when its batch is decoded, before any policy replays that batch
    trace = _write_trace(tmp_path, bad_tsc_row=bad_row)
    pols = [load_policy("none"), _partial(tmp_path, "b", 0x300), load_policy("baseline")]
    kind, message = _error(trace, pols, 8, threads)
    assert kind is raised
    assert (f"row {bad_row}" if raised is TraceError else "row 10:") in message


def test_an_interrupt_stops_every_worker(kernel_trace):
    pols = [load_policy(n) for n in BUILTIN]
    calls = []

    def progress(rows):
        calls.append(rows)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run.replay_trace(kernel_trace, pols, {}, None, None, batch_rows=500, progress=progress, threads=3)
    assert len(calls) == 3
    assert _workers_alive() == []


# --------------------------------------------------------------------------- defaults
@pytest.mark.parametrize("traces, jobs, explicit, threads, cores, expected", [
    (1, 1, False, None, 2, (1, 2)),    # replay BIG -p a -p b -p c: one process, two threads
    (5, 2, False, None, 2, (1, 1)),    # replay corpus/ -p a: two processes of one thread
    (2, 2, False, None, 8, (1, 4)),    # two traces on eight cores: 2 processes x 4 threads
    (1, 2, True, None, 2, (2, 1)),     # an explicit --jobs 2 on one trace splits its policies
    (1, 1, True, None, 2, (1, 2)),     # --jobs 1 still uses the cores through threads
    (1, 1, False, 3, 2, (1, 3)),       # an explicit --threads is taken as given
    (0, 1, False, None, 2, (1, 2)),    # everything resumed: nothing to run
])
def test_plan_workers(traces, jobs, explicit, threads, cores, expected):
    assert run.plan_workers(traces, jobs, explicit, threads, cores) == expected


def test_help_says_how_jobs_and_threads_combine():
    result = CliRunner().invoke(main, ["replay", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--threads" in text and "--jobs" in text and "jobs x threads" in text
