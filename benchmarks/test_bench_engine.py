"""pytest-benchmark suites (``make bench``): kernel and end-to-end replay, compile excluded.

Not part of ``make test``: timings depend on the machine and are reported, never asserted.
"""

from __future__ import annotations

import pytest

from altp2m_replay import generate, traces, unit
from altp2m_replay.engine import Replayer
from altp2m_replay.policy import load_policy

ROWS = 4_000_000


@pytest.fixture(scope="module")
def bench_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "kernel.parquet"
    generate.generate("kernel", ROWS, seed=7, vcpus=4, output=path)
    tr = traces.open_trace(path)
    stats, facts = traces.trace_facts(path, page_counts=False)
    batches = list(tr.batches(columns=("gfn", "access", "vcpu", "insn", "ip")))
    return path, facts, stats, batches


def _kernel_run(policy, facts, stats, batches):
    rep = Replayer(policy, facts, stats.vcpus, stats.rows)
    for b in batches:
        rep.feed(b.gfn, b.access, b.vcpu, b.insn, None, start_row=b.start, ip=b.ip)
    return rep.finish()


@pytest.mark.parametrize("name", ["none", "xen-access-altp2m-write", "hvmi-ve-pagetables"])
def test_kernel(benchmark, bench_trace, name):
    _path, facts, stats, batches = bench_trace
    policy = load_policy(name)
    _kernel_run(policy, facts, stats, batches[:1])  # compile or load from cache, not timed
    res = benchmark.pedantic(
        _kernel_run, args=(policy, facts, stats, batches), rounds=3, iterations=1
    )
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["rows_per_s"] = ROWS / benchmark.stats.stats.mean
    assert res.total["records"] == ROWS


def test_end_to_end(benchmark, bench_trace):
    path = bench_trace[0]
    policy = load_policy("xen-access-altp2m-write")
    unit.replay_trace(path, [policy], {}, None, None)  # warm-up
    cells = benchmark.pedantic(
        unit.replay_trace, args=(path, [policy], {}, None, None), rounds=3, iterations=1
    )
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["rows_per_s"] = ROWS / benchmark.stats.stats.mean
    assert cells[0].records == ROWS
