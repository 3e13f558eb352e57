"""Hand-derived scenario tests for the replay engines (SPEC §3-§9).

Every expected number in this file was worked out by hand from SPEC.md; the comment above
each expectation shows the derivation. Nothing was computed by running an engine.

Notation used in the derivations:

* ``§5.1`` .. ``§5.8``: the numbered steps of SPEC §5 (1 walk, 2 complete, 3 #VE check,
  4 VM exit, 5 lazy copy, 6 hole / MMIO, 7 access violation, 8 shatter).
* ``exit(V)``: ``ept_exits`` += 1, attributed to view V.
* ``lazy 4K/2M/1G (V)``: a lazy copy into V at that order (``lazy_copies``,
  ``lazy_copies_<order>``, ``lazy_copy_pages`` += 1 / 512 / 262144).
* ``done(V)``: the access completes in V (``records_completed[V]`` += 1).
* ``viol_k (V,g)``: ``access_violations`` += 1 for V and ``viol_k`` for the per-gfn row (V, g).
* ``svm`` / ``sfs`` / ``svf``: ``switches_vm_event`` / ``switches_fast_ss`` /
  ``switches_vmfunc`` (each also ``switches_in`` += 1 for the destination view).
* ``mm``: ``max_mapped`` of a p2m; ``hole(V, g)``: the hole order of SPEC §3.

Unless a test says otherwise: ``ram = [[0, 1023]]`` and ``host_order = 9``, so the host maps
gfns 0-511 and 512-1023 with two 2 MiB leaves of access rwx; xen is 4.22.

The helpers assert *every* counter: a counter a test does not list must be 0 (and
``crash_record`` -1), every view the engine reports but the test does not list must be all
zeros, and the per-gfn table must hold exactly the listed (view, gfn) pairs.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import numpy as np
import pytest

# --------------------------------------------------------------------------- counters (§7)
from reference import GFN_COUNTERS, TOTAL_COUNTERS, VIEW_COUNTERS, reference_simulate

from altp2m_replay.costs import cycles, effective_costs
from altp2m_replay.errors import PolicyError, ReplayRuntimeError
from altp2m_replay.policy import parse_policy

SETUP_ONLY = ("setup_splits", "setup_skipped")

GIB_PAGES = 1 << 18


# --------------------------------------------------------------------------- engines
@dataclass
class Result:
    """One engine's answer, whatever its native shape."""

    total: dict
    vcpus: dict
    views: dict
    gfns: dict


