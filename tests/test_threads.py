"""Policies of one trace replayed side by side in threads (SPEC §13): the same bytes in every
output table whatever the thread count, the sequential order's errors, no thread left behind,
and the --jobs / --threads defaults."""

from __future__ import annotations

import hashlib
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from altp2m_replay import executors, run, unit
from altp2m_replay.bench import format_bench, run_bench
from altp2m_replay.cli import main
from altp2m_replay.errors import ReplayRuntimeError, TraceError
from altp2m_replay.policy import builtin_names, load_policy
from altp2m_replay.prefetch import side_by_side
from altp2m_replay.results import TABLES
from altp2m_replay.traces import write_trace

BUILTIN = builtin_names()


def _digests(out: Path) -> dict[str, str]:
    return {
        name: hashlib.sha256((out / f"{name}.parquet").read_bytes()).hexdigest() for name in TABLES
    }


def _workers_alive() -> list[str]:
    return [
        t.name for t in threading.enumerate() if t.name.startswith(("side-by-side-", "prefetch"))
    ]


@pytest.fixture(scope="module")
def jit_trace(tmp_path_factory) -> Path:
    """Code written then executed on 3 vCPUs: exercises the exec and W^X policies too."""
    path = tmp_path_factory.mktemp("jit") / "jit.parquet"
    result = CliRunner().invoke(
        main,
        ["trace", "generate", "jit", "-n", "12000", "--seed", "3", "--vcpus", "3", "-o", str(path)],
    )
    assert result.exit_code == 0, result.output
    return path


def test_there_are_at_least_ten_builtin_policies():
    assert (
        len(BUILTIN) >= 10
    )  # the side-by-side tests below cover every one of them (SPEC §13: ten)


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
    cells = unit.replay_trace(kernel_trace, pols, {}, None, None, batch_rows=4096, threads=3)
    assert [c.policy for c in cells] == [p.name for p in pols]
    # every cell replays the whole trace, but for a policy that hangs the guest (split-rx
    # livelocks on this trace: SPEC §5), whose replay stops at the livelock
    for c in cells:
        livelocked = c.tables["summary"].filter(pl.col("vcpu") == -1)["livelocked"][0]
        assert c.records == 20_000 or livelocked == 1, c.policy


# --------------------------------------------------------------------------- errors
# Two policies that each stop at one unmatched write: "a" at the write to 0x300 (row 40),
# "b" at the write to 0x500 (row 10).
PARTIAL = """
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
    """


def _partial(tmp_path: Path, name: str, covered: int):
    path = tmp_path / f"{name}.toml"
    path.write_text(
        textwrap.dedent(PARTIAL.format(name=name, covered=hex(covered))).lstrip(), encoding="utf-8"
    )
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
        unit.replay_trace(trace, pols, {}, None, None, batch_rows=batch_rows, threads=threads)
    assert _workers_alive() == []
    return type(info.value), str(info.value)


@pytest.mark.parametrize("threads", [2, 3, 4])
@pytest.mark.parametrize(
    ("batch_rows", "row", "policy"),
    [
        (8, 10, "b"),  # different batches: the earlier batch's error, whatever the policy order
        (64, 40, "a"),  # one batch: the first policy's error, as one after the other
    ],
)
def test_a_worker_error_is_the_sequential_order_error(threads, batch_rows, row, policy, tmp_path):
    trace = _write_trace(tmp_path)
    pols = [
        load_policy("baseline"),
        _partial(tmp_path, "a", 0x500),
        _partial(tmp_path, "b", 0x300),
        load_policy("none"),
    ]
    expected = _error(trace, pols, batch_rows, 1)
    assert expected[0] is ReplayRuntimeError
    assert f"row {row}:" in expected[1] and f"policy {policy!r}" in expected[1]
    assert str(trace) in expected[1]
    assert _error(trace, pols, batch_rows, threads) == expected


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("bad_row", "raised"), [(3, TraceError), (50, ReplayRuntimeError)])
def test_a_trace_value_error_and_a_replay_error_come_in_row_order(
    threads, bad_row, raised, tmp_path
):
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
        unit.replay_trace(
            kernel_trace, pols, {}, None, None, batch_rows=500, progress=progress, threads=3
        )
    assert len(calls) == 3
    assert _workers_alive() == []


# --------------------------------------------------------------------------- defaults
@pytest.mark.parametrize(
    ("traces", "jobs", "explicit", "threads", "cores", "expected"),
    [
        (1, 1, False, None, 2, (1, 2)),  # replay BIG -p a -p b -p c: one process, two threads
        (5, 2, False, None, 2, (1, 1)),  # replay corpus/ -p a: two processes of one thread
        (2, 2, False, None, 8, (1, 4)),  # two traces on eight cores: 2 processes x 4 threads
        (1, 2, True, None, 2, (2, 1)),  # an explicit --jobs 2 on one trace splits its policies
        (1, 1, True, None, 2, (1, 2)),  # --jobs 1 still uses the cores through threads
        (1, 1, False, 3, 2, (1, 3)),  # an explicit --threads is taken as given
        (0, 1, False, None, 2, (1, 2)),  # everything resumed: nothing to run
    ],
)
def test_plan_workers(traces, jobs, explicit, threads, cores, expected):
    assert executors.plan_workers(traces, jobs, explicit, threads, cores) == expected


def test_help_says_how_jobs_and_threads_combine():
    result = CliRunner().invoke(main, ["replay", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--threads" in text and "--jobs" in text and "jobs x threads" in text


# --------------------------------------------------------------------------- side_by_side itself
class _Consumers:
    """Consumers that record what they see; ``fail[i] = (item, seconds)`` makes consumer i
    sleep then raise at that item, ``stop[i]`` makes it want no more after that item."""

    def __init__(self, n, fail=None, stop=None):
        self.seen = [[] for _ in range(n)]
        self.fail = fail or {}
        self.stop = stop or {}

    def feed(self, i, item):
        if i in self.fail and self.fail[i][0] == item:
            time.sleep(self.fail[i][1])
            raise ValueError(f"consumer {i} at item {item}")
        self.seen[i].append(item)
        return self.stop.get(i) == item

    def finish(self, i):
        return (i, list(self.seen[i]))


def _items(n, bad_at=None):
    for k in range(n):
        if k == bad_at:
            raise KeyError(f"item {k}")
        yield k


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_each_consumer_gets_every_item_in_order_and_results_come_in_consumer_order(threads):
    c = _Consumers(5, stop={3: 4})
    out = side_by_side(_items(40), 5, c.feed, c.finish, threads)
    assert out == [(i, list(range(40)) if i != 3 else list(range(5))) for i in range(5)]


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_a_later_item_that_failed_first_in_time_does_not_win(threads):
    # consumer 0 fails at once at item 2; consumer 3 fails at item 1, slowly: the order one
    # consumer after the other raises consumer 3's error
    c = _Consumers(4, fail={0: (2, 0.0), 3: (1, 0.3)})
    with pytest.raises(ValueError, match="consumer 3 at item 1"):
        side_by_side(_items(10), 4, c.feed, c.finish, threads)
    assert _workers_alive() == []


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_within_one_item_the_first_consumer_wins(threads):
    c = _Consumers(4, fail={1: (3, 0.3), 2: (3, 0.0)})
    with pytest.raises(ValueError, match="consumer 1 at item 3"):
        side_by_side(_items(10), 4, c.feed, c.finish, threads)


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize(("bad_at", "error"), [(2, "item 2"), (6, "consumer 0 at item 5")])
def test_an_error_of_the_items_ranks_before_the_consumers_at_that_item(threads, bad_at, error):
    c = _Consumers(3, fail={0: (5, 0.1)})
    with pytest.raises((KeyError, ValueError), match=error):
        side_by_side(_items(10, bad_at=bad_at), 3, c.feed, c.finish, threads)
    assert _workers_alive() == []


@pytest.mark.parametrize("threads", [1, 3])
def test_reading_stops_when_no_consumer_wants_more_unless_read_all(threads):
    read = []

    def items():
        for k in range(50):
            read.append(k)
            yield k

    c = _Consumers(2, stop={0: 3, 1: 5})
    side_by_side(items(), 2, c.feed, c.finish, threads)
    assert len(read) < 50  # stopped early (the reading thread runs a little ahead)
    read.clear()
    side_by_side(
        items(), 2, _Consumers(2, stop={0: 3, 1: 5}).feed, c.finish, threads, read_all=True
    )
    assert read == list(range(50))


@pytest.mark.parametrize("threads", [1, 2])
def test_settle_false_finishes_nothing(threads):
    c = _Consumers(3)
    finished = []
    assert (
        side_by_side(_items(5), 3, c.feed, finished.append, threads, settle=lambda: False) is None
    )
    assert finished == []


# --------------------------------------------------------------------------- bench
def test_bench_reports_every_builtin_policy_side_by_side_and_one_after_the_other():
    r = run_bench(rows=5000, vcpus=2, rounds=2, threads=2, echo=lambda m: None)
    assert r["policies"] == len(BUILTIN) and r["threads"] == 2
    assert r["side_by_side_vs_sequential"] == r["side_by_side_s"] / r["sequential_s"]
    assert r["idle_cores_ratio"] == r["side_by_side_idle_s"] / r["sequential_idle_s"]
    assert r["side_by_side_idle_s"] > 0 and r["sequential_idle_s"] > 0
    assert r["sequential_range_s"][0] == r["sequential_s"] <= r["sequential_range_s"][1]
    text = format_bench(r)
    assert f"{len(BUILTIN)} built-in policies" in text and "side by side, 2 threads" in text
    assert "bar: at most 0.60 on 2 cores" in text and "on otherwise idle cores" in text


def test_bench_threads_zero_skips_the_side_by_side_figure():
    r = run_bench(rows=5000, vcpus=2, rounds=1, threads=0, echo=lambda m: None)
    assert "side_by_side_s" not in r
    assert "side by side" not in format_bench(r)


@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_by_thread_counts_the_consumers_work_in_each_thread(threads):
    spin = 0.02

    def feed(i, item):
        t = time.thread_time()
        while time.thread_time() - t < spin:
            pass
        return False

    cpu: dict[str, float] = {}
    side_by_side(_items(6), 3, feed, lambda i: None, threads, cpu=cpu)
    if threads == 1:
        assert set(cpu) == {"MainThread"}
    else:  # which workers got work depends on scheduling
        assert cpu and set(cpu) <= {f"side-by-side-{w}" for w in range(threads)}
    assert sum(cpu.values()) >= 18 * spin  # 6 items x 3 consumers, each spinning