def _num(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def _adapt(raw) -> Result:
    def get(key):
        return raw[key] if isinstance(raw, dict) else getattr(raw, key)

    return Result(
        total={str(k): _num(v) for k, v in get("total").items()},
        vcpus={int(vc): {str(k): _num(v) for k, v in c.items()} for vc, c in get("vcpus").items()},
        views={int(vw): {str(k): _num(v) for k, v in c.items()} for vw, c in get("views").items()},
        gfns={
            (int(vw), int(g)): {str(k): _num(v) for k, v in c.items()}
            for (vw, g), c in get("gfns").items()
        },
    )


ENGINES = ["numba", "numba-batch2", "reference"]


def _runner(request, trace_maker):
    """``run(policy_body, rows, **kwargs) -> Result`` for the engine ``request.param`` names,
    with traces from ``trace_maker(*rows)``."""
    if request.param == "reference":
        engine = reference_simulate
        extra = {}
    else:
        from altp2m_replay.engine import simulate_arrays as engine

        extra = {"batch_rows": 2} if request.param == "numba-batch2" else {}

    def run(policy_body: str, rows, **kwargs) -> Result:
        return _adapt(engine(make_policy(policy_body), trace_maker(*rows), **kwargs, **extra))

    return run


@pytest.fixture(params=ENGINES)
def sim(request):
    """``sim(policy_body, rows, **kwargs) -> Result`` for one engine.

    ``numba-batch2`` is the Numba engine fed two rows per batch: counters must not depend
    on the batch size (SPEC §7), instruction ends and emulated rows included.
    """
    return _runner(request, make_trace)


# --------------------------------------------------------------------------- inputs
def make_policy(body: str):
    return parse_policy('name = "scenario"\n' + textwrap.dedent(body), "test")


KINDS = {"r": 1, "w": 2, "rw": 3, "x": 4, "rx": 5}


def make_trace(*rows: str) -> dict[str, np.ndarray]:
    """Rows like ``"w 5"``, ``"v1 w 0x200"``, ``"v0 i7 rw 5"`` (vCPU, instruction id, kind, gfn).

    ``access`` codes: r 1, w 2, rw 3, x 4, rx 5. A ``vcpu`` column is added when any row
    names a vCPU (others are vCPU 0); an ``insn`` column when rows name instructions (then
    every row must).
    """
    gfn, access, vcpu, insn = [], [], [], []
    for row in rows:
        toks = row.split()
        v, i = 0, None
        while toks[0][0] in "vi" and toks[0][1:].isdigit():
            if toks[0][0] == "v":
                v = int(toks[0][1:])
            else:
                i = int(toks[0][1:])
            toks = toks[1:]
        kind, g = toks
        gfn.append(int(g, 0))
        access.append(KINDS[kind])
        vcpu.append(v)
        insn.append(i)
    out = {"gfn": np.asarray(gfn, dtype=np.uint64), "access": np.asarray(access, dtype=np.uint8)}
    if any(r.split()[0][0] == "v" for r in rows):
        out["vcpu"] = np.asarray(vcpu, dtype=np.uint16)
    if any(i is not None for i in insn):
        assert all(i is not None for i in insn), "either every row names its insn or none"
        out["insn"] = np.asarray(insn, dtype=np.uint64)
    return out


# --------------------------------------------------------------------------- checks
def _full(spec: dict, what: str, nvcpus: int = 1) -> dict:
    unknown = set(spec) - set(TOTAL_COUNTERS)
    assert not unknown, f"test bug: unknown counters {unknown} in {what}"
    out = dict.fromkeys(TOTAL_COUNTERS, 0)
    out["crash_record"] = -1
    out["livelock_record"] = -1
    out.update(spec)
    # The two sums of §7, from the hand-derived parts (unless the test spells them out).
    if "vm_events" not in spec:
        out["vm_events"] = (
            out["mem_access_events"]
            + out["singlestep_events"]
            + out["async_events"]
            + out["breakpoint_events"]
            + out["cr3_events"]
        )
    if "view_switches" not in spec:
        out["view_switches"] = (
            out["switches_vm_event"] + out["switches_fast_ss"] + out["switches_vmfunc"]
        )
    # §5: every lazy copy, shatter, n2rwx async event, monitor response but emulate (to a
    # mem_access or breakpoint event) and #VE agent action but emulate ends its attempt in a
    # restart. Tests with restarts of other causes (rx2rw, no-monitor relax), async CR3
    # events or a livelock spell `restarts` out.
    if "restarts" not in spec:
        out["restarts"] = (
            out["lazy_copies"]
            + out["shatters"]
            + out["async_events"]
            + out["mem_access_events"]
            + out["breakpoint_events"]
            - out["emulations"]
            + out["ve_delivered"]
            - out["ve_emulations"]
        )
    # §5: each sync of a vCPU's step interrupts the trace's other vCPUs.
    if "ept_sync_ipis" not in spec:
        out["ept_sync_ipis"] = out["ept_syncs"] * (nvcpus - 1)
    return out


def _compare(actual: dict, expected: dict, names, what: str) -> list[str]:
    out = []
    for name in names:
        got = actual.get(name, "<missing>")
        if got != expected.get(name, 0):
            out.append(f"{what} {name}: engine {got}, expected {expected.get(name, 0)}")
    return out


def check(res: Result, total: dict, *, vcpus: dict | None = None, views: dict, gfns: dict) -> None:
    """Assert the whole result: totals, every vCPU row, every view, the per-gfn table.

    ``vcpus`` defaults to ``{0: total}`` (single-vCPU trace; setup counters are 0 there).
    """
    errors = []
    nvcpus = len(vcpus) if vcpus is not None else 1
    exp_total = _full(total, "total", nvcpus)
    errors += _compare(res.total, exp_total, TOTAL_COUNTERS, "total")

    if vcpus is None:
        vcpus = {0: {k: v for k, v in total.items() if k not in SETUP_ONLY}}
    if set(res.vcpus) != set(vcpus):
        errors.append(f"vcpus: engine {sorted(res.vcpus)}, expected {sorted(vcpus)}")
    for vc, spec in vcpus.items():
        spec = {
            k: exp_total[k] for k in ("crashed", "crash_record", "livelocked", "livelock_record")
        } | spec
        errors += _compare(
            res.vcpus.get(vc, {}), _full(spec, f"vcpu {vc}", nvcpus), TOTAL_COUNTERS, f"vcpu {vc}"
        )

    for vw, spec in views.items():
        unknown = set(spec) - set(VIEW_COUNTERS)
        assert not unknown, f"test bug: unknown view counters {unknown}"
        errors += _compare(res.views.get(vw, {}), spec, VIEW_COUNTERS, f"view {vw}")
    for vw in set(res.views) - set(views):
        errors += _compare(res.views[vw], {}, VIEW_COUNTERS, f"view {vw} (should be all 0)")

    if set(res.gfns) != set(gfns):
        errors.append(f"gfn rows: engine {sorted(res.gfns)}, expected {sorted(gfns)}")
    for key, spec in gfns.items():
        unknown = set(spec) - set(GFN_COUNTERS)
        assert not unknown, f"test bug: unknown gfn counters {unknown}"
        row = res.gfns.get(key)
        if row is not None:
            errors += _compare(row, spec, GFN_COUNTERS, f"gfn {key}")
    assert not errors, "\n".join(errors)


RAM_1K = """
[domain]
ram = [[0, 1023]]
"""


# =========================================================================== lazy copies (§3, §5.5)
LAZY_KEY = {0: "lazy_copies_4k", 9: "lazy_copies_2m", 18: "lazy_copies_1g"}
LEAF_KEY = {0: "leaves_4k", 9: "leaves_2m", 18: "leaves_1g"}


@pytest.mark.parametrize(
    ("host_order", "ram_last", "gfn", "order"),
    [
        # view 0 is fresh: mm = 0. g = 0 is not above mm, so the tables decide: the root is
        # empty, i.e. the 1 GiB-level entry is empty -> hole 18; order = min(9, 18) = 9.
        (9, 1023, 0, 9),
        # g > mm = 0 and its 1 GiB and 2 MiB regions both start at 0 (not above mm) -> hole 0.
        (9, 1023, 1, 0),
        (9, 1023, 511, 0),
        # g > mm, 2 MiB region [512, 1023] starts above mm -> hole 9; min(9, 9) = 9.
        (9, 1023, 512, 9),
        (9, 1023, 1023, 9),
        # g >= 2^18: its 1 GiB region starts above mm -> hole 18; host leaf is 2M -> 9.
        (9, GIB_PAGES + 1023, GIB_PAGES + 6, 9),
        # host_order 0: every host leaf is 4K -> min(0, anything) = 0.
        (0, 1023, 0, 0),
        (0, 1023, 600, 0),
        # host_order 18 with exactly 1 GiB of RAM: one host 1G leaf.
        (18, GIB_PAGES - 1, 0, 18),  # hole 18 (empty root): the whole GiB is copied
        (18, GIB_PAGES - 1, 5, 0),  # hole 0 -> min(18, 0) = 0
        (18, GIB_PAGES - 1, 600, 9),  # hole 9 -> min(18, 9) = 9
        (18, 2 * GIB_PAGES - 1, GIB_PAGES + 6, 18),  # second GiB: hole 18, host 1G leaf
    ],
)
def test_first_touch_lazy_copy_order_in_fresh_view0(sim, host_order, ram_last, gfn, order):
    res = sim(
        f"""
        [domain]
        host_order = {host_order}
        ram = [[0, {ram_last}]]
        """,
        [f"r {gfn}"],
    )
    # One read in view 0 (altp2m on, every vCPU starts there, default access rwx):
    # §5.1 no leaf -> §5.3 no #VE enabled -> §5.4 exit(0) -> §5.5 lazy copy at `order`
    # (derivation in the parameter list), access rwx -> retry -> §5.2 done(0).
    pages = 1 << order
    check(
        res,
        {
            "records": 1,
            "instructions": 1,
            "ept_exits": 1,
            "lazy_copies": 1,
            LAZY_KEY[order]: 1,
            "lazy_copy_pages": pages,
        },
        views={
            0: {
                "records_completed": 1,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": pages,
                "pages_mapped": pages,
                LEAF_KEY[order]: 1,
            }
        },
        gfns={(0, gfn): {"ept_exits": 1, "lazy_copies": 1}},
    )


def test_hole_order_follows_max_mapped_then_tables(sim):
    res = sim(
        """
        [domain]
        ram = [[0, 2047]]
        """,
        ["r 5", "r 7", "r 600", "r 0", "r 1600", "r 1100", "r 6", "r 700"],
    )
    # Host: four 2M leaves (0-511, 512-1023, 1024-1535, 1536-2047), rwx. All rows in view 0.
    # r 5:    mm 0, 5 > mm, 1G and 2M regions start at 0 -> hole 0 -> lazy 4K; mm = 5.
    # r 7:    7 > 5, regions start at 0 (not above 5) -> 4K; mm = 7.
    # r 600:  600 > 7, 2M region 512 > 7 -> hole 9 -> lazy 2M [512,1023]; mm = 1023.
    # r 0:    0 <= mm: walk; the 4K table of region 0 exists, its entry 0 is empty -> 4K.
    # r 1600: 1600 > 1023, 2M region 1536 > 1023 -> 2M [1536,2047]; mm = 2047.
    # r 1100: 1100 <= mm: walk; 2M-level entry for [1024,1535] is empty -> hole 9 -> 2M.
    # r 6:    walk; 4K entry 6 empty -> 4K.
    # r 700:  covered by the 2M leaf [512,1023] -> §5.2 done, no exit.
    # Each of the first seven: exit(0), lazy, retry, done(0).
    check(
        res,
        {
            "records": 8,
            "instructions": 8,
            "ept_exits": 7,
            "lazy_copies": 7,
            "lazy_copies_4k": 4,
            "lazy_copies_2m": 3,
            "lazy_copy_pages": 4 + 3 * 512,
        },
        views={
            0: {
                "records_completed": 8,
                "ept_exits": 7,
                "lazy_copies": 7,
                "lazy_copy_pages": 1540,
                "pages_mapped": 1540,
                "leaves_4k": 4,
                "leaves_2m": 3,
            }
        },
        gfns={(0, g): {"ept_exits": 1, "lazy_copies": 1} for g in (5, 7, 600, 0, 1600, 1100, 6)},
    )


def test_host_order_0_copies_4k_and_splits_nothing(sim):
    res = sim(
        """
        [domain]
        host_order = 0
        ram = [[0, 1023]]

        [[setup]]
        op = "set_mem_access"
        view = 0
        gfns = 9
        access = "rw"
        """,
        ["r 600", "r 0", "r 1023", "r 600"],
    )
    # Setup: view-0 set_mem_access writes the host's 4K leaf 9 (already 4K: no split,
    # setup_splits 0); view 0 holds nothing, so nothing propagates.
    # r 600: hole(0,600) = 9 (2M region starts above mm 0), host leaf 4K -> min(0,9) = 0:
    #        exit(0), lazy 4K, done(0); mm = 600.
    # r 0:   0 <= mm, walk: 2M-level entry [0,511] empty -> hole 9 -> min(0, 9) = 0: exit, 4K.
    # r 1023: 1023 > 600, regions 0 and 512 not above 600 -> hole 0: exit, 4K.
    # r 600: 4K leaf rwx -> done.
    check(
        res,
        {
            "records": 4,
            "instructions": 4,
            "ept_exits": 3,
            "lazy_copies": 3,
            "lazy_copies_4k": 3,
            "lazy_copy_pages": 3,
        },
        views={
            0: {
                "records_completed": 4,
                "ept_exits": 3,
                "lazy_copies": 3,
                "lazy_copy_pages": 3,
                "pages_mapped": 3,
                "leaves_4k": 3,
            }
        },
        gfns={(0, g): {"ept_exits": 1, "lazy_copies": 1} for g in (600, 0, 1023)},
    )


def test_host_order_18_view0_copies_whole_gigabytes(sim):
    res = sim(
        f"""
        [domain]
        host_order = 18
        ram = [[0, {2 * GIB_PAGES - 1}]]
        """,
        ["r 5", "r 100000", f"r {GIB_PAGES + 600}"],
    )
    # Host: two 1G leaves [0, 2^18-1], [2^18, 2^19-1]. All rows in view 0.
    # r 5:        mm 0, 5 > mm, its 1G and 2M regions start at 0 (not above mm) -> hole 0
    #             -> min(18, 0) = 0: exit(0), lazy 4K; mm = 5.
    # r 100000:   > mm, 1G region 0 not above 5, 2M region 99840 > 5 -> hole 9 ->
    #             min(18, 9) = 9: exit(0), lazy 2M [99840, 100351]; mm = 100351.
    # r 2^18+600: > mm, 1G region 2^18 starts above mm -> hole 18 -> min(18, 18): exit(0),
    #             lazy 1G [2^18, 2^19-1].
    # (gfn 0 of a fresh view is the next test.)
    check(
        res,
        {
            "records": 3,
            "instructions": 3,
            "ept_exits": 3,
            "lazy_copies": 3,
            "lazy_copies_4k": 1,
            "lazy_copies_2m": 1,
            "lazy_copies_1g": 1,
            "lazy_copy_pages": 1 + 512 + GIB_PAGES,
        },
        views={
            0: {
                "records_completed": 3,
                "ept_exits": 3,
                "lazy_copies": 3,
                "lazy_copy_pages": 1 + 512 + GIB_PAGES,
                "pages_mapped": 1 + 512 + GIB_PAGES,
                "leaves_4k": 1,
                "leaves_2m": 1,
                "leaves_1g": 1,
            }
        },
        gfns={(0, g): {"ept_exits": 1, "lazy_copies": 1} for g in (5, 100000, GIB_PAGES + 600)},
    )


def test_host_order_18_gfn0_copies_1g_then_hits(sim):
    res = sim(
        f"""
        [domain]
        host_order = 18
        ram = [[0, {2 * GIB_PAGES - 1}]]
        """,
        ["r 0", "r 100000", f"r {GIB_PAGES + 600}", f"w {2 * GIB_PAGES - 1}"],
    )
    # r 0: mm 0, g not above it; empty root -> hole 18 -> min(18, 18): exit(0), lazy 1G
    #      [0, 2^18-1]; mm = 2^18-1.
    # r 100000: inside the 1G leaf -> done, no exit.
    # r 2^18+600: > mm, 1G region 2^18 starts above mm -> hole 18: exit, lazy 1G.
    # w 2^19-1: inside the second 1G leaf (rwx) -> done.
    pages = 2 * GIB_PAGES
    check(
        res,
        {
            "records": 4,
            "instructions": 4,
            "ept_exits": 2,
            "lazy_copies": 2,
            "lazy_copies_1g": 2,
            "lazy_copy_pages": pages,
        },
        views={
            0: {
                "records_completed": 4,
                "ept_exits": 2,
                "lazy_copies": 2,
                "lazy_copy_pages": pages,
                "pages_mapped": pages,
                "leaves_1g": 2,
            }
        },
        gfns={
            (0, 0): {"ept_exits": 1, "lazy_copies": 1},
            (0, GIB_PAGES + 600): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


def test_host_order_18_declared_view_mixes_all_three_orders(sim):
    res = sim(
        f"""
        [domain]
        host_order = 18
        ram = [[0, {2 * GIB_PAGES - 1}]]

        [[view]]
        name = "v"

        [[setup]]
        op = "switch_p2m"
        view = "v"
        """,
        ["r 5", "r 600", f"r {GIB_PAGES + 3}", "r 1100", "r 2"],
    )
    # All rows in v (index 1, default rwx = host access). Host: two 1G leaves.
    # r 5:      mm 0, 5 > mm, regions start at 0 -> hole 0 -> exit(1), lazy 4K; mm 5.
    # r 600:    > 5, 2M region 512 > 5 -> hole 9 -> min(18, 9) -> exit, lazy 2M; mm 1023.
    # r 2^18+3: > 1023, 1G region 2^18 > 1023 -> hole 18 -> exit, lazy 1G; mm 2^19-1.
    # r 1100:   <= mm: walk; the 2M-level entry [1024,1535] is empty -> hole 9 -> 2M.
    # r 2:      walk; 4K entry 2 (table of region 0 exists) empty -> hole 0 -> 4K.
    # Setup switch_p2m counts nothing (setup only counts setup_*): switches_in 0.
    pages = 2 + 2 * 512 + GIB_PAGES
    check(
        res,
        {
            "records": 5,
            "instructions": 5,
            "ept_exits": 5,
            "lazy_copies": 5,
            "lazy_copies_4k": 2,
            "lazy_copies_2m": 2,
            "lazy_copies_1g": 1,
            "lazy_copy_pages": pages,
        },
        views={
            1: {
                "records_completed": 5,
                "ept_exits": 5,
                "lazy_copies": 5,
                "lazy_copy_pages": pages,
                "pages_mapped": pages,
                "leaves_4k": 2,
                "leaves_2m": 2,
                "leaves_1g": 1,
            }
        },
        gfns={(1, g): {"ept_exits": 1, "lazy_copies": 1} for g in (5, 600, GIB_PAGES + 3, 1100, 2)},
    )


# =========================================================================== xen version switches
def test_xen_416_lazy_copy_uses_host_order_and_host_access(sim):
    res = sim(
        """
        [domain]
        xen = "4.16"
        ram = [[0, 1023]]

        [[view]]
        name = "v"
        default_access = "rx"

        [[setup]]
        op = "switch_p2m"
        view = "v"

        [[on_violation]]
        action = "emulate"
        """,
        ["w 5", "w 7", "w 600"],
    )
    # xen 4.16 < 4.17: lazy copies take the host order (9), not min(host, hole);
    # < 4.19: they take the host entry's access (rwx), not v's default (rx).
    # w 5:   v empty -> exit(1) -> lazy 2M [0,511] rwx -> retry -> done(1). (4.22 would copy
    #        a 4K rx leaf and then violate.)
    # w 7:   inside [0,511] rwx -> done.
    # w 600: exit(1) -> lazy 2M [512,1023] rwx -> done.
    # The catch-all emulate rule is never used.
    check(
        res,
        {
            "records": 3,
            "instructions": 3,
            "ept_exits": 2,
            "lazy_copies": 2,
            "lazy_copies_2m": 2,
            "lazy_copy_pages": 1024,
        },
        views={
            1: {
                "records_completed": 3,
                "ept_exits": 2,
                "lazy_copies": 2,
                "lazy_copy_pages": 1024,
                "pages_mapped": 1024,
                "leaves_2m": 2,
            }
        },
        gfns={
            (1, 5): {"ept_exits": 1, "lazy_copies": 1},
            (1, 600): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


XEN_ACCESS_POLICY = """
[domain]
xen = "{xen}"
ram = [[0, 1023]]

[[view]]
name = "v"
default_access = "rx"

[[setup]]
op = "set_mem_access"
view = 0
gfns = 7
access = "r"

[[setup]]
op = "switch_p2m"
view = "v"

[[on_violation]]
action = "emulate"
"""


def test_xen_418_lazy_copy_takes_host_entry_access(sim):
    res = sim(XEN_ACCESS_POLICY.format(xen="4.18"), ["w 5", "w 7"])
    # Setup: view-0 set_mem_access 7 -> host 4K write: the host 2M leaf [0,511] splits
    # (setup_splits 1), host gfn 7 = r. Propagation: no view holds 7 -> nothing.
    # xen 4.18 (>= 4.17: min order; < 4.19: host entry's access is copied).
    # w 5: v empty, mm 0, 5 > mm -> hole 0 (host leaf is 4K too) -> exit(1), lazy 4K with the
    #      host entry's access rwx -> retry -> done(1).
    # w 7: 7 > mm 5 -> hole 0 -> exit(1), lazy 4K with host access r -> retry -> §5.7 viol_w
    #      (1,7) -> exit(1) -> mem_access event -> catch-all emulate (emulations 1,
    #      records_emulated 1).
    check(
        res,
        {
            "records": 2,
            "instructions": 2,
            "ept_exits": 3,
            "lazy_copies": 2,
            "lazy_copies_4k": 2,
            "lazy_copy_pages": 2,
            "access_violations": 1,
            "mem_access_events": 1,
            "emulations": 1,
            "records_emulated": 1,
            "setup_splits": 1,
        },
        views={
            1: {
                "records_completed": 1,
                "ept_exits": 3,
                "lazy_copies": 2,
                "lazy_copy_pages": 2,
                "access_violations": 1,
                "pages_mapped": 2,
                "leaves_4k": 2,
            }
        },
        gfns={
            (1, 5): {"ept_exits": 1, "lazy_copies": 1},
            (1, 7): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
        },
    )


def test_xen_422_lazy_copy_takes_view_default_access(sim):
    res = sim(XEN_ACCESS_POLICY.format(xen="4.22"), ["w 5", "w 7"])
    # Same setup (setup_splits 1). xen 4.22: lazy copies take v's default access rx.
    # w 5: exit(1), lazy 4K rx -> retry -> viol_w (1,5) -> exit(1) -> event -> emulate.
    # w 7: exit(1), lazy 4K rx (the host's r is not copied) -> retry -> viol_w -> exit ->
    #      event -> emulate.
    check(
        res,
        {
            "records": 2,
            "instructions": 2,
            "ept_exits": 4,
            "lazy_copies": 2,
            "lazy_copies_4k": 2,
            "lazy_copy_pages": 2,
            "access_violations": 2,
            "mem_access_events": 2,
            "emulations": 2,
            "records_emulated": 2,
            "setup_splits": 1,
        },
        views={
            1: {
                "ept_exits": 4,
                "lazy_copies": 2,
                "lazy_copy_pages": 2,
                "access_violations": 2,
                "pages_mapped": 2,
                "leaves_4k": 2,
            }
        },
        gfns={
            (1, 5): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
            (1, 7): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
        },
    )


PREPOPULATE_POLICY = """
[domain]
xen = "{xen}"
ram = [[0, 1023]]

[[view]]
name = "v"
default_access = "r"

[[setup]]
op = "set_mem_access"
view = "v"
gfns = 5
access = "rw"

[[setup]]
op = "switch_p2m"
view = "v"

[[on_violation]]
action = "emulate"
"""


def test_prepopulate_takes_view_default_access_on_422(sim):
    res = sim(PREPOPULATE_POLICY.format(xen="4.22"), ["w 6", "w 5", "w 600"])
    # Setup: v holds nothing at 5; host maps 5 with the 2M leaf [0,511] -> prepopulate: v gets
    # that 2M leaf with v's default access r (xen >= 4.22), then the 4K rewrite of 5 splits
    # it (setup_splits 1): 5 = rw, the 511 other pieces r.
    # w 6:   r -> viol_w (1,6) -> exit(1) -> event -> emulate.
    # w 5:   rw -> done(1).
    # w 600: no leaf, mm 511, 600 > mm, 2M region 512 above -> hole 9 -> exit(1), lazy 2M
    #        [512,1023] with access r -> retry -> viol_w (1,600) -> exit -> event -> emulate.
    check(
        res,
        {
            "records": 3,
            "instructions": 3,
            "ept_exits": 3,
            "lazy_copies": 1,
            "lazy_copies_2m": 1,
            "lazy_copy_pages": 512,
            "access_violations": 2,
            "mem_access_events": 2,
            "emulations": 2,
            "records_emulated": 2,
            "setup_splits": 1,
        },
        views={
            1: {
                "records_completed": 1,
                "ept_exits": 3,
                "lazy_copies": 1,
                "lazy_copy_pages": 512,
                "access_violations": 2,
                "pages_mapped": 1024,
                "leaves_4k": 512,
                "leaves_2m": 1,
            }
        },
        gfns={
            (1, 6): {"ept_exits": 1, "viol_w": 1},
            (1, 600): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
        },
    )


def test_prepopulate_takes_host_access_before_422(sim):
    res = sim(PREPOPULATE_POLICY.format(xen="4.21"), ["w 6", "w 5", "w 600"])
    # Setup: as on 4.22 but the prepopulated 2M leaf takes the host access rwx (xen < 4.22);
    # split (setup_splits 1): 5 = rw, the other pieces rwx.
    # w 6:   rwx -> done(1).   w 5: rw -> done(1).
    # w 600: lazy copies take v's default r on any xen >= 4.19 -> exit, lazy 2M r, retry ->
    #        viol_w (1,600) -> exit -> event -> emulate.
    check(
        res,
        {
            "records": 3,
            "instructions": 3,
            "ept_exits": 2,
            "lazy_copies": 1,
            "lazy_copies_2m": 1,
            "lazy_copy_pages": 512,
            "access_violations": 1,
            "mem_access_events": 1,
            "emulations": 1,
            "records_emulated": 1,
            "setup_splits": 1,
        },
        views={
            1: {
                "records_completed": 2,
                "ept_exits": 2,
                "lazy_copies": 1,
                "lazy_copy_pages": 512,
                "access_violations": 1,
                "pages_mapped": 1024,
                "leaves_4k": 512,
                "leaves_2m": 1,
            }
        },
        gfns={(1, 600): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1}},
    )


# =========================================================================== view 0 and the host
def test_view0_restriction_lost_at_lazy_copy_with_altp2m(sim):
    res = sim(
        RAM_1K
        + """
        [[setup]]
        op = "set_mem_access"
        view = 0
        gfns = 5
        access = "r"

        [[on_violation]]
        action = "emulate"
        """,
        ["r 0", "w 5", "w 600"],
    )
    # Setup: host 4K write of 5 (r): the host 2M leaf [0,511] splits (setup_splits 1). View 0's
    # own table holds nothing yet -> propagation leaves it alone.
    # r 0:   view 0 fresh: empty root -> hole 18, but the host leaf at 0 is now 4K ->
    #        min(0, 18) = 0: exit(0), lazy 4K (rwx), done(0). mm = 0.
    # w 5:   5 > mm -> hole 0: exit(0), lazy 4K with view 0's default access rwx (xen >= 4.19),
    #        NOT the host's r -> retry -> done(0): the restriction is lost.
    # w 600: 600 > 5, 2M region 512 above -> hole 9, host leaf 2M -> exit(0), lazy 2M, done.
    check(
        res,
        {
            "records": 3,
            "instructions": 3,
            "ept_exits": 3,
            "lazy_copies": 3,
            "lazy_copies_4k": 2,
            "lazy_copies_2m": 1,
            "lazy_copy_pages": 514,
            "setup_splits": 1,
        },
        views={
            0: {
                "records_completed": 3,
                "ept_exits": 3,
                "lazy_copies": 3,
                "lazy_copy_pages": 514,
                "pages_mapped": 514,
                "leaves_4k": 2,
                "leaves_2m": 1,
            }
        },
        gfns={(0, g): {"ept_exits": 1, "lazy_copies": 1} for g in (0, 5, 600)},
    )


def test_view0_restriction_kept_without_altp2m(sim):
    res = sim(
        """
        [domain]
        altp2m = false
        ram = [[0, 1023]]

        [[setup]]
        op = "set_mem_access"
        view = 0
        gfns = 5
        access = "r"

        [[on_violation]]
        kind = "w"
        action = "set-access"
        """,
        ["r 5", "w 5", "w 5", "w 6"],
    )
    # altp2m off: vCPUs walk the host p2m; "view 0" stands for it.
    # Setup: host 4K write of 5 (r), splitting the host 2M leaf [0,511] (setup_splits 1).
    # r 5: host 4K r -> done(0).
    # w 5: §5.7 viol_w (0,5) -> exit(0) -> mem_access event -> set-access rwx: host 4K
    #      rewrite, already 4K (no split), access_changes 1 -> retry -> done(0).
    # w 5: rwx -> done.   w 6: split piece rwx -> done.
    # No lazy copies: the host is not a view.
    # Rev 2: the set-access rewrites an entry that permitted r: one EPT sync (ept_syncs 1;
    # one vCPU, so no IPIs); the retry is one restart.
    check(
        res,
        {
            "records": 4,
            "instructions": 4,
            "ept_exits": 1,
            "access_violations": 1,
            "mem_access_events": 1,
            "access_changes": 1,
            "ept_syncs": 1,
            "setup_splits": 1,
        },
        views={
            0: {
                "records_completed": 4,
                "ept_exits": 1,
                "access_violations": 1,
                "pages_mapped": 1024,
                "leaves_4k": 512,
                "leaves_2m": 1,
            }
        },
        gfns={(0, 5): {"ept_exits": 1, "viol_w": 1}},
    )


def test_memaccess_write_without_altp2m_splits_host_at_replay(sim):
    res = sim(
        """
        [domain]
        altp2m = false
        host_access = "rx"
        ram = [[0, 1023]]

        [[on_violation]]
        kind = "w"
        action = "set-access"
        """,
        ["w 600", "w 600", "w 601", "r 5", "x 6"],
    )
    # Host: two 2M leaves with access rx. No setup.
    # w 600: 2M rx -> viol_w (0,600) -> exit(0) -> event -> set-access rwx on the host: 4K
    #        write splits the 2M leaf [512,1023] (superpage_splits 1), access_changes 1 ->
    #        retry -> done(0).
    # w 600: 4K rwx -> done.
    # w 601: 4K rx piece -> viol_w (0,601) -> exit -> event -> set-access (no split),
    #        access_changes 2 -> done.
    # r 5, x 6: 2M leaf [0,511] rx, exec_sp true -> done.
    # Rev 2: both set-access rewrites replace rx entries: 2 EPT syncs; 2 restarts.
    check(
        res,
        {
            "records": 5,
            "instructions": 5,
            "ept_exits": 2,
            "access_violations": 2,
            "mem_access_events": 2,
            "access_changes": 2,
            "superpage_splits": 1,
            "ept_syncs": 2,
        },
        views={
            0: {
                "records_completed": 5,
                "ept_exits": 2,
                "access_violations": 2,
                "pages_mapped": 1024,
                "leaves_4k": 512,
                "leaves_2m": 1,
            }
        },
        gfns={(0, 600): {"ept_exits": 1, "viol_w": 1}, (0, 601): {"ept_exits": 1, "viol_w": 1}},
    )


def test_view0_set_mem_access_in_setup_propagates_into_view(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "v"

        [[setup]]
        op = "set_mem_access"
        view = "v"
        gfns = 5
        access = "r"

        [[setup]]
        op = "set_mem_access"
        view = 0
        gfns = 5
        access = "rw"

        [[setup]]
        op = "switch_p2m"
        view = "v"

        [[on_violation]]
        action = "emulate"
        """,
        ["w 5", "x 5", "x 6"],
    )
    # Setup 1: v has no leaf at 5 -> prepopulate the host 2M leaf [0,511] (access rwx = v's
    #   default) -> 4K rewrite splits it (setup_splits 1): v[5] = r.
    # Setup 2: host 4K write of 5 = rw, splitting the host 2M leaf (setup_splits 2).
    #   Propagation: view 0 holds nothing; v holds a 4K leaf at 5 -> v[5] becomes the host's
    #   entry: access rw (v's restriction r is undone), v's suppress-VE bit kept.
    # w 5: rw -> done(1) (with v[5] = r this would have been a violation).
    # x 5: rw -> viol_x (1,5) -> exit(1) -> event -> emulate (shows v[5] is exactly rw).
    # x 6: prepopulated piece rwx -> done(1).
    check(
        res,
        {
            "records": 3,
            "instructions": 3,
            "ept_exits": 1,
            "access_violations": 1,
            "mem_access_events": 1,
            "emulations": 1,
            "records_emulated": 1,
            "setup_splits": 2,
        },
        views={
            1: {
                "records_completed": 2,
                "ept_exits": 1,
                "access_violations": 1,
                "pages_mapped": 512,
                "leaves_4k": 512,
            }
        },
        gfns={(1, 5): {"ept_exits": 1, "viol_x": 1}},
    )


def test_view0_set_mem_access_skips_view_whose_leaf_was_removed(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "v"

        [[setup]]
        op = "set_mem_access"
        view = "v"
        gfns = 5
        access = "rw"

        [[setup]]
        op = "change_gfn"
        view = "v"
        old = 5
        new = "invalid"

        [[setup]]
        op = "set_mem_access"
        view = 0
        gfns = [5, 6]
        access = "r"

        [[setup]]
        op = "switch_p2m"
        view = "v"

        [[on_violation]]
        action = "emulate"
        """,
        ["w 5", "w 6"],
    )
    # Setup 1: prepopulate 2M [0,511] into v (rwx), split (setup_splits 1), v[5] = rw.
    # Setup 2: v's leaf at 5 removed (mm stays 511).
    # Setup 3: host 4K writes of 5 and 6 = r (the host 2M leaf splits once: setup_splits 2).
    #   Propagation: v holds no valid leaf at 5 -> untouched; v holds the 4K leaf 6 ->
    #   v[6] = host's r.
    # w 5: no valid leaf -> exit(1) -> lazy: 5 <= mm, 4K entry empty -> 4K with v's default
    #   rwx -> done(1).
    # w 6: r -> viol_w (1,6), exit(1) -> event -> emulate.
    check(
        res,
        {
            "records": 2,
            "instructions": 2,
            "ept_exits": 2,
            "lazy_copies": 1,
            "lazy_copies_4k": 1,
            "lazy_copy_pages": 1,
            "access_violations": 1,
            "mem_access_events": 1,
            "emulations": 1,
            "records_emulated": 1,
            "setup_splits": 2,
        },
        views={
            1: {
                "records_completed": 1,
                "ept_exits": 2,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "access_violations": 1,
                "pages_mapped": 512,
                "leaves_4k": 512,
            }
        },
        gfns={(1, 5): {"ept_exits": 1, "lazy_copies": 1}, (1, 6): {"ept_exits": 1, "viol_w": 1}},
    )


def test_set_access_response_in_view0_propagates_at_replay(sim):
    res = sim(
        """
        [domain]
        ram = [[0, 1023]]
        host_access = "rx"

        [[view]]
        name = "v"
        default_access = "rw"

        [[setup]]
        op = "switch_p2m"
        view = "v"

        [[on_violation]]
        view = "v"
        kind = "x"
        action = "switch"
        to = 0

        [[on_violation]]
        view = 0
        kind = "w"
        action = "set-access"
        """,
        ["v0 r 0", "v0 x 5", "v0 w 5", "v1 x 5", "v1 x 6"],
    )
    # Host: 2M leaves, access rx; view 0's default access = host access rx; v's is rw.
    # Both vCPUs start on v (setup switch_p2m, not counted).
    # row0 v0 r 0: v fresh: empty root -> hole 18 -> min(9,18) = 9: exit(1), lazy 2M [0,511]
    #   rw; retry done(1).
    # row1 v0 x 5: 2M rw forbids x -> viol_x (1,5), exit(1) -> event -> rule 1: switch to 0
    #   (svm, switches_in[0]) -> retry in view 0: fresh, 5 > mm 0 -> hole 0: exit(0), lazy 4K
    #   rx -> retry -> done(0).
    # row2 v0 w 5: view 0's 4K rx -> viol_w (0,5), exit(0) -> event -> rule 2: set-access rwx
    #   in view 0 = host set_mem_access: host 2M [0,511] splits (superpage_splits 1), host[5]
    #   = rwx; propagation: view 0 holds a 4K leaf at 5 -> rwx; v holds the 2M leaf covering
    #   5 -> split (superpage_splits 2), v[5] = rwx. access_changes 1. Retry -> done(0).
    # row3 v1 x 5: v1 still on v; v[5] now rwx -> done(1), no exit.
    # row4 v1 x 6: v[6] still rw -> viol_x (1,6), exit(1) -> event -> switch to 0 (svm,
    #   switches_in[0]) -> view 0: 6 > mm 5 -> hole 0: exit(0), lazy 4K rx -> done(0).
    # Rev 2 EPT syncs: row2's step rewrites three p2ms whose entries permitted something (the
    # host's rx, view 0's rx, v's rw): ept_syncs 3, each interrupting the other vCPU
    # (ept_sync_ipis 3, derived by the helper).
    check(
        res,
        {
            "records": 5,
            "instructions": 5,
            "ept_exits": 6,
            "lazy_copies": 3,
            "lazy_copies_4k": 2,
            "lazy_copies_2m": 1,
            "lazy_copy_pages": 514,
            "access_violations": 3,
            "mem_access_events": 3,
            "switches_vm_event": 2,
            "access_changes": 1,
            "superpage_splits": 2,
            "ept_syncs": 3,
        },
        vcpus={
            0: {
                "records": 3,
                "instructions": 3,
                "ept_exits": 4,
                "lazy_copies": 2,
                "lazy_copies_4k": 1,
                "lazy_copies_2m": 1,
                "lazy_copy_pages": 513,
                "access_violations": 2,
                "mem_access_events": 2,
                "switches_vm_event": 1,
                "access_changes": 1,
                "superpage_splits": 2,
                "ept_syncs": 3,
            },
            1: {
                "records": 2,
                "instructions": 2,
                "ept_exits": 2,
                "lazy_copies": 1,
                "lazy_copies_4k": 1,
                "lazy_copy_pages": 1,
                "access_violations": 1,
                "mem_access_events": 1,
                "switches_vm_event": 1,
            },
        },
        views={
            1: {
                "records_completed": 2,
                "ept_exits": 3,
                "lazy_copies": 1,
                "lazy_copy_pages": 512,
                "access_violations": 2,
                "pages_mapped": 512,
                "leaves_4k": 512,
            },
            0: {
                "records_completed": 3,
                "ept_exits": 3,
                "lazy_copies": 2,
                "lazy_copy_pages": 2,
                "access_violations": 1,
                "switches_in": 2,
                "pages_mapped": 2,
                "leaves_4k": 2,
            },
        },
        gfns={
            (1, 0): {"ept_exits": 1, "lazy_copies": 1},
            (1, 5): {"ept_exits": 1, "viol_x": 1},
            (0, 5): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
            (1, 6): {"ept_exits": 1, "viol_x": 1},
            (0, 6): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


def test_set_suppress_ve_on_view0_propagates_access_but_not_the_bit(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "v"
        default_access = "r"

        [[setup]]
        op = "set_mem_access"
        view = "v"
        gfns = 5
        access = "rw"

        [[setup]]
        op = "set_mem_access"
        view = 0
        gfns = 5
        access = "r"

        [[setup]]
        op = "set_suppress_ve"
        view = 0
        gfns = 5
        suppress = false

        [[setup]]
        op = "enable_notify"
        vcpus = "all"

        [[setup]]
        op = "switch_p2m"
        view = "v"

        [on_ve]
        action = "emulate"

        [[on_violation]]
        action = "emulate"
        """,
        ["w 5", "r 5"],
    )
    # Setup 1: v: prepopulate host 2M [0,511] with v's default r, split (setup_splits 1),
    #   v[5] = rw (suppress-VE 1).
    # Setup 2: host 4K write of 5 = r (host split, setup_splits 2); propagate: v holds 5 ->
    #   v[5] = host's r, v's bit 1 kept. View 0 holds nothing.
    # Setup 3: host 4K write of 5 with bit 0 (already 4K, no split); propagate: v[5] gets the
    #   host's access r again and keeps its OWN bit 1: the bit never reaches v.
    # w 5: r -> violation; #VE enabled, not busy, but the deciding leaf has suppress-VE 1 ->
    #   no #VE -> exit(1), viol_w (1,5) -> event -> monitor emulate.
    # r 5: r -> done(1).
    check(
        res,
        {
            "records": 2,
            "instructions": 2,
            "ept_exits": 1,
            "access_violations": 1,
            "mem_access_events": 1,
            "emulations": 1,
            "records_emulated": 1,
            "setup_splits": 2,
        },
        views={
            1: {
                "records_completed": 1,
                "ept_exits": 1,
                "access_violations": 1,
                "pages_mapped": 512,
                "leaves_4k": 512,
            }
        },
        gfns={(1, 5): {"ept_exits": 1, "viol_w": 1}},
    )


# =========================================================================== setup on views (§4)
def test_prepopulate_clobbers_earlier_4k_customisation(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "v"
        default_access = "r"

        [[setup]]
        op = "set_suppress_ve"
        view = "v"
        gfns = 7
        suppress = false

        [[setup]]
        op = "set_mem_access"
        view = "v"
        gfns = 9
        access = "rw"

        [[setup]]
        op = "enable_notify"

        [[setup]]
        op = "switch_p2m"
        view = "v"

        [on_ve]
        action = "emulate"

        [[on_violation]]
        action = "emulate"
        """,
        ["w 7", "w 9", "r 7"],
    )
    # Setup 1: set_suppress_ve without prepopulate: v gets ONLY a 4K leaf at 7 with the host
    #   entry's access rwx and suppress-VE 0 (no superpage in v: no split).
    # Setup 2: v has no leaf at 9 -> prepopulate the host 2M leaf [0,511] at host order (access
    #   r = v's default on 4.22, suppress-VE 1): this replaces v's 4K table, so 7's rwx/bit-0
    #   leaf is lost; then the 4K rewrite of 9 splits it (setup_splits 1): v[9] = rw.
    # w 7: v[7] = r, bit 1 -> no #VE -> exit(1), viol_w (1,7) -> event -> monitor emulate.
    #      (Unclobbered it would have completed.)
    # w 9: rw -> done(1).   r 7: r -> done(1).
    check(
        res,
        {
            "records": 3,
            "instructions": 3,
            "ept_exits": 1,
            "access_violations": 1,
            "mem_access_events": 1,
            "emulations": 1,
            "records_emulated": 1,
            "setup_splits": 1,
        },
        views={
            1: {
                "records_completed": 2,
                "ept_exits": 1,
                "access_violations": 1,
                "pages_mapped": 512,
                "leaves_4k": 512,
            }
        },
        gfns={(1, 7): {"ept_exits": 1, "viol_w": 1}},
    )


def test_change_gfn_copies_access_of_new_and_replaces_old_access(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "x"

        [[setup]]
        op = "add_ram"
        gfns = { above_ram = [0, 0] }

        [[setup]]
        op = "set_mem_access"
        view = "x"
        gfns = { above_ram = [0, 0] }
        access = "r"

        [[setup]]
        op = "set_mem_access"
        view = "x"
        gfns = 5
        access = "x"

        [[setup]]
        op = "change_gfn"
        view = "x"
        old = 5
        new = { above_ram = [0, 0] }

        [[setup]]
        op = "switch_p2m"
        view = "x"

        [[on_violation]]
        action = "emulate"
        """,
        ["x 5", "r 5", "w 5", "r 6"],
    )
    # ram_top = 1023, so above_ram [0,0] is gfn 1024.
    # add_ram: host maps 1024 as a 4K RAM leaf, rwx.
    # set_mem_access x 1024 r: x has no leaf; host leaf at 1024 is 4K -> prepopulate 4K, then
    #   rewrite r (no split).
    # set_mem_access x 5 x: prepopulate host 2M [0,511] (rwx), split (setup_splits 1), x[5] = x.
    # change_gfn x 5 -> 1024: 5 is present; effective entry of 1024 = x's own valid leaf
    #   (access r) -> x[5] = 4K leaf with 1024's mfn and access r (the x set before is lost).
    # x 5: r -> viol_x (1,5), exit(1) -> event -> emulate.
    # r 5: r -> done(1).
    # w 5: r -> viol_w (1,5), exit(1) -> event -> emulate.
    # r 6: rwx piece -> done(1).
    check(
        res,
        {
            "records": 4,
            "instructions": 4,
            "ept_exits": 2,
            "access_violations": 2,
            "mem_access_events": 2,
            "emulations": 2,
            "records_emulated": 2,
            "setup_splits": 1,
        },
        views={
            1: {
                "records_completed": 2,
                "ept_exits": 2,
                "access_violations": 2,
                "pages_mapped": 513,
                "leaves_4k": 513,
            }
        },
        gfns={(1, 5): {"ept_exits": 2, "viol_x": 1, "viol_w": 1}},
    )


def test_set_mem_access_after_change_gfn(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "x"

        [[setup]]
        op = "add_ram"
        gfns = { above_ram = [0, 0] }

        [[setup]]
        op = "change_gfn"
        view = "x"
        old = 5
        new = { above_ram = [0, 0] }

        [[setup]]
        op = "set_mem_access"
        view = "x"
        gfns = 5
        access = "x"

        [[setup]]
        op = "switch_p2m"
        view = "x"

        [[on_violation]]
        view = "x"
        kind = ["r", "w"]
        action = "step"
        to = 0
        """,
        ["x 5", "r 5", "x 1024"],
    )
    # add_ram: host 4K RAM leaf at 1024 (rwx).
    # change_gfn x 5 -> 1024: prepopulate host 2M [0,511] into x (rwx); effective entry of
    #   1024: x has none -> host's 4K rwx leaf -> x[5] = 4K leaf (mfn of 1024, rwx); the 4K
    #   write splits x's 2M leaf (setup_splits 1).
    # set_mem_access x 5 x: x holds a valid leaf at 5 -> 4K rewrite, access x, mfn kept.
    # row0 x 5: x -> done(1).
    # row1 r 5: x forbids r -> viol_r (1,5), exit(1) -> event -> step to 0 (svm,
    #   switches_in[0]); single-step on, return view x -> retry in view 0: fresh, 5 > mm 0 ->
    #   hole 0: exit(0), lazy 4K rwx -> done(0).
    # row2 starts a new instruction: row1's ends first: mtf_exits 1, not fast ->
    #   singlestep_events 1 and switch back to x (svm 2, switches_in[1]).
    #   x 1024: x has no leaf at 1024; mm(x) = 511, 1024 > mm, 2M region 1024 above -> hole 9,
    #   host leaf 4K -> min(0,9) = 0: exit(1), lazy 4K rwx -> done(1).
    check(
        res,
        {
            "records": 3,
            "instructions": 3,
            "ept_exits": 3,
            "lazy_copies": 2,
            "lazy_copies_4k": 2,
            "lazy_copy_pages": 2,
            "access_violations": 1,
            "mem_access_events": 1,
            "singlestep_events": 1,
            "mtf_exits": 1,
            "switches_vm_event": 2,
            "setup_splits": 1,
        },
        views={
            1: {
                "records_completed": 2,
                "ept_exits": 2,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "access_violations": 1,
                "switches_in": 1,
                "pages_mapped": 513,
                "leaves_4k": 513,
            },
            0: {
                "records_completed": 1,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "switches_in": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
        },
        gfns={
            (1, 5): {"ept_exits": 1, "viol_r": 1},
            (0, 5): {"ept_exits": 1, "lazy_copies": 1},
            (1, 1024): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


def test_change_gfn_invalid_then_lazy_copy_again(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "v"

        [[setup]]
        op = "set_mem_access"
        view = "v"
        gfns = 5
        access = "r"

        [[setup]]
        op = "change_gfn"
        view = "v"
        old = 5
        new = "invalid"

        [[setup]]
        op = "switch_p2m"
        view = "v"

        [[on_violation]]
        action = "emulate"
        """,
        ["w 5", "w 5", "w 6"],
    )
    # Setup: prepopulate 2M [0,511] into v (rwx), split (setup_splits 1), v[5] = r; then
    # change_gfn invalid removes the 4K leaf at 5 (no split: already 4K). mm(v) stays 511.
    # w 5: no valid leaf -> (no #VE enabled) exit(1) -> lazy copy: 5 <= mm -> walk: the 4K
    #   entry is empty -> hole 0 -> 4K with v's default rwx -> retry -> done(1). The r
    #   restriction is gone.
    # w 5: rwx -> done.   w 6: rwx piece -> done.
    check(
        res,
        {
            "records": 3,
            "instructions": 3,
            "ept_exits": 1,
            "lazy_copies": 1,
            "lazy_copies_4k": 1,
            "lazy_copy_pages": 1,
            "setup_splits": 1,
        },
        views={
            1: {
                "records_completed": 3,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "pages_mapped": 512,
                "leaves_4k": 512,
            }
        },
        gfns={(1, 5): {"ept_exits": 1, "lazy_copies": 1}},
    )


def test_setup_skips_gfns_outside_ram(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "v"

        [[setup]]
        op = "set_mem_access"
        view = "v"
        gfns = [1020, 1030]
        access = "r"

        [[setup]]
        op = "set_mem_access"
        view = 0
        gfns = [[2000, 2001]]
        access = "r"

        [[setup]]
        op = "set_suppress_ve"
        view = 0
        gfns = 2000
        suppress = false

        [[setup]]
        op = "switch_p2m"
        view = "v"

        [[on_violation]]
        action = "emulate"
        """,
        ["r 1021", "w 1022", "r 1019"],
    )
    # set_mem_access v [1020,1030] r: 1020: prepopulate host 2M [512,1023] into v (rwx),
    #   split (setup_splits 1), v[1020] = r; 1021-1023: v holds 4K leaves -> rewrite r;
    #   1024-1030 are not host RAM -> setup_skipped 7.
    # set_mem_access 0 [2000,2001]: not RAM -> skipped 2 (9).
    # set_suppress_ve 0 2000: not RAM -> skipped 1 (10).
    # r 1021: r -> done(1).   w 1022: r -> viol_w (1,1022), exit(1) -> event -> emulate.
    # r 1019: rwx piece -> done(1).
    check(
        res,
        {
            "records": 3,
            "instructions": 3,
            "ept_exits": 1,
            "access_violations": 1,
            "mem_access_events": 1,
            "emulations": 1,
            "records_emulated": 1,
            "setup_splits": 1,
            "setup_skipped": 10,
        },
        views={
            1: {
                "records_completed": 2,
                "ept_exits": 1,
                "access_violations": 1,
                "pages_mapped": 512,
                "leaves_4k": 512,
            }
        },
        gfns={(1, 1022): {"ept_exits": 1, "viol_w": 1}},
    )


def test_setup_splits_count_513_per_gigabyte(sim):
    res = sim(
        f"""
        [domain]
        host_order = 18
        ram = [[0, {2 * GIB_PAGES - 1}]]

        [[view]]
        name = "v"

        [[setup]]
        op = "set_mem_access"
        view = 0
        gfns = 5
        access = "rx"

        [[setup]]
        op = "set_mem_access"
        view = 0
        gfns = 600
        access = "rx"

        [[setup]]
        op = "set_mem_access"
        view = "v"
        gfns = {GIB_PAGES + 5}
        access = "r"

        [[setup]]
        op = "set_mem_access"
        view = "v"
        gfns = 7
        access = "r"
        """,
        ["r 5"],
    )
    # Host: two 1G leaves.
    # 1. view 0, gfn 5: host 4K write takes the first 1G leaf down to 4K: the 1G leaf and all
    #    512 of its 2M pieces split -> setup_splits 513. No view holds 5.
    # 2. view 0, gfn 600: host leaf at 600 is already 4K -> no split.
    # 3. v, gfn 2^18+5: v holds nothing; host leaf = the second 1G leaf -> prepopulate 1G
    #    into v, 4K rewrite splits it down to 4K -> +513 (1026).
    # 4. v, gfn 7: v holds nothing at 7; the host leaf covering 7 is now 4K -> prepopulate
    #    4K, rewrite r: no split.
    # r 5 (view 0, fresh): hole 18 (empty root), host leaf 4K -> min(0,18): exit(0), lazy 4K
    #    with view 0's default rwx -> done(0).
    check(
        res,
        {
            "records": 1,
            "instructions": 1,
            "ept_exits": 1,
            "lazy_copies": 1,
            "lazy_copies_4k": 1,
            "lazy_copy_pages": 1,
            "setup_splits": 1026,
        },
        views={
            0: {
                "records_completed": 1,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
            1: {"pages_mapped": GIB_PAGES + 1, "leaves_4k": GIB_PAGES + 1},
        },
        gfns={(0, 5): {"ept_exits": 1, "lazy_copies": 1}},
    )


# =========================================================================== RAM (§3)
def test_default_ram_is_gib_aligned_max_gfn_less_the_vga_hole(sim):
    res = sim(
        """
        [[setup]]
        op = "set_mem_access"
        view = 0
        gfns = [1024, 1025]
        access = "r"
        """,
        ["r 600", "r 5", "r 0xa5"],
    )
    # Rev 2 (re-derived: the fallback RAM and the default host order changed, §3):
    # no ram anywhere: RAM = [0, 0x9f] and [0xc0, align_up(600 + 1, 2^18) - 1 = 0x3ffff];
    # origin "create": host_order 18, but the first GiB holds the VGA hole, so 2M leaves
    # from 512 on and 4K leaves in [0, 0x9f] and [0xc0, 511].
    # Setup: 1024 and 1025 are RAM now: host 4K write of 1024 splits the 2M leaf
    # [1024,1535] (setup_splits 1); 1025 is then a 4K piece (no split). No view holds them.
    # r 600: fresh view 0, 2M region 512 above mm 0 -> hole 9, host 2M -> exit(0), lazy 2M
    #   (mm 1023) -> restart -> done(0).
    # r 5: 5 <= mm -> walk: the 2M-level entry [0,511] is empty -> hole 9; host leaf 4K ->
    #   min(0, 9) = 0: exit(0), lazy 4K -> restart -> done(0).
    # r 0xa5: walk reaches the 4K table made by r 5, entry empty; the host does not map
    #   0xa5 (VGA hole) -> exit(0), MMIO; not a completion.
    check(
        res,
        {
            "records": 3,
            "instructions": 3,
            "ept_exits": 3,
            "lazy_copies": 2,
            "lazy_copies_2m": 1,
            "lazy_copies_4k": 1,
            "lazy_copy_pages": 513,
            "mmio_accesses": 1,
            "setup_splits": 1,
        },
        views={
            0: {
                "records_completed": 2,
                "ept_exits": 3,
                "lazy_copies": 2,
                "lazy_copy_pages": 513,
                "pages_mapped": 513,
                "leaves_2m": 1,
                "leaves_4k": 1,
            }
        },
        gfns={
            (0, 600): {"ept_exits": 1, "lazy_copies": 1},
            (0, 5): {"ept_exits": 1, "lazy_copies": 1},
            (0, 0xA5): {"ept_exits": 1},
        },
    )


def test_trace_metadata_ram_and_small_host_pages_at_its_end(sim):
    res = sim("", ["r 600", "r 700", "r 0"], meta_ram=[[0, 600]])
    # RAM from the trace metadata: [0,600]. Host: 2M leaf [0,511]; 512-600 cannot hold a
    # whole aligned 2M page -> 4K leaves.
    # r 600: fresh view 0, hole 9, host leaf 4K -> min(0,9) = 0: exit(0), lazy 4K, done(0).
    # r 700: not RAM: no leaf -> exit(0) -> no lazy copy -> §5.6 MMIO (mmio_accesses 1).
    # r 0:   0 <= mm 600 -> walk: 2M-level entry [0,511] empty -> hole 9, host 2M -> lazy 2M.
    check(
        res,
        {
            "records": 3,
            "instructions": 3,
            "ept_exits": 3,
            "lazy_copies": 2,
            "lazy_copies_4k": 1,
            "lazy_copies_2m": 1,
            "lazy_copy_pages": 513,
            "mmio_accesses": 1,
        },
        views={
            0: {
                "records_completed": 2,
                "ept_exits": 3,
                "lazy_copies": 2,
                "lazy_copy_pages": 513,
                "pages_mapped": 513,
                "leaves_4k": 1,
                "leaves_2m": 1,
            }
        },
        gfns={
            (0, 600): {"ept_exits": 1, "lazy_copies": 1},
            (0, 700): {"ept_exits": 1},
            (0, 0): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


def test_policy_ram_wins_over_trace_metadata(sim):
    res = sim(RAM_1K, ["r 600", "r 700", "r 0"], meta_ram=[[0, 600]])
    # The policy's ram [0,1023] wins: host 2M leaves [0,511], [512,1023].
    # r 600: hole 9 -> exit(0), lazy 2M [512,1023].   r 700: inside it -> done, no exit.
    # r 0: walk: 2M-level entry [0,511] empty -> lazy 2M.
    check(
        res,
        {
            "records": 3,
            "instructions": 3,
            "ept_exits": 2,
            "lazy_copies": 2,
            "lazy_copies_2m": 2,
            "lazy_copy_pages": 1024,
        },
        views={
            0: {
                "records_completed": 3,
                "ept_exits": 2,
                "lazy_copies": 2,
                "lazy_copy_pages": 1024,
                "pages_mapped": 1024,
                "leaves_2m": 2,
            }
        },
        gfns={
            (0, 600): {"ept_exits": 1, "lazy_copies": 1},
            (0, 0): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


def test_mmio_hole_with_altp2m(sim):
    res = sim(RAM_1K, ["r 2000", "w 2000", "r 5"])
    # r 2000: view 0 has no leaf -> walk stops at an empty slot (suppress-VE 1; no #VE anyway)
    #   -> exit(0) -> host does not map 2000 -> no lazy copy -> §5.6 MMIO, completes (not a
    #   records_completed row).
    # w 2000: same: exit(0), MMIO.
    # r 5: exit(0), lazy 4K (5 > mm 0, regions at 0) -> done(0).
    check(
        res,
        {
            "records": 3,
            "instructions": 3,
            "ept_exits": 3,
            "lazy_copies": 1,
            "lazy_copies_4k": 1,
            "lazy_copy_pages": 1,
            "mmio_accesses": 2,
        },
        views={
            0: {
                "records_completed": 1,
                "ept_exits": 3,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            }
        },
        gfns={(0, 2000): {"ept_exits": 2}, (0, 5): {"ept_exits": 1, "lazy_copies": 1}},
    )


def test_mmio_hole_without_altp2m(sim):
    res = sim(
        """
        [domain]
        altp2m = false
        ram = [[0, 1023]]
        """,
        ["r 2000", "w 2000", "r 5"],
    )
    # altp2m off: the host p2m is walked. r/w 2000: no leaf -> exit(0) -> MMIO (x2).
    # r 5: host 2M rwx -> done(0), no exit.
    check(
        res,
        {"records": 3, "instructions": 3, "ept_exits": 2, "mmio_accesses": 2},
        views={0: {"records_completed": 1, "ept_exits": 2, "pages_mapped": 1024, "leaves_2m": 2}},
        gfns={(0, 2000): {"ept_exits": 2}},
    )


# =========================================================================== selectors
def test_executed_top_selector_picks_most_executed_page(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "v"

        [[setup]]
        op = "set_mem_access"
        view = "v"
        gfns = { set = "executed", top = 1 }
        access = "x"

        [[setup]]
        op = "switch_p2m"
        view = "v"

        [[on_violation]]
        kind = "r"
        action = "emulate"
        """,
        ["x 5", "x 5", "x 6", "r 6", "r 5"],
    )
    # Executed rows: gfn 5 twice, gfn 6 once -> top 1 = {5}.
    # Setup: prepopulate 2M [0,511] (rwx), split (setup_splits 1), v[5] = x.
    # x 5, x 5: done(1). x 6, r 6: rwx -> done(1).
    # r 5: x-only -> viol_r (1,5), exit(1) -> event -> emulate.
    check(
        res,
        {
            "records": 5,
            "instructions": 5,
            "ept_exits": 1,
            "access_violations": 1,
            "mem_access_events": 1,
            "emulations": 1,
            "records_emulated": 1,
            "setup_splits": 1,
        },
        views={
            1: {
                "records_completed": 4,
                "ept_exits": 1,
                "access_violations": 1,
                "pages_mapped": 512,
                "leaves_4k": 512,
            }
        },
        gfns={(1, 5): {"ept_exits": 1, "viol_r": 1}},
    )


# =========================================================================== #VE (§5.3, §6.2)
def test_ve_with_suppress_ve_0_and_vmfunc_step(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "pt"

        [[setup]]
        op = "set_suppress_ve"
        view = "pt"
        gfns = { set = "meta:pt" }
        suppress = false

        [[setup]]
        op = "set_mem_access"
        view = "pt"
        gfns = { set = "meta:pt" }
        access = "r"

        [[setup]]
        op = "enable_notify"
        vcpus = "all"

        [[setup]]
        op = "switch_p2m"
        view = "pt"

        [on_ve]
        action = "vmfunc-step"
        to = 0

        [[on_violation]]
        action = "emulate"
        """,
        ["i1 r 10", "i1 w 10", "i2 w 20"],
        gfn_sets={"pt": [[10, 11]]},
    )
    # meta:pt = gfns 10, 11.
    # set_suppress_ve pt: pt has no leaf -> host leaf (2M rwx), no prepopulate -> pt gets 4K
    #   leaves 10, 11 with access rwx, suppress-VE 0 (no superpage in pt: no split).
    # set_mem_access pt r: pt holds 4K leaves -> rewrite access r, bit 0 kept. setup_splits 0.
    # row0 (insn 1) r 10: r -> done(1).
    # row1 (insn 1) w 10: violation; #VE enabled, not busy, leaf bit 0 -> #VE: ve_delivered
    #   (pt), busy -> vmfunc-step to 0 (svf 1, switches_in[0]) -> restart insn 1 in view 0
    #   (Rev 2, re-derived): row0 r 10 again: no leaf; busy, and the empty slot has bit 1 (no
    #   ve_blocked) -> exit(0), lazy 4K rwx -> restart -> row0 done(0), row1 done(0). The
    #   first pass's completion of row0 in pt does not count (final pass only).
    # row2 (insn 2): insn 1 ends: no single-step; the #VE step switches back to pt (svf 2,
    #   switches_in[1]); busy clears. w 20: pt has no leaf; the empty 4K slot has bit 1 -> no
    #   #VE -> exit(1), lazy: 20 > mm 11, regions at 0 -> 4K rwx -> done(1).
    check(
        res,
        {
            "records": 3,
            "instructions": 2,
            "ept_exits": 2,
            "lazy_copies": 2,
            "lazy_copies_4k": 2,
            "lazy_copy_pages": 2,
            "ve_delivered": 1,
            "switches_vmfunc": 2,
        },
        views={
            1: {
                "records_completed": 1,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "ve_delivered": 1,
                "switches_in": 1,
                "pages_mapped": 3,
                "leaves_4k": 3,
            },
            0: {
                "records_completed": 2,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "switches_in": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
        },
        gfns={
            (1, 10): {"ve_delivered": 1},
            (0, 10): {"ept_exits": 1, "lazy_copies": 1},
            (1, 20): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


def test_ve_from_removed_leaf_keeping_its_bit(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "v"

        [[setup]]
        op = "set_suppress_ve"
        view = "v"
        gfns = 5
        suppress = false

        [[setup]]
        op = "change_gfn"
        view = "v"
        old = 5
        new = "invalid"

        [[setup]]
        op = "enable_notify"

        [[setup]]
        op = "switch_p2m"
        view = "v"

        [on_ve]
        action = "vmfunc-step"
        to = 0

        [[on_violation]]
        action = "emulate"
        """,
        ["r 5", "r 5"],
    )
    # Setup: v[5] = 4K leaf (host access rwx, bit 0), then removed: no valid leaf, but the
    # removed leaf keeps bit 0. No splits.
    # row0 r 5: no valid leaf -> #VE check: deciding entry = the removed leaf, bit 0, not busy
    #   -> #VE (ve_delivered v), busy; no exit, no lazy copy -> vmfunc-step to 0 (svf 1,
    #   switches_in[0]) -> view 0 fresh: exit(0), lazy 4K -> done(0).
    # row1: row0's instruction ends: vmfunc back to v (svf 2, switches_in[1]), busy clears.
    #   r 5: again #VE (ve_delivered 2) -> vmfunc to 0 (svf 3) -> view 0 holds 5 -> done(0).
    # End of trace: the open instruction ends: vmfunc back (svf 4, switches_in[1] 2).
    check(
        res,
        {
            "records": 2,
            "instructions": 2,
            "ept_exits": 1,
            "lazy_copies": 1,
            "lazy_copies_4k": 1,
            "lazy_copy_pages": 1,
            "ve_delivered": 2,
            "switches_vmfunc": 4,
        },
        views={
            1: {"ve_delivered": 2, "switches_in": 2},
            0: {
                "records_completed": 2,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "switches_in": 2,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
        },
        gfns={(1, 5): {"ve_delivered": 2}, (0, 5): {"ept_exits": 1, "lazy_copies": 1}},
    )


def test_ve_blocked_on_second_violation_and_vmfunc_switch(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "a"

        [[view]]
        name = "b"

        [[setup]]
        op = "set_mem_access"
        view = "a"
        gfns = 10
        access = "r"

        [[setup]]
        op = "set_suppress_ve"
        view = "a"
        gfns = 10
        suppress = false

        [[setup]]
        op = "set_mem_access"
        view = "b"
        gfns = 11
        access = "r"

        [[setup]]
        op = "set_suppress_ve"
        view = "b"
        gfns = 11
        suppress = false

        [[setup]]
        op = "enable_notify"

        [[setup]]
        op = "switch_p2m"
        view = "a"

        [on_ve]
        action = "vmfunc-switch"
        to = "b"

        [[on_violation]]
        action = "emulate"
        """,
        ["i1 w 10", "i1 w 11", "i2 w 11"],
    )
    # Setup: a: prepopulate 2M [0,511] (rwx), split (setup_splits 1), a[10] = r, then bit 0.
    #        b: same (setup_splits 2), b[11] = r, bit 0.
    # row0 (insn 1) w 10 in a: r, bit 0, not busy -> #VE (ve_delivered a), busy ->
    #   vmfunc-switch to b (svf 1, switches_in[b]) -> retry in b: b[10] rwx -> done(b).
    # row1 (insn 1) w 11 in b: r, bit 0, but busy -> not convertible: ve_blocked 1 -> exit(b)
    #   -> viol_w (b,11) -> event -> emulate (emulations 1, records_emulated 1: no more rows
    #   in insn 1).
    # row2 (insn 2): insn 1 ends, busy clears. w 11 in b: bit 0, not busy -> #VE
    #   (ve_delivered b) -> vmfunc-switch to b: already there, no switch counted -> retry:
    #   violation while busy -> ve_blocked 2 -> exit(b) -> viol_w -> event -> emulate.
    check(
        res,
        {
            "records": 3,
            "instructions": 2,
            "ept_exits": 2,
            "access_violations": 2,
            "mem_access_events": 2,
            "ve_delivered": 2,
            "ve_blocked": 2,
            "switches_vmfunc": 1,
            "emulations": 2,
            "records_emulated": 2,
            "setup_splits": 2,
        },
        views={
            1: {"ve_delivered": 1, "pages_mapped": 512, "leaves_4k": 512},
            2: {
                "records_completed": 1,
                "ept_exits": 2,
                "access_violations": 2,
                "ve_delivered": 1,
                "switches_in": 1,
                "pages_mapped": 512,
                "leaves_4k": 512,
            },
        },
        gfns={
            (1, 10): {"ve_delivered": 1},
            (2, 11): {"ept_exits": 2, "viol_w": 2, "ve_delivered": 1},
        },
    )


def test_ve_agent_emulate_skips_rest_of_instruction(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "pt"

        [[setup]]
        op = "set_suppress_ve"
        view = "pt"
        gfns = 10
        suppress = false

        [[setup]]
        op = "set_mem_access"
        view = "pt"
        gfns = 10
        access = "r"

        [[setup]]
        op = "enable_notify"
        vcpus = [0]

        [[setup]]
        op = "switch_p2m"
        view = "pt"

        [on_ve]
        action = "emulate"

        [[on_violation]]
        action = "emulate"
        """,
        ["i1 r 10", "i1 w 10", "i1 w 30", "i2 w 10", "i3 r 10"],
    )
    # Setup: pt[10] = 4K leaf, bit 0, access r (no splits).
    # row0 (insn 1) r 10: done(1).
    # row1 (insn 1) w 10: #VE (ve_delivered), busy -> agent emulate: ve_emulations 1; this row
    #   and the rest of insn 1 (row2) complete unchecked: records_emulated 2 (no walk of 30).
    # row3 (insn 2): insn 1 ends, busy clears. w 10 -> #VE again -> agent emulate
    #   (ve_emulations 2, records_emulated 3).
    # row4 (insn 3) r 10: done(1).
    # The monitor never sees anything: emulations 0.
    check(
        res,
        {
            "records": 5,
            "instructions": 3,
            "ve_delivered": 2,
            "ve_emulations": 2,
            "records_emulated": 3,
        },
        views={1: {"records_completed": 2, "ve_delivered": 2, "pages_mapped": 1, "leaves_4k": 1}},
        gfns={(1, 10): {"ve_delivered": 2}},
    )


def test_single_step_ends_before_ve_step_switches_back(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "a"

        [[view]]
        name = "b"
        default_access = "r"

        [[setup]]
        op = "set_suppress_ve"
        view = "a"
        gfns = 5
        suppress = false

        [[setup]]
        op = "set_mem_access"
        view = "a"
        gfns = 5
        access = "r"

        [[setup]]
        op = "enable_notify"

        [[setup]]
        op = "switch_p2m"
        view = "a"

        [on_ve]
        action = "vmfunc-step"
        to = "b"

        [[on_violation]]
        view = "b"
        kind = "w"
        action = "step"
        to = 0
        """,
        ["w 5", "r 5"],
    )
    # Setup: a[5] = 4K leaf, bit 0, access r. No splits.
    # row0 w 5 in a: #VE (ve_delivered a), busy -> vmfunc-step to b (svf 1, switches_in[b])
    #   -> b: no leaf, busy, empty slot bit 1 -> exit(b), lazy 4K with b's default r -> retry:
    #   viol_w (b,5) (leaf bit 1: no ve_blocked) -> exit(b) -> event -> step to 0 (svm 1,
    #   switches_in[0]), single-step on, return view b -> view 0: exit(0), lazy 4K rwx ->
    #   done(0).
    # row1 (new instruction): row0's instruction ends: the single-step first: mtf 1,
    #   singlestep event 1, switch back to b (svm 2, switches_in[b] 2); then the #VE step:
    #   vmfunc back to a (svf 2, switches_in[a] 1); busy clears.
    #   r 5 in a: r -> done(a).
    check(
        res,
        {
            "records": 2,
            "instructions": 2,
            "ept_exits": 3,
            "lazy_copies": 2,
            "lazy_copies_4k": 2,
            "lazy_copy_pages": 2,
            "access_violations": 1,
            "mem_access_events": 1,
            "singlestep_events": 1,
            "ve_delivered": 1,
            "mtf_exits": 1,
            "switches_vm_event": 2,
            "switches_vmfunc": 2,
        },
        views={
            1: {
                "records_completed": 1,
                "ve_delivered": 1,
                "switches_in": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
            2: {
                "ept_exits": 2,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "access_violations": 1,
                "switches_in": 2,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
            0: {
                "records_completed": 1,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "switches_in": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
        },
        gfns={
            (1, 5): {"ve_delivered": 1},
            (2, 5): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
            (0, 5): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


# =========================================================================== monitor responses (§6.1)
XEN_ACCESS_WRITE = (
    RAM_1K
    + """
[[view]]
name = "watch"
default_access = "rx"

[[setup]]
op = "switch_p2m"
view = "watch"

[[on_violation]]
kind = "w"
action = "step"
to = 0
fast = {fast}
"""
)


def test_step_over_multi_row_instruction(sim):
    res = sim(
        XEN_ACCESS_WRITE.format(fast="false"),
        ["i1 r 5", "i1 w 5", "i1 w 6", "i2 r 6"],
    )
    # Rev 2 (re-derived: the whole instruction restarts, §5):
    # row0 (insn 1) r 5: watch fresh -> exit(1), lazy 4K rx -> restart -> done(1).
    # row1 (insn 1) w 5: rx -> viol_w (1,5), exit(1) -> event -> step to 0 (svm 1,
    #   switches_in[0]), return view watch -> restart insn 1 in view 0: row0 r 5: view 0
    #   fresh: exit(0), lazy 4K rwx -> restart -> row0 done(0), row1 done(0).
    # row2 (insn 1, still single-stepping in view 0) w 6: 6 > mm 5 -> exit(0), lazy 4K ->
    #   restart -> rows 0-2 done(0). No new event. The final pass of insn 1 is in view 0:
    #   3 completions there; row0's completion in watch was on an abandoned pass.
    # row3 (insn 2): insn 1 ends: mtf 1, singlestep event 1, switch back (svm 2,
    #   switches_in[1]). r 6 in watch: 6 > mm 5 -> exit(1), lazy 4K rx -> restart -> done(1).
    check(
        res,
        {
            "records": 4,
            "instructions": 2,
            "ept_exits": 5,
            "lazy_copies": 4,
            "lazy_copies_4k": 4,
            "lazy_copy_pages": 4,
            "access_violations": 1,
            "mem_access_events": 1,
            "singlestep_events": 1,
            "mtf_exits": 1,
            "switches_vm_event": 2,
        },
        views={
            1: {
                "records_completed": 1,
                "ept_exits": 3,
                "lazy_copies": 2,
                "lazy_copy_pages": 2,
                "access_violations": 1,
                "switches_in": 1,
                "pages_mapped": 2,
                "leaves_4k": 2,
            },
            0: {
                "records_completed": 3,
                "ept_exits": 2,
                "lazy_copies": 2,
                "lazy_copy_pages": 2,
                "switches_in": 1,
                "pages_mapped": 2,
                "leaves_4k": 2,
            },
        },
        gfns={
            (1, 5): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
            (0, 5): {"ept_exits": 1, "lazy_copies": 1},
            (0, 6): {"ept_exits": 1, "lazy_copies": 1},
            (1, 6): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


def test_second_non_fast_step_toggles_single_step_off(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "a"
        default_access = "rx"

        [[view]]
        name = "b"
        default_access = "r"

        [[setup]]
        op = "switch_p2m"
        view = "a"

        [[on_violation]]
        view = "a"
        kind = "w"
        action = "step"
        to = "b"

        [[on_violation]]
        view = "b"
        kind = "w"
        action = "step"
        to = 0
        """,
        ["w 5"],
    )
    # Rev 2 (re-derived: a second non-fast step is Xen's TOGGLE_SINGLESTEP, §6.1):
    # w 5 in a: exit(a), lazy 4K rx -> restart -> viol_w (a,5), exit(a) -> event 1 -> step
    #   to b (svm 1, switches_in[b]), single-step on, return view a -> restart in b: b fresh:
    #   exit(b), lazy 4K r -> restart -> viol_w (b,5), exit(b) -> event 2 -> non-fast step
    #   while single-stepping: switch to 0 (svm 2, switches_in[0]) and single-step OFF ->
    #   restart in view 0: exit(0), lazy 4K -> restart -> done(0).
    # End of trace: no single-step pending: no MTF, no event, the vCPU stays in view 0.
    check(
        res,
        {
            "records": 1,
            "instructions": 1,
            "ept_exits": 5,
            "lazy_copies": 3,
            "lazy_copies_4k": 3,
            "lazy_copy_pages": 3,
            "access_violations": 2,
            "mem_access_events": 2,
            "switches_vm_event": 2,
        },
        views={
            1: {
                "ept_exits": 2,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "access_violations": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
            2: {
                "ept_exits": 2,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "access_violations": 1,
                "switches_in": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
            0: {
                "records_completed": 1,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "switches_in": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
        },
        gfns={
            (1, 5): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
            (2, 5): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
            (0, 5): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


def test_monitor_emulate_skips_rest_of_instruction(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "ro"
        default_access = "r"

        [[setup]]
        op = "switch_p2m"
        view = "ro"

        [[on_violation]]
        kind = "w"
        action = "emulate"
        """,
        ["i1 r 5", "i1 w 5", "i1 w 700", "i1 x 900", "i2 r 5"],
    )
    # row0 (insn 1) r 5: exit(1), lazy 4K r -> done(1).
    # row1 (insn 1) w 5: viol_w (1,5), exit(1) -> event -> emulate: emulations 1; rows 1-3
    #   complete unchecked: records_emulated 3 (no walk of 700 or 900: no lazy copy, and the
    #   x at 900 never meets the rules).
    # row4 (insn 2) r 5: done(1).
    check(
        res,
        {
            "records": 5,
            "instructions": 2,
            "ept_exits": 2,
            "lazy_copies": 1,
            "lazy_copies_4k": 1,
            "lazy_copy_pages": 1,
            "access_violations": 1,
            "mem_access_events": 1,
            "emulations": 1,
            "records_emulated": 3,
        },
        views={
            1: {
                "records_completed": 2,
                "ept_exits": 2,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "access_violations": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            }
        },
        gfns={(1, 5): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1}},
    )


def test_emulated_instruction_spans_other_vcpus_rows(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "ro"
        default_access = "r"

        [[setup]]
        op = "switch_p2m"
        view = "ro"

        [[on_violation]]
        kind = "w"
        action = "emulate"
        """,
        ["v0 i1 w 5", "v1 i1 r 5", "v0 i1 r 6", "v0 i2 r 6"],
    )
    # row0 v0 (insn 1) w 5: exit(1), lazy 4K r -> viol_w (1,5), exit(1) -> event -> emulate:
    #   v0's insn 1 is rows 0 and 2 (consecutive rows of vCPU 0 with insn 1) ->
    #   records_emulated 2.
    # row1 v1 (its own insn 1) r 5: r -> done(1).
    # row2 v0 (insn 1): emulated, not walked (no lazy copy of 6).
    # row3 v0 (insn 2) r 6: 6 > mm 5 -> exit(1), lazy 4K r -> done(1).
    check(
        res,
        {
            "records": 4,
            "instructions": 3,
            "ept_exits": 3,
            "lazy_copies": 2,
            "lazy_copies_4k": 2,
            "lazy_copy_pages": 2,
            "access_violations": 1,
            "mem_access_events": 1,
            "emulations": 1,
            "records_emulated": 2,
        },
        vcpus={
            0: {
                "records": 3,
                "instructions": 2,
                "ept_exits": 3,
                "lazy_copies": 2,
                "lazy_copies_4k": 2,
                "lazy_copy_pages": 2,
                "access_violations": 1,
                "mem_access_events": 1,
                "emulations": 1,
                "records_emulated": 2,
            },
            1: {"records": 1, "instructions": 1},
        },
        views={
            1: {
                "records_completed": 2,
                "ept_exits": 3,
                "lazy_copies": 2,
                "lazy_copy_pages": 2,
                "access_violations": 1,
                "pages_mapped": 2,
                "leaves_4k": 2,
            }
        },
        gfns={
            (1, 5): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
            (1, 6): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


def test_split_rx_switch_ping_pong(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "xv"
        default_access = "x"

        [[view]]
        name = "rwv"
        default_access = "rw"

        [[setup]]
        op = "switch_p2m"
        view = "xv"

        [[on_violation]]
        view = "xv"
        kind = ["r", "w"]
        action = "switch"
        to = "rwv"

        [[on_violation]]
        view = "rwv"
        kind = "x"
        action = "switch"
        to = "xv"
        """,
        ["x 5", "r 5", "x 5", "w 6", "rx 5"],
    )
    # row0 x 5 in xv: exit(xv), lazy 4K x -> done(xv).
    # row1 r 5: x-only -> viol_r (xv,5), exit(xv) -> event -> switch to rwv (svm 1) ->
    #   rwv fresh: exit(rwv), lazy 4K rw -> done(rwv).
    # row2 x 5 in rwv: viol_x (rwv,5), exit(rwv) -> event -> switch to xv (svm 2) -> done(xv).
    # row3 w 6 in xv: 6 > mm 5: exit(xv), lazy 4K x -> viol_w (xv,6), exit(xv) -> event ->
    #   switch to rwv (svm 3) -> exit(rwv), lazy 4K rw -> done(rwv).
    # row4 rx 5 (access 5: kind x) in rwv: viol_x (rwv,5), exit(rwv) -> event -> switch to
    #   xv (svm 4) -> done(xv).
    check(
        res,
        {
            "records": 5,
            "instructions": 5,
            "ept_exits": 8,
            "lazy_copies": 4,
            "lazy_copies_4k": 4,
            "lazy_copy_pages": 4,
            "access_violations": 4,
            "mem_access_events": 4,
            "switches_vm_event": 4,
        },
        views={
            1: {
                "records_completed": 3,
                "ept_exits": 4,
                "lazy_copies": 2,
                "lazy_copy_pages": 2,
                "access_violations": 2,
                "switches_in": 2,
                "pages_mapped": 2,
                "leaves_4k": 2,
            },
            2: {
                "records_completed": 2,
                "ept_exits": 4,
                "lazy_copies": 2,
                "lazy_copy_pages": 2,
                "access_violations": 2,
                "switches_in": 2,
                "pages_mapped": 2,
                "leaves_4k": 2,
            },
        },
        gfns={
            (1, 5): {"ept_exits": 2, "lazy_copies": 1, "viol_r": 1},
            (2, 5): {"ept_exits": 3, "lazy_copies": 1, "viol_x": 2},
            (1, 6): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
            (2, 6): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


def test_codemon_write_execute_flip_with_set_access(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "code"
        default_access = "rx"

        [[setup]]
        op = "switch_p2m"
        view = "code"

        [[on_violation]]
        view = "code"
        kind = "w"
        action = "set-access"
        access = "rw"

        [[on_violation]]
        view = "code"
        kind = "x"
        action = "set-access"
        access = "rx"
        """,
        ["x 600", "w 600", "x 600", "r 600", "x 601"],
    )
    # row0 x 600: code fresh, 2M region 512 above mm 0 -> exit(1), lazy 2M [512,1023] rx ->
    #   done(1).
    # row1 w 600: rx -> viol_w, exit(1) -> event -> set-access rw in code (view >= 1): 4K
    #   rewrite splits the 2M leaf (superpage_splits 1), access_changes 1 -> done(1).
    # row2 x 600: rw -> viol_x, exit(1) -> event -> set-access rx (4K already, no split),
    #   access_changes 2 -> done(1).
    # row3 r 600: rx -> done.   row4 x 601: rx piece -> done.
    # Rev 2: both set-access rewrites replace entries that permitted something (rx, rw):
    # ept_syncs 2; lazy copy + two responses: 3 restarts.
    check(
        res,
        {
            "records": 5,
            "instructions": 5,
            "ept_exits": 3,
            "lazy_copies": 1,
            "lazy_copies_2m": 1,
            "lazy_copy_pages": 512,
            "access_violations": 2,
            "mem_access_events": 2,
            "access_changes": 2,
            "superpage_splits": 1,
            "ept_syncs": 2,
        },
        views={
            1: {
                "records_completed": 5,
                "ept_exits": 3,
                "lazy_copies": 1,
                "lazy_copy_pages": 512,
                "access_violations": 2,
                "pages_mapped": 512,
                "leaves_4k": 512,
            }
        },
        gfns={(1, 600): {"ept_exits": 3, "lazy_copies": 1, "viol_w": 1, "viol_x": 1}},
    )


def test_unmatched_violation_is_an_error(sim):
    with pytest.raises(ReplayRuntimeError):
        sim(
            RAM_1K
            + """
            [[view]]
            name = "v"
            default_access = "rx"

            [[setup]]
            op = "switch_p2m"
            view = "v"

            [[on_violation]]
            kind = "x"
            action = "emulate"
            """,
            ["r 5", "r 6", "w 5"],
        )
    # rows 0, 1 complete after lazy copies; row 2: viol_w in v -> mem_access event -> the only
    # rule filters kind x -> no rule matches -> run-time error naming the row.


def test_switch_ping_pong_livelocks_after_64_restarts(sim):
    res = sim(
        RAM_1K
        + """
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
        kind = "w"
        action = "switch"
        to = "b"

        [[on_violation]]
        view = "b"
        kind = "w"
        action = "switch"
        to = "a"
        """,
        ["w 5", "r 6"],
    )
    # Rev 2 (re-derived: was an error, now a livelock result, §5). Attempts of row 0, each an
    # exit: A1 lazy 4K rx in a (restart 1); A2 viol_w in a -> switch to b (restart 2);
    # A3 lazy in b (3); A4 viol in b -> switch to a (4); A5.. each a violation and a switch.
    # A64 is restart 64; A65 (in a: odd attempts from A5 run in a) would be the 65th:
    # livelock at row 0, its exit, event and switch counted. Row 1 is never processed.
    # Exits 65: a = A1, A2, A5, A7, .., A65 (2 + 31), b = A3, A4, A6, .., A64 (2 + 30).
    # Violations / events / switches 63 (A2, A4..A65); switches into b 32, into a 31.
    check(
        res,
        {
            "records": 1,
            "instructions": 1,
            "ept_exits": 65,
            "lazy_copies": 2,
            "lazy_copies_4k": 2,
            "lazy_copy_pages": 2,
            "access_violations": 63,
            "mem_access_events": 63,
            "switches_vm_event": 63,
            "restarts": 64,
            "livelocked": 1,
            "livelock_record": 0,
        },
        views={
            1: {
                "ept_exits": 33,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "access_violations": 32,
                "switches_in": 31,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
            2: {
                "ept_exits": 32,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "access_violations": 31,
                "switches_in": 32,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
        },
        gfns={
            (1, 5): {"ept_exits": 33, "lazy_copies": 1, "viol_w": 32},
            (2, 5): {"ept_exits": 32, "lazy_copies": 1, "viol_w": 31},
        },
    )


# =========================================================================== special accesses
def test_rx2rw_turns_into_rw_without_event(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "v"
        default_access = "rx2rw"

        [[setup]]
        op = "switch_p2m"
        view = "v"

        [[on_violation]]
        action = "emulate"
        """,
        ["w 600", "w 600", "rw 601", "r 602"],
    )
    # row0 w 600: exit(1), lazy 2M [512,1023] rx2rw -> retry: rx2rw counts as rx -> viol_w,
    #   exit(1) -> rx2rw and k = w: 4K rewrite rw, splitting the 2M leaf (superpage_splits 1),
    #   access_changes 1, retry, no event -> done(1).
    # row1 w 600: rw -> done.
    # row2 rw 601 (access 3: kind w): rx2rw piece -> viol_w, exit -> rewrite rw
    #   (access_changes 2) -> done.
    # row3 r 602: rx2rw permits r -> done.
    # The emulate rule is never used (no event).
    # Rev 2: restarts 3 (the lazy copy, two rx2rw rewrites); each rewrite replaces an entry
    # that permitted rx: ept_syncs 2.
    check(
        res,
        {
            "records": 4,
            "instructions": 4,
            "ept_exits": 3,
            "lazy_copies": 1,
            "lazy_copies_2m": 1,
            "lazy_copy_pages": 512,
            "access_violations": 2,
            "access_changes": 2,
            "superpage_splits": 1,
            "restarts": 3,
            "ept_syncs": 2,
        },
        views={
            1: {
                "records_completed": 4,
                "ept_exits": 3,
                "lazy_copies": 1,
                "lazy_copy_pages": 512,
                "access_violations": 2,
                "pages_mapped": 512,
                "leaves_4k": 512,
            }
        },
        gfns={
            (1, 600): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
            (1, 601): {"ept_exits": 1, "viol_w": 1},
        },
    )


def test_n2rwx_sends_async_event_and_relaxes(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "v"
        default_access = "n2rwx"

        [[setup]]
        op = "switch_p2m"
        view = "v"

        [[on_violation]]
        action = "emulate"
        """,
        ["r 5", "x 6", "r 5"],
    )
    # Rev 2 (re-derived on 4 KiB copies: a 2 MiB n2rwx copy is invisible to Xen and livelocks,
    # see test_n2rwx_superpage_copy_is_invisible_and_livelocks).
    # row0 r 5: fresh v, regions at 0 -> hole 0: exit(1), lazy 4K n2rwx -> restart -> counts
    #   as n -> viol_r, exit(1) -> n2rwx: 4K rewrite rwx (no split; access_changes 1; the
    #   entry permitted nothing: no EPT sync) -> monitor present -> async event (async_events
    #   1; no rule is consulted) -> restart -> done(1).
    # row1 x 6: 6 > mm 5, hole 0: exit, lazy 4K n2rwx -> restart -> viol_x, exit -> rwx
    #   (access_changes 2) -> async 2 -> restart -> done.
    # row2 r 5: rwx -> done.
    check(
        res,
        {
            "records": 3,
            "instructions": 3,
            "ept_exits": 4,
            "lazy_copies": 2,
            "lazy_copies_4k": 2,
            "lazy_copy_pages": 2,
            "access_violations": 2,
            "async_events": 2,
            "access_changes": 2,
        },
        views={
            1: {
                "records_completed": 3,
                "ept_exits": 4,
                "lazy_copies": 2,
                "lazy_copy_pages": 2,
                "access_violations": 2,
                "pages_mapped": 2,
                "leaves_4k": 2,
            }
        },
        gfns={
            (1, 5): {"ept_exits": 2, "lazy_copies": 1, "viol_r": 1},
            (1, 6): {"ept_exits": 2, "lazy_copies": 1, "viol_x": 1},
        },
    )


def test_n2rwx_superpage_copy_is_invisible_and_livelocks(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "v"
        default_access = "n2rwx"

        [[setup]]
        op = "switch_p2m"
        view = "v"
        """,
        ["r 600", "r 5"],
    )
    # Rev 2 (§3 invisible superpages): r 600: fresh v, 2M region above mm 0 -> hole 9: exit(1),
    # lazy 2M n2rwx (mm 1023) -> restart 1. The hardware faults on the leaf (no bits); its
    # suppress-VE bit is 1, #VE is off anyway -> exit; Xen's lookup does not see a 2M leaf
    # that permits nothing: no valid leaf -> lazy copy again, hole order = the empty slot at
    # the 2M level = 9 -> 2M again -> restart 2 ... The attempt after restart 64 is the 65th
    # exit and copy: livelock at row 0. Row 1 is never processed.
    check(
        res,
        {
            "records": 1,
            "instructions": 1,
            "ept_exits": 65,
            "lazy_copies": 65,
            "lazy_copies_2m": 65,
            "lazy_copy_pages": 65 * 512,
            "restarts": 64,
            "livelocked": 1,
            "livelock_record": 0,
        },
        views={
            1: {
                "ept_exits": 65,
                "lazy_copies": 65,
                "lazy_copy_pages": 65 * 512,
                "pages_mapped": 512,
                "leaves_2m": 1,
            }
        },
        gfns={(1, 600): {"ept_exits": 65, "lazy_copies": 65}},
    )


def test_n2rwx_without_monitor_relaxes_once_when_not_required(sim):
    res = sim(
        """
        [domain]
        ram = [[0, 1023]]
        monitor = false
        access_required = false

        [[view]]
        name = "v"
        default_access = "n2rwx"

        [[setup]]
        op = "switch_p2m"
        view = "v"
        """,
        ["r 5", "r 7"],
    )
    # Rev 2 (re-derived on 4 KiB copies: a 2 MiB n2rwx copy livelocks, §3).
    # row0 r 5: exit(1), lazy 4K n2rwx -> restart 1 -> viol_r, exit(1) -> n2rwx: 4K rwx
    #   (access_changes 1) -> no monitor, not required: relax, but not again for n2rwx (no
    #   second access change), no event -> restart 2 -> done(1).
    # row1 r 7: 7 > mm 5, regions at 0 -> hole 0: exit, lazy 4K n2rwx -> restart 3 -> viol_r,
    #   exit -> rwx (access_changes 2) -> restart 4 -> done.
    # No EPT syncs: n2rwx entries permit nothing.
    check(
        res,
        {
            "records": 2,
            "instructions": 2,
            "ept_exits": 4,
            "lazy_copies": 2,
            "lazy_copies_4k": 2,
            "lazy_copy_pages": 2,
            "access_violations": 2,
            "access_changes": 2,
            "restarts": 4,
        },
        views={
            1: {
                "records_completed": 2,
                "ept_exits": 4,
                "lazy_copies": 2,
                "lazy_copy_pages": 2,
                "access_violations": 2,
                "pages_mapped": 2,
                "leaves_4k": 2,
            }
        },
        gfns={
            (1, 5): {"ept_exits": 2, "lazy_copies": 1, "viol_r": 1},
            (1, 7): {"ept_exits": 2, "lazy_copies": 1, "viol_r": 1},
        },
    )


def test_n2rwx_without_monitor_crashes_when_required(sim):
    res = sim(
        """
        [domain]
        ram = [[0, 1023]]
        monitor = false

        [[view]]
        name = "v"
        default_access = "n2rwx"

        [[setup]]
        op = "switch_p2m"
        view = "v"
        """,
        ["r 5", "r 7"],
    )
    # Rev 2 (re-derived on a 4 KiB copy: a 2 MiB n2rwx copy livelocks, §3).
    # row0 r 5: exit(1), lazy 4K n2rwx -> restart 1 -> viol_r, exit(1) -> n2rwx: 4K rwx
    #   (access_changes 1), then "no monitor" with access_required -> crash: crashed 1,
    #   crash_record 0. Row 1 is never processed; no end-of-trace instruction bookkeeping.
    check(
        res,
        {
            "records": 1,
            "instructions": 1,
            "ept_exits": 2,
            "lazy_copies": 1,
            "lazy_copies_4k": 1,
            "lazy_copy_pages": 1,
            "access_violations": 1,
            "access_changes": 1,
            "crashed": 1,
            "crash_record": 0,
        },
        views={
            1: {
                "ept_exits": 2,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "access_violations": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            }
        },
        gfns={(1, 5): {"ept_exits": 2, "lazy_copies": 1, "viol_r": 1}},
    )


def test_crash_without_monitor_with_access_required(sim):
    res = sim(
        """
        [domain]
        ram = [[0, 1023]]
        monitor = false

        [[view]]
        name = "v"
        default_access = "rx"

        [[setup]]
        op = "switch_p2m"
        view = "v"
        """,
        ["v0 r 5", "v1 r 7", "v0 w 5", "v1 r 8", "v2 r 9"],
    )
    # row0 v0 r 5: exit(1), lazy 4K rx -> done(1).
    # row1 v1 r 7: 7 > mm 5 -> exit(1), lazy 4K -> done(1).
    # row2 v0 w 5: viol_w (1,5), exit(1) -> no monitor, access_required -> crash:
    #   crashed 1, crash_record 2 (in every vCPU row); the crashing row counts in records.
    # rows 3 and 4 are never processed; vCPU 2 appears in the trace, so it has a row of
    # zeros (plus crashed / crash_record).
    check(
        res,
        {
            "records": 3,
            "instructions": 3,
            "ept_exits": 3,
            "lazy_copies": 2,
            "lazy_copies_4k": 2,
            "lazy_copy_pages": 2,
            "access_violations": 1,
            "crashed": 1,
            "crash_record": 2,
        },
        vcpus={
            0: {
                "records": 2,
                "instructions": 2,
                "ept_exits": 2,
                "lazy_copies": 1,
                "lazy_copies_4k": 1,
                "lazy_copy_pages": 1,
                "access_violations": 1,
            },
            1: {
                "records": 1,
                "instructions": 1,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copies_4k": 1,
                "lazy_copy_pages": 1,
            },
            2: {},
        },
        views={
            1: {
                "records_completed": 2,
                "ept_exits": 3,
                "lazy_copies": 2,
                "lazy_copy_pages": 2,
                "access_violations": 1,
                "pages_mapped": 2,
                "leaves_4k": 2,
            }
        },
        gfns={
            (1, 5): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
            (1, 7): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


def test_relax_without_access_required(sim):
    res = sim(
        """
        [domain]
        ram = [[0, 1023]]
        monitor = false
        access_required = false

        [[view]]
        name = "v"
        default_access = "rx"

        [[setup]]
        op = "switch_p2m"
        view = "v"
        """,
        ["w 600", "w 600", "w 601"],
    )
    # row0 w 600: exit(1), lazy 2M rx -> viol_w, exit(1) -> no monitor, not required: 4K
    #   rwx (split: superpage_splits 1; access_changes 1), no event -> done(1).
    # row1 w 600: rwx -> done.
    # row2 w 601: rx piece -> viol_w, exit -> relax (access_changes 2) -> done.
    # Rev 2: restarts 3 (the lazy copy, two relax rewrites); each relax rewrites an rx entry:
    # ept_syncs 2.
    check(
        res,
        {
            "records": 3,
            "instructions": 3,
            "ept_exits": 3,
            "lazy_copies": 1,
            "lazy_copies_2m": 1,
            "lazy_copy_pages": 512,
            "access_violations": 2,
            "access_changes": 2,
            "superpage_splits": 1,
            "restarts": 3,
            "ept_syncs": 2,
        },
        views={
            1: {
                "records_completed": 3,
                "ept_exits": 3,
                "lazy_copies": 1,
                "lazy_copy_pages": 512,
                "access_violations": 2,
                "pages_mapped": 512,
                "leaves_4k": 512,
            }
        },
        gfns={
            (1, 600): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
            (1, 601): {"ept_exits": 1, "viol_w": 1},
        },
    )


def test_shatter_superpage_when_exec_sp_false(sim):
    res = sim(
        """
        [domain]
        ram = [[0, 1023]]
        exec_sp = false
        """,
        ["x 600", "x 601", "r 602", "x 0"],
    )
    # row0 x 600 (view 0): exit(0), lazy 2M [512,1023] rwx -> retry: x on a superpage with
    #   exec_sp false -> not permitted -> exit(0); leaf valid, rwx: no access violation ->
    #   §5.8 shatter: the 2M leaf splits into 512 executable 4K leaves (shatters 1, NOT
    #   superpage_splits) -> retry -> done(0).
    # row1 x 601: 4K rwx -> done (the second exec in the region completes).
    # row2 r 602: done.
    # row3 x 0: 0 <= mm 1023 -> walk: 2M-level entry [0,511] empty -> hole 9 -> exit(0),
    #   lazy 2M -> exec on a superpage -> exit(0) -> shatter 2 -> done(0).
    # Rev 2: each shatter rewrites an rwx leaf: ept_syncs 2.
    check(
        res,
        {
            "records": 4,
            "instructions": 4,
            "ept_exits": 4,
            "lazy_copies": 2,
            "lazy_copies_2m": 2,
            "lazy_copy_pages": 1024,
            "shatters": 2,
            "ept_syncs": 2,
        },
        views={
            0: {
                "records_completed": 4,
                "ept_exits": 4,
                "lazy_copies": 2,
                "lazy_copy_pages": 1024,
                "pages_mapped": 1024,
                "leaves_4k": 1024,
            }
        },
        gfns={
            (0, 600): {"ept_exits": 2, "lazy_copies": 1},
            (0, 0): {"ept_exits": 2, "lazy_copies": 1},
        },
    )


def test_set_access_splits_a_1g_leaf_513_times(sim):
    res = sim(
        f"""
        [domain]
        host_order = 18
        ram = [[0, {GIB_PAGES - 1}]]

        [[view]]
        name = "v"
        default_access = "rx"

        [[setup]]
        op = "switch_p2m"
        view = "v"

        [[on_violation]]
        kind = "w"
        action = "set-access"
        """,
        ["r 0", "w 5", "w 6", "w 100000"],
    )
    # Host: one 1G leaf.
    # r 0: v fresh: empty root -> hole 18 -> min(18, 18): exit(1), lazy 1G rx -> done(1).
    # w 5: 1G rx -> viol_w (1,5), exit(1) -> event -> set-access rwx in v: 4K rewrite of 5
    #   takes the 1G leaf down to 4K: superpage_splits 513; access_changes 1 -> done(1).
    # w 6, w 100000: 4K rx pieces -> viol_w, exit, event, set-access (no split) -> done.
    # Rev 2: three set-access rewrites of rx entries: ept_syncs 3.
    check(
        res,
        {
            "records": 4,
            "instructions": 4,
            "ept_exits": 4,
            "lazy_copies": 1,
            "lazy_copies_1g": 1,
            "lazy_copy_pages": GIB_PAGES,
            "access_violations": 3,
            "mem_access_events": 3,
            "access_changes": 3,
            "superpage_splits": 513,
            "ept_syncs": 3,
        },
        views={
            1: {
                "records_completed": 4,
                "ept_exits": 4,
                "lazy_copies": 1,
                "lazy_copy_pages": GIB_PAGES,
                "access_violations": 3,
                "pages_mapped": GIB_PAGES,
                "leaves_4k": GIB_PAGES,
            }
        },
        gfns={
            (1, 0): {"ept_exits": 1, "lazy_copies": 1},
            (1, 5): {"ept_exits": 1, "viol_w": 1},
            (1, 6): {"ept_exits": 1, "viol_w": 1},
            (1, 100000): {"ept_exits": 1, "viol_w": 1},
        },
    )


def test_shatter_of_a_1g_leaf_counts_one_shatter(sim):
    res = sim(
        f"""
        [domain]
        host_order = 18
        ram = [[0, {GIB_PAGES - 1}]]
        exec_sp = false
        """,
        ["x 0", "x 600", "x 5"],
    )
    # x 0 (view 0): exit(0), lazy 1G rwx -> x on a superpage with exec_sp false -> exit(0),
    #   no access violation -> §5.8 shatter: 4K rewrite of 0 takes the 1G leaf down to 4K
    #   (all 2M pieces too): shatters 1, superpage_splits 0 -> done(0).
    # x 600, x 5: 4K rwx -> done.
    # Rev 2: the shatter rewrites an rwx leaf: ept_syncs 1.
    check(
        res,
        {
            "records": 3,
            "instructions": 3,
            "ept_exits": 2,
            "lazy_copies": 1,
            "lazy_copies_1g": 1,
            "lazy_copy_pages": GIB_PAGES,
            "shatters": 1,
            "ept_syncs": 1,
        },
        views={
            0: {
                "records_completed": 3,
                "ept_exits": 2,
                "lazy_copies": 1,
                "lazy_copy_pages": GIB_PAGES,
                "pages_mapped": GIB_PAGES,
                "leaves_4k": GIB_PAGES,
            }
        },
        gfns={(0, 0): {"ept_exits": 2, "lazy_copies": 1}},
    )


def test_explicit_index_and_switch_into_invisible_view(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "a"
        default_access = "rx"

        [[view]]
        name = "b"
        index = 1
        visible = false

        [[setup]]
        op = "switch_p2m"
        view = "a"

        [[on_violation]]
        view = "a"
        kind = "w"
        action = "switch"
        to = "b"
        """,
        ["w 5"],
    )
    # b takes its explicit index 1 first; a takes the lowest free index >= 1: 2.
    # w 5 in a (2): exit(2), lazy 4K rx -> viol_w (2,5), exit(2) -> event -> switch to b: a
    #   vm_event switch ignores visibility (only VMFUNC and switch_p2m need it) -> svm 1,
    #   switches_in[1] -> b fresh: exit(1), lazy 4K rwx -> done(1).
    check(
        res,
        {
            "records": 1,
            "instructions": 1,
            "ept_exits": 3,
            "lazy_copies": 2,
            "lazy_copies_4k": 2,
            "lazy_copy_pages": 2,
            "access_violations": 1,
            "mem_access_events": 1,
            "switches_vm_event": 1,
        },
        views={
            2: {
                "ept_exits": 2,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "access_violations": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
            1: {
                "records_completed": 1,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "switches_in": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
        },
        gfns={
            (2, 5): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
            (1, 5): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


def test_emulate_while_single_stepping_ends_the_step(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "a"
        default_access = "rx"

        [[view]]
        name = "b"
        default_access = "r"

        [[setup]]
        op = "switch_p2m"
        view = "a"

        [[on_violation]]
        view = "a"
        kind = "w"
        action = "step"
        to = "b"

        [[on_violation]]
        view = "b"
        kind = "w"
        action = "emulate"
        """,
        ["i1 w 5", "i1 w 6", "i2 r 5"],
    )
    # row0 (insn 1) w 5 in a: exit(a), lazy 4K rx -> viol_w (a,5), exit(a) -> event -> step
    #   to b (svm 1, switches_in[b]), return view a -> b fresh: exit(b), lazy 4K r ->
    #   viol_w (b,5), exit(b) -> event -> emulate: rows 0 and 1 complete unchecked
    #   (emulations 1, records_emulated 2).
    # row1 (insn 1): emulated.
    # row2 (insn 2): insn 1 ends like any other: mtf 1, singlestep event 1, back to a (svm 2,
    #   switches_in[a]). r 5 in a: rx -> done(a).
    check(
        res,
        {
            "records": 3,
            "instructions": 2,
            "ept_exits": 4,
            "lazy_copies": 2,
            "lazy_copies_4k": 2,
            "lazy_copy_pages": 2,
            "access_violations": 2,
            "mem_access_events": 2,
            "singlestep_events": 1,
            "mtf_exits": 1,
            "switches_vm_event": 2,
            "emulations": 1,
            "records_emulated": 2,
        },
        views={
            1: {
                "records_completed": 1,
                "ept_exits": 2,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "access_violations": 1,
                "switches_in": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
            2: {
                "ept_exits": 2,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "access_violations": 1,
                "switches_in": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
        },
        gfns={
            (1, 5): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
            (2, 5): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
        },
    )


def test_ve_only_on_vcpus_with_notify_enabled(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "pt"

        [[setup]]
        op = "set_suppress_ve"
        view = "pt"
        gfns = 10
        suppress = false

        [[setup]]
        op = "set_mem_access"
        view = "pt"
        gfns = 10
        access = "r"

        [[setup]]
        op = "enable_notify"
        vcpus = [0]

        [[setup]]
        op = "switch_p2m"
        view = "pt"

        [on_ve]
        action = "emulate"

        [[on_violation]]
        action = "emulate"
        """,
        ["v0 w 10", "v1 w 10"],
    )
    # Setup: pt[10] = 4K leaf, access r, suppress-VE 0. #VE enabled on vCPU 0 only.
    # row0 v0 w 10: violation, #VE enabled, not busy, bit 0 -> #VE (ve_delivered pt) -> agent
    #   emulate (ve_emulations 1, records_emulated 1).
    # row1 v1 w 10: vCPU 1 has no #VE: not convertible and not ve_blocked (that needs #VE
    #   enabled) -> exit(pt), viol_w (1,10) -> event -> monitor emulate (emulations 1,
    #   records_emulated 1).
    check(
        res,
        {
            "records": 2,
            "instructions": 2,
            "ept_exits": 1,
            "access_violations": 1,
            "mem_access_events": 1,
            "ve_delivered": 1,
            "ve_emulations": 1,
            "emulations": 1,
            "records_emulated": 2,
        },
        vcpus={
            0: {
                "records": 1,
                "instructions": 1,
                "ve_delivered": 1,
                "ve_emulations": 1,
                "records_emulated": 1,
            },
            1: {
                "records": 1,
                "instructions": 1,
                "ept_exits": 1,
                "access_violations": 1,
                "mem_access_events": 1,
                "emulations": 1,
                "records_emulated": 1,
            },
        },
        views={
            1: {
                "ept_exits": 1,
                "access_violations": 1,
                "ve_delivered": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            }
        },
        gfns={(1, 10): {"ept_exits": 1, "viol_w": 1, "ve_delivered": 1}},
    )


def test_ve_takes_precedence_over_rx2rw_promotion(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "v"

        [[setup]]
        op = "set_suppress_ve"
        view = "v"
        gfns = 5
        suppress = false

        [[setup]]
        op = "set_mem_access"
        view = "v"
        gfns = 5
        access = "rx2rw"

        [[setup]]
        op = "enable_notify"

        [[setup]]
        op = "switch_p2m"
        view = "v"

        [on_ve]
        action = "emulate"

        [[on_violation]]
        action = "emulate"
        """,
        ["w 5", "w 5", "r 5"],
    )
    # Setup: v[5] = 4K leaf, bit 0, access rx2rw.
    # w 5: rx2rw permits r and x only -> EPT violation -> §5.3 comes before §5.7: #VE
    #   (ve_delivered) -> agent emulate (ve_emulations 1, records_emulated 1). The entry is
    #   never promoted to rw (no exit, no access change).
    # w 5 (next instruction, busy cleared): the same again (ve 2, ve_emulations 2).
    # r 5: permitted -> done(1).
    check(
        res,
        {
            "records": 3,
            "instructions": 3,
            "ve_delivered": 2,
            "ve_emulations": 2,
            "records_emulated": 2,
        },
        views={1: {"records_completed": 1, "ve_delivered": 2, "pages_mapped": 1, "leaves_4k": 1}},
        gfns={(1, 5): {"ve_delivered": 2}},
    )


# =========================================================================== several vCPUs
def test_interleaved_vcpus_each_single_step(sim):
    res = sim(
        XEN_ACCESS_WRITE.format(fast="false"),
        ["v0 i10 w 5", "v1 i20 w 6", "v0 i10 w 7", "v1 i21 r 6", "v0 i11 r 5"],
    )
    # Both vCPUs start on watch (rx).
    # row0 v0 (insn 10) w 5: exit(1), lazy 4K rx -> viol_w (1,5), exit(1) -> event -> step to 0
    #   (svm, switches_in[0] 1) -> view 0 fresh: exit(0), lazy 4K -> done(0).
    # row1 v1 (insn 20) w 6: watch: 6 > mm 5 -> exit(1), lazy 4K rx -> viol_w (1,6), exit(1) ->
    #   event -> step to 0 (svm, switches_in[0] 2) -> view 0: 6 > mm 5: exit(0), lazy 4K ->
    #   done(0).
    # row2 v0 (insn 10 again: same instruction of vCPU 0) w 7: still in view 0: 7 > mm 6 ->
    #   exit(0), lazy 4K -> done(0).
    # row3 v1 (insn 21): v1's insn 20 ends: mtf, singlestep event, back to watch (svm,
    #   switches_in[1] 1). r 6 in watch: rx -> done(1).
    # row4 v0 (insn 11): v0's insn 10 ends: mtf, singlestep event, back to watch (svm,
    #   switches_in[1] 2). r 5: done(1).
    # End of trace: no step pending.
    check(
        res,
        {
            "records": 5,
            "instructions": 4,
            "ept_exits": 7,
            "lazy_copies": 5,
            "lazy_copies_4k": 5,
            "lazy_copy_pages": 5,
            "access_violations": 2,
            "mem_access_events": 2,
            "singlestep_events": 2,
            "mtf_exits": 2,
            "switches_vm_event": 4,
        },
        vcpus={
            0: {
                "records": 3,
                "instructions": 2,
                "ept_exits": 4,
                "lazy_copies": 3,
                "lazy_copies_4k": 3,
                "lazy_copy_pages": 3,
                "access_violations": 1,
                "mem_access_events": 1,
                "singlestep_events": 1,
                "mtf_exits": 1,
                "switches_vm_event": 2,
            },
            1: {
                "records": 2,
                "instructions": 2,
                "ept_exits": 3,
                "lazy_copies": 2,
                "lazy_copies_4k": 2,
                "lazy_copy_pages": 2,
                "access_violations": 1,
                "mem_access_events": 1,
                "singlestep_events": 1,
                "mtf_exits": 1,
                "switches_vm_event": 2,
            },
        },
        views={
            1: {
                "records_completed": 2,
                "ept_exits": 4,
                "lazy_copies": 2,
                "lazy_copy_pages": 2,
                "access_violations": 2,
                "switches_in": 2,
                "pages_mapped": 2,
                "leaves_4k": 2,
            },
            0: {
                "records_completed": 3,
                "ept_exits": 3,
                "lazy_copies": 3,
                "lazy_copy_pages": 3,
                "switches_in": 2,
                "pages_mapped": 3,
                "leaves_4k": 3,
            },
        },
        gfns={
            (1, 5): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
            (1, 6): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
            (0, 5): {"ept_exits": 1, "lazy_copies": 1},
            (0, 6): {"ept_exits": 1, "lazy_copies": 1},
            (0, 7): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


def test_three_vcpus_fast_single_step(sim):
    res = sim(
        XEN_ACCESS_WRITE.format(fast="true"),
        ["v0 w 5", "v1 w 5", "v2 r 5", "v0 r 5", "v1 w 5"],
    )
    # row0 v0 w 5: exit(1), lazy 4K rx -> viol_w, exit(1) -> event -> fast step to 0 (svm,
    #   switches_in[0] 1) -> exit(0), lazy 4K -> done(0).
    # row1 v1 w 5: viol_w, exit(1) -> event -> fast step to 0 (svm, switches_in[0] 2) ->
    #   view 0 holds 5 -> done(0).
    # row2 v2 r 5: rx -> done(1).
    # row3 v0: v0's instruction ends: mtf, fast: Xen switches back (sfs, switches_in[1] 1), no
    #   singlestep event. r 5 -> done(1).
    # row4 v1: v1's instruction ends: mtf, sfs (switches_in[1] 2). w 5: viol_w, exit(1) ->
    #   event -> fast step to 0 (svm, switches_in[0] 3) -> done(0).
    # End of trace: v1's open instruction ends: mtf, sfs (switches_in[1] 3).
    check(
        res,
        {
            "records": 5,
            "instructions": 5,
            "ept_exits": 5,
            "lazy_copies": 2,
            "lazy_copies_4k": 2,
            "lazy_copy_pages": 2,
            "access_violations": 3,
            "mem_access_events": 3,
            "mtf_exits": 3,
            "switches_vm_event": 3,
            "switches_fast_ss": 3,
        },
        vcpus={
            0: {
                "records": 2,
                "instructions": 2,
                "ept_exits": 3,
                "lazy_copies": 2,
                "lazy_copies_4k": 2,
                "lazy_copy_pages": 2,
                "access_violations": 1,
                "mem_access_events": 1,
                "mtf_exits": 1,
                "switches_vm_event": 1,
                "switches_fast_ss": 1,
            },
            1: {
                "records": 2,
                "instructions": 2,
                "ept_exits": 2,
                "access_violations": 2,
                "mem_access_events": 2,
                "mtf_exits": 2,
                "switches_vm_event": 2,
                "switches_fast_ss": 2,
            },
            2: {"records": 1, "instructions": 1},
        },
        views={
            1: {
                "records_completed": 2,
                "ept_exits": 4,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "access_violations": 3,
                "switches_in": 3,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
            0: {
                "records_completed": 3,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "switches_in": 3,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
        },
        gfns={
            (1, 5): {"ept_exits": 4, "lazy_copies": 1, "viol_w": 3},
            (0, 5): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


# =========================================================================== DRAKVUF and §8 calibration
HIDDEN_BREAKPOINT = (
    RAM_1K
    + """
[[view]]
name = "idx"

[[setup]]
op = "set_mem_access"
view = "idx"
gfns = 5
access = "x"

[[setup]]
op = "switch_p2m"
view = "idx"

[[on_violation]]
view = "idx"
kind = ["r", "w"]
action = "step"
to = 0
fast = {fast}
"""
)


def _delta(after: Result, before: Result) -> dict:
    return {
        k: after.total[k] - before.total[k]
        for k in TOTAL_COUNTERS
        if k not in ("crash_record", "livelock_record")
    }


def test_calibration_hidden_breakpoint_read_costs_248400_cycles(sim):
    costs = effective_costs({})
    one = sim(HIDDEN_BREAKPOINT.format(fast="false"), ["r 5"])
    two = sim(HIDDEN_BREAKPOINT.format(fast="false"), ["r 5", "r 5"])
    # Setup: prepopulate 2M [0,511] into idx (rwx), split (setup_splits 1), idx[5] = x.
    # Trace "r 5": r on x-only -> viol_r (1,5), exit(1) -> event -> step to 0 (svm 1,
    #   switches_in[0]) -> view 0 fresh: exit(0), lazy 4K -> done(0). End of trace: mtf 1,
    #   singlestep event 1, back to idx (svm 2, switches_in[1]).
    check(
        one,
        {
            "records": 1,
            "instructions": 1,
            "ept_exits": 2,
            "lazy_copies": 1,
            "lazy_copies_4k": 1,
            "lazy_copy_pages": 1,
            "access_violations": 1,
            "mem_access_events": 1,
            "singlestep_events": 1,
            "mtf_exits": 1,
            "switches_vm_event": 2,
            "setup_splits": 1,
        },
        views={
            1: {
                "ept_exits": 1,
                "access_violations": 1,
                "switches_in": 1,
                "pages_mapped": 512,
                "leaves_4k": 512,
            },
            0: {
                "records_completed": 1,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "switches_in": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
        },
        gfns={(1, 5): {"ept_exits": 1, "viol_r": 1}, (0, 5): {"ept_exits": 1, "lazy_copies": 1}},
    )
    # 5000*2 + 500 + (90000 + 30000)*2 + 3000 + 200*2 = 253,900 (includes view 0's lazy copy).
    assert cycles(one.total, costs)["cycles_total"] == 253_900
    # The second read finds view 0 warm: exactly SPEC §8's "one read of a hidden breakpoint":
    # viol_r, exit(1), event, step (svm), done in view 0, then mtf, singlestep event, svm.
    delta = _delta(two, one)
    expected = _full(
        {
            "records": 1,
            "instructions": 1,
            "ept_exits": 1,
            "access_violations": 1,
            "mem_access_events": 1,
            "singlestep_events": 1,
            "mtf_exits": 1,
            "switches_vm_event": 2,
        },
        "delta",
    )
    expected.pop("crash_record")
    expected.pop("livelock_record")
    assert delta == expected
    # 5000 + (90000 + 30000)*2 + 3000 + 200*2 = 248,400.
    assert cycles(delta, costs)["cycles_total"] == 248_400


def test_calibration_fast_single_step_costs_128400_cycles(sim):
    costs = effective_costs({})
    slow_one = sim(HIDDEN_BREAKPOINT.format(fast="false"), ["r 5"])
    slow_two = sim(HIDDEN_BREAKPOINT.format(fast="false"), ["r 5", "r 5"])
    one = sim(HIDDEN_BREAKPOINT.format(fast="true"), ["r 5"])
    two = sim(HIDDEN_BREAKPOINT.format(fast="true"), ["r 5", "r 5"])
    # Fast: the instruction end is an MTF exit and Xen switches back itself (sfs), no
    # singlestep event. Trace "r 5": exit(1), event, svm, exit(0) + lazy 4K, mtf, sfs.
    check(
        one,
        {
            "records": 1,
            "instructions": 1,
            "ept_exits": 2,
            "lazy_copies": 1,
            "lazy_copies_4k": 1,
            "lazy_copy_pages": 1,
            "access_violations": 1,
            "mem_access_events": 1,
            "mtf_exits": 1,
            "switches_vm_event": 1,
            "switches_fast_ss": 1,
            "setup_splits": 1,
        },
        views={
            1: {
                "ept_exits": 1,
                "access_violations": 1,
                "switches_in": 1,
                "pages_mapped": 512,
                "leaves_4k": 512,
            },
            0: {
                "records_completed": 1,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "switches_in": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
        },
        gfns={(1, 5): {"ept_exits": 1, "viol_r": 1}, (0, 5): {"ept_exits": 1, "lazy_copies": 1}},
    )
    delta = _delta(two, one)
    expected = _full(
        {
            "records": 1,
            "instructions": 1,
            "ept_exits": 1,
            "access_violations": 1,
            "mem_access_events": 1,
            "mtf_exits": 1,
            "switches_vm_event": 1,
            "switches_fast_ss": 1,
        },
        "delta",
    )
    expected.pop("crash_record")
    expected.pop("livelock_record")
    assert delta == expected
    # 5000 + 90000 + 30000 + 3000 + 200*2 = 128,400.
    fast = cycles(delta, costs)["cycles_total"]
    slow = cycles(_delta(slow_two, slow_one), costs)["cycles_total"]
    assert fast == 128_400
    assert slow == 248_400
    # (248,400 - 128,400) / 248,400 = 48.3 %: inside the 36-52 % band of SPEC §8.
    assert 0.36 <= (slow - fast) / slow <= 0.52


def test_drakvuf_hidden_breakpoint_with_shadow_page(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "idx"

        [[view]]
        name = "idr"

        [[setup]]
        op = "add_ram"
        gfns = { above_ram = [0, 1] }

        [[setup]]
        op = "change_gfn"
        view = "idx"
        old = 5
        new = { above_ram = [0, 0] }

        [[setup]]
        op = "change_gfn"
        view = "idr"
        old = { above_ram = [0, 0] }
        new = { above_ram = [1, 1] }

        [[setup]]
        op = "set_mem_access"
        view = "idx"
        gfns = 5
        access = "x"

        [[setup]]
        op = "set_mem_access"
        view = "idx"
        gfns = { above_ram = [0, 0] }
        access = "n"

        [[setup]]
        op = "switch_p2m"
        view = "idx"

        [[on_violation]]
        view = "idx"
        gfns = { above_ram = [0, 0] }
        action = "step"
        to = "idr"

        [[on_violation]]
        view = "idx"
        kind = ["r", "w"]
        action = "step"
        to = 0
        """,
        ["x 5", "r 5", "x 5", "r 1024"],
    )
    # ram_top 1023: shadow R = 1024, sink S = 1025 (add_ram: host 4K RAM leaves, rwx).
    # change_gfn idx 5 -> R: prepopulate 2M [0,511] into idx (rwx); host R leaf -> idx[5] =
    #   4K (R's mfn, rwx): split (setup_splits 1).
    # change_gfn idr R -> S: prepopulate host 4K leaf R into idr; idr[R] = 4K (S's mfn, rwx).
    # set_mem_access idx 5 x: 4K rewrite. set_mem_access idx R n: prepopulate 4K, rewrite n.
    # row0 x 5: x -> done(idx).
    # row1 r 5: viol_r (1,5), exit(1) -> event -> rule 1 (gfns R) no; rule 2 -> step to 0
    #   (svm 1, switches_in[0]) -> view 0 fresh: exit(0), lazy 4K -> done(0).
    # row2: row1's instruction ends: mtf 1, singlestep event 1, back to idx (svm 2,
    #   switches_in[idx] 1). x 5 -> done(idx).
    # row3 r R: n -> viol_r (1,R), exit(1) -> event -> rule 1 -> step to idr (svm 3,
    #   switches_in[idr]) -> idr[R] rwx -> done(idr).
    # End of trace: mtf 2, singlestep event 2, back to idx (svm 4, switches_in[idx] 2).
    check(
        res,
        {
            "records": 4,
            "instructions": 4,
            "ept_exits": 3,
            "lazy_copies": 1,
            "lazy_copies_4k": 1,
            "lazy_copy_pages": 1,
            "access_violations": 2,
            "mem_access_events": 2,
            "singlestep_events": 2,
            "mtf_exits": 2,
            "switches_vm_event": 4,
            "setup_splits": 1,
        },
        views={
            1: {
                "records_completed": 2,
                "ept_exits": 2,
                "access_violations": 2,
                "switches_in": 2,
                "pages_mapped": 513,
                "leaves_4k": 513,
            },
            2: {"records_completed": 1, "switches_in": 1, "pages_mapped": 1, "leaves_4k": 1},
            0: {
                "records_completed": 1,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "switches_in": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
        },
        gfns={
            (1, 5): {"ept_exits": 1, "viol_r": 1},
            (1, 1024): {"ept_exits": 1, "viol_r": 1},
            (0, 5): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


# =========================================================================== policy refused
@pytest.mark.parametrize("access", ["w", "wx"])
def test_write_without_read_policy_is_refused(access):
    # SPEC §3: w and wx are rejected at policy check (EPT misconfiguration).
    with pytest.raises(PolicyError):
        make_policy(f"""
            [[view]]
            name = "v"
            default_access = "{access}"
            """)


# =========================================================================== Revision 2 (§3, §5, §6.1, §9)
BASELINE_1K = RAM_1K


def test_three_row_instruction_restarts_after_each_lazy_copy(sim):
    res = sim(BASELINE_1K, ["i1 x 5", "i1 r 6", "i1 w 600"])
    # One instruction of three rows in view 0 (fresh, rwx).
    # row0 x 5: 5 > mm 0, regions at 0 -> hole 0: exit(0), lazy 4K, mm 5 -> restart 1 ->
    #   row0 again: done(0).
    # row1 r 6: 6 > mm 5 -> hole 0: exit(0), lazy 4K -> restart 2 -> row0 done, row1 done.
    # row2 w 600: 2M region 512 above mm 6 -> hole 9: exit(0), lazy 2M -> restart 3 ->
    #   rows 0, 1, 2 done(0). Only the final pass counts: records_completed 3.
    check(
        res,
        {
            "records": 3,
            "instructions": 1,
            "ept_exits": 3,
            "lazy_copies": 3,
            "lazy_copies_4k": 2,
            "lazy_copies_2m": 1,
            "lazy_copy_pages": 514,
            "restarts": 3,
        },
        views={
            0: {
                "records_completed": 3,
                "ept_exits": 3,
                "lazy_copies": 3,
                "lazy_copy_pages": 514,
                "pages_mapped": 514,
                "leaves_4k": 2,
                "leaves_2m": 1,
            }
        },
        gfns={
            (0, 5): {"ept_exits": 1, "lazy_copies": 1},
            (0, 6): {"ept_exits": 1, "lazy_copies": 1},
            (0, 600): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


def test_step_restarts_the_instruction_and_copies_its_fetch_page_into_view0(sim):
    res = sim(XEN_ACCESS_WRITE.format(fast="false"), ["i1 x 5", "i1 r 6", "i1 w 7", "i2 x 5"])
    # row0 x 5 in watch (fresh): hole 0 -> exit(1), lazy 4K rx -> restart 1 -> done(1).
    # row1 r 6: exit(1), lazy 4K rx -> restart 2 -> rows 0, 1 done(1).
    # row2 w 7: exit(1), lazy 4K rx -> restart 3 -> rows 0, 1 done; w 7 on rx -> viol_w (1,7),
    #   exit(1), event -> step to 0 (svm 1, switches_in[0]; single-step on, return watch) ->
    #   restart 4 in view 0 (fresh): x 5 exit(0), lazy 4K (the fetch page copied into the
    #   step view) -> restart 5 -> x 5 done; r 6 exit(0), lazy -> restart 6 -> x 5, r 6 done;
    #   w 7 exit(0), lazy -> restart 7 -> rows 0-2 done(0): the final pass, 3 completions.
    # row3 (insn 2): insn 1 ends: mtf 1, singlestep event 1, back to watch (svm 2,
    #   switches_in[1]); x 5 in watch done(1).
    check(
        res,
        {
            "records": 4,
            "instructions": 2,
            "ept_exits": 7,
            "lazy_copies": 6,
            "lazy_copies_4k": 6,
            "lazy_copy_pages": 6,
            "access_violations": 1,
            "mem_access_events": 1,
            "singlestep_events": 1,
            "mtf_exits": 1,
            "switches_vm_event": 2,
            "restarts": 7,
        },
        views={
            1: {
                "records_completed": 1,
                "ept_exits": 4,
                "lazy_copies": 3,
                "lazy_copy_pages": 3,
                "access_violations": 1,
                "switches_in": 1,
                "pages_mapped": 3,
                "leaves_4k": 3,
            },
            0: {
                "records_completed": 3,
                "ept_exits": 3,
                "lazy_copies": 3,
                "lazy_copy_pages": 3,
                "switches_in": 1,
                "pages_mapped": 3,
                "leaves_4k": 3,
            },
        },
        gfns={
            (1, 5): {"ept_exits": 1, "lazy_copies": 1},
            (1, 6): {"ept_exits": 1, "lazy_copies": 1},
            (1, 7): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
            (0, 5): {"ept_exits": 1, "lazy_copies": 1},
            (0, 6): {"ept_exits": 1, "lazy_copies": 1},
            (0, 7): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


SPLIT_RX = (
    RAM_1K
    + """
[[view]]
name = "exec"

[[view]]
name = "data"

[[setup]]
op = "set_mem_access"
view = "exec"
gfns = 5
access = "x"

[[setup]]
op = "set_mem_access"
view = "data"
gfns = 5
access = "rw"

[[setup]]
op = "switch_p2m"
view = "exec"

[[on_violation]]
view = "exec"
kind = ["r", "w"]
action = "switch"
to = "data"

[[on_violation]]
view = "data"
kind = "x"
action = "switch"
to = "exec"
"""
)


def test_split_rx_livelocks_on_code_reading_its_own_page(sim):
    res = sim(SPLIT_RX, ["i1 x 5", "i2 x 5", "i2 r 5", "i3 x 6"])
    # Setup: exec and data prepopulate the host 2M [0,511] (rwx) and split it (setup_splits
    #   2); exec[5] = x, data[5] = rw.
    # row0 (insn 1) x 5 in exec: done(1).
    # row1 (insn 2) x 5: done(1). row2 r 5: x-only -> viol_r (1,5), exit(1), event, switch to
    #   data (svm) -> restart 1 in data: row1 x 5 on rw -> viol_x (2,5), exit(2), event, switch
    #   to exec -> restart 2 in exec: row1 done, row2 viol_r ... Violation k causes restart k;
    #   odd ones are row 2 in exec, even ones row 1 in data. Violation 65 (row 2, in exec)
    #   would be restart 65: livelock, livelock_record 2; its exit, event and switch count.
    # Exits 65: exec 33, data 32. Switches 65: into data 33, into exec 32. The pass in
    #   progress (exec, after restart 64) completed row 1: exec records_completed 1 + 1.
    #   Row 3 is never processed.
    check(
        res,
        {
            "records": 3,
            "instructions": 2,
            "ept_exits": 65,
            "access_violations": 65,
            "mem_access_events": 65,
            "switches_vm_event": 65,
            "restarts": 64,
            "livelocked": 1,
            "livelock_record": 2,
            "setup_splits": 2,
        },
        views={
            1: {
                "records_completed": 2,
                "ept_exits": 33,
                "access_violations": 33,
                "switches_in": 32,
                "pages_mapped": 512,
                "leaves_4k": 512,
            },
            2: {
                "ept_exits": 32,
                "access_violations": 32,
                "switches_in": 33,
                "pages_mapped": 512,
                "leaves_4k": 512,
            },
        },
        gfns={(1, 5): {"ept_exits": 33, "viol_r": 33}, (2, 5): {"ept_exits": 32, "viol_x": 32}},
    )


def test_split_rx_with_mtf_step_into_view0_retires(sim):
    policy = SPLIT_RX.replace('action = "switch"\nto = "data"', 'action = "step"\nto = 0')
    res = sim(policy, ["i1 x 5", "i2 x 5", "i2 r 5", "i3 x 6"])
    # As above up to row2: r 5 in exec -> viol_r (1,5), exit(1), event -> step to 0 (svm 1,
    #   switches_in[0]), restart 1 in view 0 (fresh): row1 x 5: exit(0), lazy 4K rwx ->
    #   restart 2 -> x 5 done(0), r 5 done(0).
    # row3 (insn 3): insn 2 ends: mtf, singlestep event, back to exec (svm 2); x 6 done(1).
    check(
        res,
        {
            "records": 4,
            "instructions": 3,
            "ept_exits": 2,
            "lazy_copies": 1,
            "lazy_copies_4k": 1,
            "lazy_copy_pages": 1,
            "access_violations": 1,
            "mem_access_events": 1,
            "singlestep_events": 1,
            "mtf_exits": 1,
            "switches_vm_event": 2,
            "setup_splits": 2,
        },
        views={
            1: {
                "records_completed": 2,
                "ept_exits": 1,
                "access_violations": 1,
                "switches_in": 1,
                "pages_mapped": 512,
                "leaves_4k": 512,
            },
            2: {"pages_mapped": 512, "leaves_4k": 512},
            0: {
                "records_completed": 2,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "switches_in": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
        },
        gfns={(1, 5): {"ept_exits": 1, "viol_r": 1}, (0, 5): {"ept_exits": 1, "lazy_copies": 1}},
    )


def test_write_execute_flip_livelocks_on_an_instruction_writing_its_own_page(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "code"
        default_access = "rx"

        [[setup]]
        op = "switch_p2m"
        view = "code"

        [[on_violation]]
        kind = "w"
        action = "set-access"
        access = "rw"

        [[on_violation]]
        kind = "x"
        action = "set-access"
        access = "rx"
        """,
        ["i1 x 5", "i1 w 5"],
    )
    # row0 x 5: code fresh, hole 0: exit(1), lazy 4K rx -> restart 1 -> done(1).
    # row1 w 5: rx -> viol_w, exit, event, set-access rw (an rx entry rewritten: ept_syncs) ->
    #   restart 2 -> row0 x 5 on rw -> viol_x, exit, event, set-access rx (sync) -> restart 3
    #   -> row0 done, row1 viol_w ... Violation k causes restart k + 1; violation 64 (row 0,
    #   even ones are row 0) would be restart 65: livelock at row 0 after 64 violations,
    #   events, access changes and syncs; exits 1 + 64. viol_w 32 (odd), viol_x 32 (even).
    #   The pass in progress completed nothing.
    check(
        res,
        {
            "records": 2,
            "instructions": 1,
            "ept_exits": 65,
            "lazy_copies": 1,
            "lazy_copies_4k": 1,
            "lazy_copy_pages": 1,
            "access_violations": 64,
            "mem_access_events": 64,
            "access_changes": 64,
            "ept_syncs": 64,
            "restarts": 64,
            "livelocked": 1,
            "livelock_record": 0,
        },
        views={
            1: {
                "ept_exits": 65,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "access_violations": 64,
                "pages_mapped": 1,
                "leaves_4k": 1,
            }
        },
        gfns={(1, 5): {"ept_exits": 65, "lazy_copies": 1, "viol_w": 32, "viol_x": 32}},
    )


@pytest.mark.parametrize("rows", [64, 65])
def test_the_64_restart_boundary(sim, rows):
    res = sim(BASELINE_1K, [f"i1 r {g}" for g in range(1, rows + 1)])
    # One instruction whose row j reads gfn j + 1, each a fresh 4K lazy copy in view 0
    # (g > mm = g - 1 and its regions start at 0: hole 0): row j costs one exit and one
    # restart, after which rows 0..j complete.
    # 64 rows: 64 restarts, the instruction retires: 64 completions.
    # 65 rows: row 64's copy would be restart 65: livelock at row 64 (its exit and copy
    #   count); the pass in progress had completed rows 0..63.
    total = {
        "records": rows,
        "instructions": 1,
        "ept_exits": rows,
        "lazy_copies": rows,
        "lazy_copies_4k": rows,
        "lazy_copy_pages": rows,
        "restarts": 64,
    }
    if rows == 65:
        total |= {"livelocked": 1, "livelock_record": 64}
    check(
        res,
        total,
        views={
            0: {
                "records_completed": 64,
                "ept_exits": rows,
                "lazy_copies": rows,
                "lazy_copy_pages": rows,
                "pages_mapped": rows,
                "leaves_4k": rows,
            }
        },
        gfns={(0, g): {"ept_exits": 1, "lazy_copies": 1} for g in range(1, rows + 1)},
    )


@pytest.mark.parametrize("xen", ["4.18", "4.19"])
def test_n_default_view_over_1g_host_pages_livelocks_from_419(sim, xen):
    res = sim(
        f"""
        [domain]
        xen = "{xen}"
        ram = [[0, {2 * GIB_PAGES - 1}]]

        [[view]]
        name = "n"
        default_access = "n"

        [[setup]]
        op = "switch_p2m"
        view = "n"
        """,
        [f"r {GIB_PAGES + 6}"],
    )
    # origin "create": host_order 18, RAM two whole GiB -> two 1G host leaves.
    # r 2^18+6 in n (fresh): its 1G region starts above mm 0 -> hole 18, host 1G ->
    #   min(18, 18): exit(1), lazy 1G.
    # 4.18: the copy takes the host entry's access rwx -> restart 1 -> done(1).
    # 4.19: it takes n's default access n: a 1G leaf that permits nothing is invisible to Xen
    #   (§3): the hardware faults (exit), Xen finds no valid leaf, the hole order at the
    #   empty 1G slot is 18 -> copies it again -> ... the 65th attempt's exit and copy count,
    #   then livelock at row 0 (restarts 64).
    n = 1 if xen == "4.18" else 65
    total = {
        "records": 1,
        "instructions": 1,
        "ept_exits": n,
        "lazy_copies": n,
        "lazy_copies_1g": n,
        "lazy_copy_pages": n * GIB_PAGES,
    }
    if xen == "4.19":
        total |= {"restarts": 64, "livelocked": 1, "livelock_record": 0}
    check(
        res,
        total,
        views={
            1: {
                "records_completed": 1 if xen == "4.18" else 0,
                "ept_exits": n,
                "lazy_copies": n,
                "lazy_copy_pages": n * GIB_PAGES,
                "pages_mapped": GIB_PAGES,
                "leaves_1g": 1,
            }
        },
        gfns={(1, GIB_PAGES + 6): {"ept_exits": n, "lazy_copies": n}},
    )


def test_prepopulate_with_n_then_4k_write_leaves_an_empty_table(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "v"
        default_access = "n"

        [[setup]]
        op = "set_mem_access"
        view = "v"
        gfns = 5
        access = "rx"

        [[setup]]
        op = "switch_p2m"
        view = "v"

        [[on_violation]]
        action = "emulate"
        """,
        ["r 5", "r 6"],
    )
    # Setup (xen 4.22): v has no leaf for 5 -> prepopulate the host's 2M [0,511] with v's
    #   default access n: invisible (§3); the 4K write of 5 then replaces it with an empty
    #   table (no split: setup_splits 0) holding only 5 = rx; mm 511.
    # r 5: rx -> done(1).
    # r 6: 4K slot empty -> exit(1); 6 <= mm -> hole 0: lazy 4K n (visible: a 4K leaf) ->
    #   restart 1 -> viol_r (1,6), exit, event, emulate.
    check(
        res,
        {
            "records": 2,
            "instructions": 2,
            "ept_exits": 2,
            "lazy_copies": 1,
            "lazy_copies_4k": 1,
            "lazy_copy_pages": 1,
            "access_violations": 1,
            "mem_access_events": 1,
            "emulations": 1,
            "records_emulated": 1,
        },
        views={
            1: {
                "records_completed": 1,
                "ept_exits": 2,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "access_violations": 1,
                "pages_mapped": 2,
                "leaves_4k": 2,
            }
        },
        gfns={(1, 6): {"ept_exits": 2, "lazy_copies": 1, "viol_r": 1}},
    )


def test_second_fast_step_keeps_single_step_on_with_the_new_return_view(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "a"
        default_access = "rx"

        [[view]]
        name = "b"
        default_access = "r"

        [[setup]]
        op = "switch_p2m"
        view = "a"

        [[on_violation]]
        view = "a"
        kind = "w"
        action = "step"
        to = "b"

        [[on_violation]]
        view = "b"
        kind = "w"
        action = "step"
        to = 0
        fast = true
        """,
        ["w 5"],
    )
    # w 5 in a: exit(a), lazy 4K rx -> restart 1 -> viol_w, exit(a), event 1 -> step to b
    #   (svm 1; single-step on, return a, not fast) -> restart 2 in b: exit(b), lazy 4K r ->
    #   restart 3 -> viol_w, exit(b), event 2 -> fast step while stepping: switch to 0 (svm 2),
    #   single-step stays on, fast, return view b -> restart 4: exit(0), lazy 4K -> restart 5
    #   -> done(0).
    # End of trace: mtf 1, fast: Xen switches back to b (sfs 1, switches_in[b]); no event.
    check(
        res,
        {
            "records": 1,
            "instructions": 1,
            "ept_exits": 5,
            "lazy_copies": 3,
            "lazy_copies_4k": 3,
            "lazy_copy_pages": 3,
            "access_violations": 2,
            "mem_access_events": 2,
            "mtf_exits": 1,
            "switches_vm_event": 2,
            "switches_fast_ss": 1,
        },
        views={
            1: {
                "ept_exits": 2,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "access_violations": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
            2: {
                "ept_exits": 2,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "access_violations": 1,
                "switches_in": 2,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
            0: {
                "records_completed": 1,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "switches_in": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
        },
        gfns={
            (1, 5): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
            (2, 5): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
            (0, 5): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


@pytest.mark.parametrize("xen", ["4.20", "4.21"])
def test_restored_domain_host_pages_by_xen_version(sim, xen):
    res = sim(
        f"""
        [domain]
        origin = "restore"
        xen = "{xen}"
        ram = [[0, 1023]]

        [[setup]]
        op = "set_mem_access"
        view = 0
        gfns = 5
        access = "rx"
        """,
        ["r 600"],
    )
    # origin "restore": host_order 0 before 4.21 (every host leaf 4K), 9 from 4.21.
    # Setup: the view-0 write of 5 goes to the host: 4.20 a 4K leaf already (no split), 4.21
    #   splits the 2M leaf [0,511] (setup_splits 1). View 0 holds nothing: no propagation.
    # r 600: fresh view 0, 2M region above mm 0 -> hole 9; min(host order, 9): 4.20 -> 4K
    #   copy, 4.21 -> 2M copy: exit(0), lazy -> restart 1 -> done(0).
    order = 0 if xen == "4.20" else 9
    pages = 1 << order
    check(
        res,
        {
            "records": 1,
            "instructions": 1,
            "ept_exits": 1,
            "lazy_copies": 1,
            LAZY_KEY[order]: 1,
            "lazy_copy_pages": pages,
            "setup_splits": 0 if xen == "4.20" else 1,
        },
        views={
            0: {
                "records_completed": 1,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": pages,
                "pages_mapped": pages,
                LEAF_KEY[order]: 1,
            }
        },
        gfns={(0, 600): {"ept_exits": 1, "lazy_copies": 1}},
    )


@pytest.mark.parametrize("nvcpus", [1, 2, 4])
def test_ept_syncs_interrupt_every_other_vcpu(sim, nvcpus):
    res = sim(
        """
        [domain]
        altp2m = false
        host_access = "rx"
        ram = [[0, 1023]]

        [[on_violation]]
        kind = "w"
        action = "set-access"
        """,
        ["v0 w 5"] + [f"v{v} r 6" for v in range(1, nvcpus)],
    )
    # altp2m off, host 2M leaves rx. v0 w 5: viol_w (0,5), exit, event, set-access rwx: the
    #   host's 2M leaf splits (superpage_splits 1) and 5's rx entry is rewritten: one EPT sync,
    #   an IPI to each of the other nvcpus - 1 vCPUs -> restart 1 -> done(0).
    # Every other vCPU: r 6 on its rx piece -> done(0).
    v0 = {
        "records": 1,
        "instructions": 1,
        "ept_exits": 1,
        "access_violations": 1,
        "mem_access_events": 1,
        "access_changes": 1,
        "superpage_splits": 1,
        "ept_syncs": 1,
        "ept_sync_ipis": nvcpus - 1,
    }
    others = {v: {"records": 1, "instructions": 1} for v in range(1, nvcpus)}
    check(
        res,
        v0 | {"records": nvcpus, "instructions": nvcpus},
        vcpus={0: v0} | others,
        views={
            0: {
                "records_completed": nvcpus,
                "ept_exits": 1,
                "access_violations": 1,
                "pages_mapped": 1024,
                "leaves_4k": 512,
                "leaves_2m": 1,
            }
        },
        gfns={(0, 5): {"ept_exits": 1, "viol_w": 1}},
    )


def test_meta_set_top_ranks_untouched_members_last(sim):
    res = sim(
        RAM_1K
        + """
        [[setup]]
        op = "set_mem_access"
        view = 0
        gfns = { set = "meta:pt", top = 6 }
        access = "rwx"
        """,
        ["r 1021", "r 1021", "r 1022"],
        gfn_sets={"pt": [[1020, 1030]]},
    )
    # meta:pt = 1020-1030; touched: 1021 (2 rows), 1022 (1). top 6: 1021, 1022, then the
    #   untouched members lowest first: 1020, 1023, 1024, 1025 (§9).
    # Setup (view 0 = host writes): 1020-1023 are RAM: the first splits the host 2M leaf
    #   [512,1023] (setup_splits 1); 1024 and 1025 are not RAM: setup_skipped 2.
    # r 1021: fresh view 0, hole 9, but the host leaf is 4K now -> lazy 4K -> restart -> done.
    # r 1021: done. r 1022: 1022 > mm 1021, regions not above -> hole 0 -> lazy 4K -> done.
    check(
        res,
        {
            "records": 3,
            "instructions": 3,
            "ept_exits": 2,
            "lazy_copies": 2,
            "lazy_copies_4k": 2,
            "lazy_copy_pages": 2,
            "setup_splits": 1,
            "setup_skipped": 2,
        },
        views={
            0: {
                "records_completed": 3,
                "ept_exits": 2,
                "lazy_copies": 2,
                "lazy_copy_pages": 2,
                "pages_mapped": 2,
                "leaves_4k": 2,
            }
        },
        gfns={
            (0, 1021): {"ept_exits": 1, "lazy_copies": 1},
            (0, 1022): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


@pytest.mark.parametrize("batch_rows", [1, 2, None])
def test_timeline_counts_restarted_rows_in_the_window_of_the_arriving_row(batch_rows):
    from altp2m_replay.engine import simulate_arrays

    # Window of 2 rows: window 0 = rows 0-1, window 1 = rows 2-3.
    res = simulate_arrays(
        make_policy(XEN_ACCESS_WRITE.format(fast="false")),
        make_trace("i1 r 5", "i1 r 6", "i1 w 7"),
        window=2,
        batch_rows=batch_rows,
    )
    # row0 r 5 (window 0): exit(1), lazy. row1 r 6 (window 0): exit(1), lazy.
    # row2 w 7 (window 1): exit(1), lazy; viol_w exit(1), event, step to 0 (svm); the restart
    #   re-executes rows 0 and 1 in view 0: exit + lazy each, then row 2: exit + lazy. All of
    #   it belongs to window 1, the window of the arriving row. The instruction end at the
    #   end of the trace (MTF, single-step event, switch back) goes to the last row's window.
    tl = res.timeline
    assert list(tl["ept_exits"]) == [2, 5]
    assert list(tl["lazy_copies"]) == [2, 4]
    assert list(tl["vm_events"]) == [0, 2]
    assert list(tl["view_switches"]) == [0, 2]


@pytest.mark.parametrize("batch_rows", [100, None])
def test_an_instruction_of_more_than_1024_rows_is_an_error_naming_the_row(batch_rows):
    from altp2m_replay.engine import simulate_arrays
    from altp2m_replay.errors import TraceError

    # SPEC §2: at most 1024 rows per instruction. Rows 0-1023 read gfn 5 (one lazy copy,
    # then fast-path completions); row 1024, the 1025th row of instruction 7, reads gfn 6.
    n = 1025
    gfns = np.full(n, 5, np.uint64)
    gfns[-1] = 6
    arrays = {"gfn": gfns, "access": np.ones(n, np.uint8), "insn": np.full(n, 7, np.uint64)}
    with pytest.raises(TraceError, match="row 1024: instruction has more than 1024 rows"):
        simulate_arrays(make_policy(RAM_1K), arrays, batch_rows=batch_rows)


# =========================================================================== Revision 2: breakpoints and control rows (§2, §4, §6.4, §6.5)
CONTROL_OPS = {"vmfunc": 1, "cr3": 2, "drop": 3, "map": 4}


def make_trace2(*rows: str) -> dict[str, np.ndarray]:
    """Like make_trace, plus control rows ``"vmfunc N"``, ``"cr3 VALUE"``, ``"drop GFN"``,
    ``"map GFN"`` (``op``/``arg`` columns) and byte offsets ``"x 5@0x10"`` (a ``gpa`` column
    then replaces ``gfn``: gpa = gfn << 12 | offset)."""
    gfn, access, vcpu, insn, op, arg, off = [], [], [], [], [], [], []
    for row in rows:
        toks = row.split()
        v, i = 0, None
        while toks[0][0] in "vi" and toks[0][1:].isdigit():
            if toks[0][0] == "v":
                v = int(toks[0][1:])
            else:
                i = int(toks[0][1:])
            toks = toks[1:]
        word, value = toks
        if word in CONTROL_OPS:
            o = CONTROL_OPS[word]
            op.append(o)
            arg.append(int(value, 0) if o <= 2 else 0)
            gfn.append(int(value, 0) if o >= 3 else 0)
            access.append(0)
            off.append(0)
        else:
            g, _, o_ = value.partition("@")
            op.append(0)
            arg.append(0)
            gfn.append(int(g, 0))
            access.append(KINDS[word])
            off.append(int(o_, 0) if o_ else 0)
        vcpu.append(v)
        insn.append(i)
    out = {
        "access": np.asarray(access, dtype=np.uint8),
        "op": np.asarray(op, dtype=np.uint8),
        "arg": np.asarray(arg, dtype=np.uint64),
    }
    if any("@" in r for r in rows):
        out["gpa"] = (np.asarray(gfn, dtype=np.uint64) << np.uint64(12)) | np.asarray(
            off, dtype=np.uint64
        )
    else:
        out["gfn"] = np.asarray(gfn, dtype=np.uint64)
    if any(r.split()[0][0] == "v" for r in rows):
        out["vcpu"] = np.asarray(vcpu, dtype=np.uint16)
    if any(x is not None for x in insn):
        out["insn"] = np.asarray(insn, dtype=np.uint64)
    return out


@pytest.fixture(params=ENGINES)
def sim2(request):
    """As ``sim``, with make_trace2 rows."""
    return _runner(request, make_trace2)


SHADOW_BP = (
    RAM_1K
    + """
[[view]]
name = "x"

[breakpoints]
at = 0x5010

[[setup]]
op = "change_gfn"
view = "x"
old = 5
new = 1000

[[setup]]
op = "write_breakpoints"
view = "x"

[[setup]]
op = "switch_p2m"
view = "x"

[on_breakpoint]
action = "step"
fast = {fast}
"""
)


def test_breakpoint_in_a_shadow_frame_is_stepped_into_view0(sim2):
    res = sim2(SHADOW_BP.format(fast="false"), ["i1 x 5@0x10", "i1 r 600", "i2 x 5@0x20"])
    # Setup: change_gfn prepopulates x with the host's 2M [0,511] and splits it (setup_splits
    #   1); x[5] maps the frame of 1000. write_breakpoints x: x's entry at gfn 5 maps frame
    #   1000: the INT3 is at (frame 1000, 0x10). View 0 maps gfn 5 to frame 5: no INT3 there.
    # row0 (insn 1) fetch 0x5010 in x: the leaf permits x, first row, frame 1000 offset 0x10
    #   holds the INT3 -> trap: int3_exits (x, gfn 5), breakpoint event, step to 0 (svm 1,
    #   single-step on, return x) -> restart 1 in view 0: exit(0), lazy 4K -> restart 2 ->
    #   fetch in view 0 (frame 5): done(0).
    # row1 r 600: view 0, 2M region above mm 5 -> lazy 2M -> restart 3 -> rows 0, 1 done(0).
    # row2 (insn 2): insn 1 ends: mtf, single-step event, back to x (svm 2); fetch 0x5020 in x:
    #   frame 1000 offset 0x20, no INT3 -> done(1).
    check(
        res,
        {
            "records": 3,
            "instructions": 2,
            "ept_exits": 2,
            "lazy_copies": 2,
            "lazy_copies_4k": 1,
            "lazy_copies_2m": 1,
            "lazy_copy_pages": 513,
            "int3_exits": 1,
            "breakpoint_events": 1,
            "singlestep_events": 1,
            "mtf_exits": 1,
            "switches_vm_event": 2,
            "setup_splits": 1,
        },
        views={
            1: {
                "records_completed": 1,
                "int3_exits": 1,
                "switches_in": 1,
                "pages_mapped": 512,
                "leaves_4k": 512,
            },
            0: {
                "records_completed": 2,
                "ept_exits": 2,
                "lazy_copies": 2,
                "lazy_copy_pages": 513,
                "switches_in": 1,
                "pages_mapped": 513,
                "leaves_4k": 1,
                "leaves_2m": 1,
            },
        },
        gfns={
            (1, 5): {"int3_exits": 1},
            (0, 5): {"ept_exits": 1, "lazy_copies": 1},
            (0, 600): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


@pytest.mark.parametrize(("fast", "expected"), [("false", 248_400), ("true", 128_400)])
def test_calibration_one_breakpoint_hit(sim2, fast, expected):
    costs = effective_costs({})
    one = sim2(SHADOW_BP.format(fast=fast), ["i1 x 5@0x10", "i2 x 7"])
    two = sim2(SHADOW_BP.format(fast=fast), ["i1 x 5@0x10", "i2 x 7", "i3 x 5@0x10", "i4 x 7"])
    # The second hit finds view 0 warm: int3 exit, breakpoint event, step to 0 (svm), the
    # restarted fetch completes in view 0; at insn 4's start: mtf and a single-step event and
    # svm back (not fast), or Xen's own switch back (fast); then x 7 completes in x.
    # SPEC §8: 5000 + 2 x (90000 + 30000) + 3000 + 2 x 200 = 248,400; fast: one event, 128,400.
    delta = _delta(two, one)
    expected_delta = {
        "records": 2,
        "instructions": 2,
        "int3_exits": 1,
        "breakpoint_events": 1,
        "mtf_exits": 1,
        "switches_vm_event": 1,
        "restarts": 1,
    }
    expected_delta |= (
        {"switches_fast_ss": 1}
        if fast == "true"
        else {"singlestep_events": 1, "switches_vm_event": 2}
    )
    want = _full(expected_delta, "delta")
    want.pop("crash_record")
    want.pop("livelock_record")
    assert delta == want
    assert cycles(delta, costs)["cycles_total"] == expected


def test_breakpoint_emulated_in_place(sim2):
    res = sim2(
        SHADOW_BP.replace('action = "step"\nfast = {fast}', 'action = "emulate"'),
        ["i1 x 5@0x10", "i1 r 600", "i2 x 6"],
    )
    # row0: trap in x (int3_exits, breakpoint event) -> emulate: emulations 1, the row and the
    #   rest of insn 1 complete unchecked (records_emulated 1, then row1: 2). No restart.
    # row2 x 6 in x: a prepopulated 4K piece -> done(1).
    check(
        res,
        {
            "records": 3,
            "instructions": 2,
            "int3_exits": 1,
            "breakpoint_events": 1,
            "emulations": 1,
            "records_emulated": 2,
            "setup_splits": 1,
        },
        views={1: {"records_completed": 1, "int3_exits": 1, "pages_mapped": 512, "leaves_4k": 512}},
        gfns={(1, 5): {"int3_exits": 1}},
    )


CR3_POLICY = (
    RAM_1K
    + """
[[view]]
name = "a"

[[view]]
name = "b"

[on_cr3]
{extra}

[[on_cr3.switch]]
cr3 = 0x1000
to = "a"

[[on_cr3.switch]]
cr3 = "other"
to = 0
"""
)


def test_cr3_writes_sync_events_switch_views(sim2):
    res = sim2(
        CR3_POLICY.format(extra=""), ["cr3 0x1000", "r 5", "cr3 0x1000", "cr3 0x2000", "r 5"]
    )
    # No insn column: each row is an instruction. Every CR3 write exits ([on_cr3]).
    # cr3 0x1000: the vCPU's first write (a change): sync event 1 -> rule 1: switch to a (svm 1).
    # r 5 in a (fresh): exit(a), lazy 4K -> restart -> done(a).
    # cr3 0x1000 again: unchanged, onchangeonly: exit, no event.
    # cr3 0x2000: event 2 -> "other": switch to 0 (svm 2). r 5 in view 0: exit, lazy, done(0).
    check(
        res,
        {
            "records": 2,
            "instructions": 5,
            "ept_exits": 2,
            "lazy_copies": 2,
            "lazy_copies_4k": 2,
            "lazy_copy_pages": 2,
            "control_records": 3,
            "cr3_writes": 3,
            "cr3_exits": 3,
            "cr3_events": 2,
            "switches_vm_event": 2,
        },
        views={
            1: {
                "records_completed": 1,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "switches_in": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
            0: {
                "records_completed": 1,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "switches_in": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
        },
        gfns={
            (1, 5): {"ept_exits": 1, "lazy_copies": 1},
            (0, 5): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


@pytest.mark.parametrize(("onchangeonly", "events"), [("true", 2), ("false", 3)])
def test_cr3_writes_async_events(sim2, onchangeonly, events):
    res = sim2(
        RAM_1K + f"[on_cr3]\nsync = false\nonchangeonly = {onchangeonly}\n",
        ["cr3 1", "cr3 1", "cr3 2"],
    )
    # Three writes, three exits; with onchangeonly the repeated value sends no event. Async
    # events get no response (no switch) and, unlike n2rwx ones, restart nothing.
    check(
        res,
        {
            "instructions": 3,
            "control_records": 3,
            "cr3_writes": 3,
            "cr3_exits": 3,
            "async_events": events,
            "restarts": 0,
        },
        views={},
        gfns={},
    )


def test_guest_vmfunc_switches_or_raises_ud(sim2):
    res = sim2(
        RAM_1K
        + """
        [[view]]
        name = "alt"

        [[view]]
        name = "hid"
        visible = false

        [[setup]]
        op = "enable_notify"
        vcpus = [0]
        """,
        ["v0 vmfunc 1", "v0 r 5", "v1 vmfunc 1", "v0 vmfunc 2", "v0 vmfunc 7"],
    )
    # v0 vmfunc 1: #VE/VMFUNC enabled on v0, view 1 active and visible: guest_vmfuncs 1,
    #   switch (svf 1, switches_in[1]).
    # v0 r 5 in alt: exit(1), lazy 4K -> restart -> done(1).
    # v1 vmfunc 1: VMFUNC not enabled on v1 -> exit, #UD: vmfunc_exits.
    # v0 vmfunc 2: invisible view -> vmfunc_exits. v0 vmfunc 7: no such view -> vmfunc_exits.
    v0 = {
        "records": 1,
        "instructions": 4,
        "ept_exits": 1,
        "lazy_copies": 1,
        "lazy_copies_4k": 1,
        "lazy_copy_pages": 1,
        "control_records": 3,
        "guest_vmfuncs": 1,
        "switches_vmfunc": 1,
        "vmfunc_exits": 2,
    }
    v1 = {"instructions": 1, "control_records": 1, "vmfunc_exits": 1}
    check(
        res,
        {k: v0.get(k, 0) + v1.get(k, 0) for k in set(v0) | set(v1)},
        vcpus={0: v0, 1: v1},
        views={
            1: {
                "records_completed": 1,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "switches_in": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            }
        },
        gfns={(1, 5): {"ept_exits": 1, "lazy_copies": 1}},
    )


def test_host_drop_resets_the_view_that_remaps_it_and_a_map_restores_ram(sim2):
    res = sim2(
        RAM_1K
        + """
        [[view]]
        name = "s"

        [[setup]]
        op = "change_gfn"
        view = "s"
        old = 5
        new = 1000

        [[setup]]
        op = "switch_p2m"
        view = "s"
        """,
        ["r 5", "drop 1000", "r 5", "map 1000", "r 1000"],
    )
    # Setup: s prepopulated with 2M [0,511] and split (setup_splits 1); s[5] -> frame 1000;
    #   s's remap interval [1000, 1000]; its max_mapped 511.
    # r 5: done(s).
    # drop 1000 (the domain's): the host's 2M leaf [512,1023] (rwx) splits (superpage_splits
    #   1) and 1000 becomes a hole: an entry that permitted something: one EPT sync, an IPI to
    #   every vCPU (1). View 0 holds nothing; 1000 lies in s's remap interval: s is reset
    #   (view_resets 1), max_mapped kept.
    # r 5 in s: empty -> exit; 5 <= mm 511, the new root is empty -> hole 18; host 2M ->
    #   lazy 2M [0,511] -> restart -> done(s) (5 maps its own frame again).
    # map 1000: the host hole becomes a 4K RAM leaf (no sync: nothing was permitted; no split:
    #   already 4K); no view holds 1000.
    # r 1000 in s: 1000 > mm 511, 2M region above it -> hole 9; host leaf 4K -> lazy 4K -> done.
    v0 = {
        "records": 3,
        "instructions": 3,
        "ept_exits": 2,
        "lazy_copies": 2,
        "lazy_copies_2m": 1,
        "lazy_copies_4k": 1,
        "lazy_copy_pages": 513,
    }
    check(
        res,
        v0
        | {
            "control_records": 2,
            "host_drops": 1,
            "host_maps": 1,
            "view_resets": 1,
            "ept_syncs": 1,
            "ept_sync_ipis": 1,
            "superpage_splits": 1,
            "setup_splits": 1,
        },
        vcpus={0: v0},
        views={
            1: {
                "records_completed": 3,
                "ept_exits": 2,
                "lazy_copies": 2,
                "lazy_copy_pages": 513,
                "resets": 1,
                "pages_mapped": 513,
                "leaves_2m": 1,
                "leaves_4k": 1,
            }
        },
        gfns={
            (1, 5): {"ept_exits": 1, "lazy_copies": 1},
            (1, 1000): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


def test_host_drop_in_two_remap_intervals_resets_every_view_once(sim2):
    remap = """
        [[setup]]
        op = "change_gfn"
        view = "{v}"
        old = 5
        new = 1000
    """
    res = sim2(
        RAM_1K
        + """
        [[view]]
        name = "a"

        [[view]]
        name = "b"
        """
        + remap.format(v="a")
        + remap.format(v="b"),
        ["r 600", "drop 1000"],
    )
    # Setup: a and b each prepopulate 2M [0,511] and split it (setup_splits 2); both remap 5
    #   to 1000: remap intervals [1000, 1000].
    # r 600 in view 0: exit(0), lazy 2M [512,1023] -> restart -> done(0).
    # drop 1000: host split (1) and hole: sync 1. Views in index order: view 0 (no remap)
    #   holds 1000 in its 2M leaf: 4K removal, split (superpage_splits 2), sync 2. a: in its
    #   interval -> reset. b: in its interval, a second hit -> every other active view is
    #   reset (view 0 and b; a already was): view_resets 3. One vCPU: ept_sync_ipis 2.
    v0 = {
        "records": 1,
        "instructions": 1,
        "ept_exits": 1,
        "lazy_copies": 1,
        "lazy_copies_2m": 1,
        "lazy_copy_pages": 512,
    }
    check(
        res,
        v0
        | {
            "control_records": 1,
            "host_drops": 1,
            "view_resets": 3,
            "ept_syncs": 2,
            "ept_sync_ipis": 2,
            "superpage_splits": 2,
            "setup_splits": 2,
        },
        vcpus={0: v0},
        views={
            0: {
                "records_completed": 1,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 512,
                "resets": 1,
            },
            1: {"resets": 1},
            2: {"resets": 1},
        },
        gfns={(0, 600): {"ept_exits": 1, "lazy_copies": 1}},
    )


def test_a_restart_executes_the_instructions_cr3_write_again(sim2):
    res = sim2(RAM_1K + "[on_cr3]\nonchangeonly = false\n", ["i1 cr3 0x1000", "i1 r 5"])
    # row0 (insn 1) cr3: exit, sync event 1 (no switch rules). row1 r 5: view 0 fresh: exit,
    # lazy 4K -> restart -> the pass executes the CR3 write again (exit, event 2: onchangeonly
    # is off) -> r 5 done(0).
    check(
        res,
        {
            "records": 1,
            "instructions": 1,
            "ept_exits": 1,
            "lazy_copies": 1,
            "lazy_copies_4k": 1,
            "lazy_copy_pages": 1,
            "control_records": 1,
            "cr3_writes": 2,
            "cr3_exits": 2,
            "cr3_events": 2,
        },
        views={
            0: {
                "records_completed": 1,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            }
        },
        gfns={(0, 5): {"ept_exits": 1, "lazy_copies": 1}},
    )


def test_guest_vmfunc_inside_a_restarted_instruction(sim2):
    res = sim2(
        RAM_1K
        + """
        [[view]]
        name = "alt"

        [[setup]]
        op = "enable_notify"
        """,
        ["i1 r 5", "i1 vmfunc 1", "i1 r 6"],
    )
    # row0 r 5 in view 0: exit(0), lazy 4K -> restart 1 -> done(0).
    # row1 VMFUNC to alt: guest_vmfuncs 1, svf 1 (the pass's completion of row0 stays in 0).
    # row2 r 6 in alt (fresh): exit(alt), lazy 4K -> restart 2, in alt: row0 r 5: exit(alt),
    #   lazy -> restart 3 -> r 5 done(alt); the VMFUNC again (guest_vmfuncs 2, already in alt:
    #   no switch); r 6 done(alt). The final pass completed both in alt; view 0's completion
    #   was on an abandoned pass.
    check(
        res,
        {
            "records": 2,
            "instructions": 1,
            "ept_exits": 3,
            "lazy_copies": 3,
            "lazy_copies_4k": 3,
            "lazy_copy_pages": 3,
            "control_records": 1,
            "guest_vmfuncs": 2,
            "switches_vmfunc": 1,
        },
        views={
            0: {
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
            1: {
                "records_completed": 2,
                "ept_exits": 2,
                "lazy_copies": 2,
                "lazy_copy_pages": 2,
                "switches_in": 1,
                "pages_mapped": 2,
                "leaves_4k": 2,
            },
        },
        gfns={
            (0, 5): {"ept_exits": 1, "lazy_copies": 1},
            (1, 5): {"ept_exits": 1, "lazy_copies": 1},
            (1, 6): {"ept_exits": 1, "lazy_copies": 1},
        },
    )
