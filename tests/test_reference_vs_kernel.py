"""The pure-Python reference (tests/reference.py) against the Numba engine, plus hand checks.

The property tests feed both engines random policies and traces (tests/strategies.py) and
want identical counters, or the same error class. The hand checks pin the reference itself
to counters derived from the SPEC by hand, so the two engines cannot agree on a mistake
shared by both without one of these failing.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from altp2m_replay.costs import COSTS
from altp2m_replay.errors import PolicyError, ReplayError, ReplayRuntimeError
from altp2m_replay.policy import parse_policy

try:   # pytest imports this file as a module of tests/ or of the tests package
    from reference import GFN_COUNTERS, TOTAL_COUNTERS, VIEW_COUNTERS, reference_simulate
    from strategies import cases
except ImportError:
    from tests.reference import GFN_COUNTERS, TOTAL_COUNTERS, VIEW_COUNTERS, reference_simulate
    from tests.strategies import cases

GIB = 1 << 18
SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


# --------------------------------------------------------------------------- helpers
def trace(gfns, access, vcpu=None, insn=None) -> dict:
    arrays = {"gfn": np.asarray(gfns, dtype=np.uint64), "access": np.asarray(access, dtype=np.uint8)}
    if vcpu is not None:
        arrays["vcpu"] = np.asarray(vcpu, dtype=np.uint16)
    if insn is not None:
        arrays["insn"] = np.asarray(insn, dtype=np.uint64)
    return arrays


def run(toml: str, arrays: dict, **kw) -> dict:
    return reference_simulate(parse_policy(toml, "test"), arrays, **kw)


def nonzero(counters: dict) -> dict:
    """Counters that are not 0, with crash_record only when set (it is -1 otherwise)."""
    return {k: v for k, v in counters.items() if v and not (k == "crash_record" and v == -1)}


def cycles(counters: dict) -> float:
    """SPEC §8 cycles with the default costs."""
    return sum(cost * sum(counters[c] for c in names) for cost, names in COSTS.values())


def normalise(result) -> dict:
    """The four counter tables of either engine as plain ints (the engine's may be numpy)."""
    get = result.get if isinstance(result, dict) else lambda key: getattr(result, key)
    return {
        "total": {k: int(v) for k, v in get("total").items()},
        "vcpus": {int(v): {k: int(x) for k, x in c.items()} for v, c in get("vcpus").items()},
        "views": {int(v): {k: int(x) for k, x in c.items()} for v, c in get("views").items()},
        "gfns": {(int(key[0]), int(key[1])): {k: int(x) for k, x in c.items()}
                 for key, c in get("gfns").items()},
    }


def outcome(fn) -> dict | type:
    """The normalised result, or the class of the ReplayError raised."""
    try:
        return normalise(fn())
    except ReplayError as exc:
        return type(exc)


def differences(ref, eng) -> list[str]:
    """Readable list of what differs between two outcomes."""
    if isinstance(ref, type) or isinstance(eng, type):
        return [f"reference: {ref!r}, engine: {eng!r}"] if ref != eng else []
    out = []
    for table in ("total", "vcpus", "views", "gfns"):
        a, b = ref[table], eng[table]
        if table == "total":
            a, b = {None: a}, {None: b}
        for key in sorted(set(a) | set(b), key=repr):
            if key not in a or key not in b:
                out.append(f"{table}[{key}]: only in {'reference' if key in a else 'engine'}: {a.get(key, b.get(key))}")
                continue
            for name in sorted(set(a[key]) | set(b[key])):
                if a[key].get(name) != b[key].get(name):
                    out.append(f"{table}[{key}].{name}: reference {a[key].get(name)}, engine {b[key].get(name)}")
    return out


def compare(case, batch_rows=None) -> None:
    from altp2m_replay.engine import simulate_arrays  # lands with the Numba engine

    ref = outcome(lambda: reference_simulate(case.policy, case.arrays, gfn_sets=case.gfn_sets))
    eng = outcome(lambda: simulate_arrays(case.policy, case.arrays, meta_ram=None,
                                          gfn_sets=case.gfn_sets, batch_rows=batch_rows))
    diff = differences(ref, eng)
    assert not diff, "\n".join([case.toml, repr(case.arrays), f"batch_rows={batch_rows}"] + diff[:40])


# --------------------------------------------------------------------------- properties
@settings(max_examples=300, deadline=None, suppress_health_check=SLOW_OK)
@given(case=cases())
def test_kernel_matches_reference(case):
    compare(case)


@settings(max_examples=150, deadline=None, suppress_health_check=SLOW_OK)
@given(case=cases(), batch_rows=st.sampled_from([1, 7]) | st.integers(1, 250))
def test_kernel_batch_size_does_not_matter(case, batch_rows):
    compare(case, batch_rows)


@settings(max_examples=150, deadline=None, suppress_health_check=SLOW_OK)
@given(case=cases(), extra=st.integers(1, 6), cache_bytes=st.integers(0, 400))
def test_kernel_with_tiny_buffers_matches_reference(case, extra, cache_bytes):
    """An event log drained every few exits, and a fast-path cache that covers only the
    lowest gfns (or none), give the same counters."""
    from unittest import mock

    from altp2m_replay.engine import _kernels, simulate

    with (mock.patch.object(simulate, "LOG_ROWS", _kernels.LOG_SLACK + extra),
          mock.patch.object(simulate, "PMAP_BYTES", cache_bytes)):
        compare(case)


# --------------------------------------------------------------------------- hand checks
BASELINE = 'name = "baseline"\n'
WRITE_WATCH = """
name = "xen-access-altp2m-write"
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
"""


def test_result_shape():
    out = run(WRITE_WATCH, trace([5], [1], vcpu=[2]))
    assert set(out) == {"total", "vcpus", "views", "gfns", "warnings"}
    assert tuple(out["total"]) == TOTAL_COUNTERS
    assert list(out["vcpus"]) == [2] and tuple(out["vcpus"][2]) == TOTAL_COUNTERS
    assert list(out["views"]) == [0, 1] and all(tuple(c) == VIEW_COUNTERS for c in out["views"].values())
    assert all(tuple(c) == GFN_COUNTERS for c in out["gfns"].values())
    assert out["total"]["crash_record"] == -1 and out["vcpus"][2]["setup_splits"] == 0


def test_lazy_copy_orders_in_a_fresh_view():
    # host_order 9, RAM [0, 1023] (max gfn 600 aligned up to 2 MiB): two 2 MiB host leaves.
    # Row gfn 1: 1 > max_mapped 0 and its 2 MiB region starts at 0, not above 0 -> order 0.
    # Row gfn 0: 0 <= max_mapped 1, the walk reaches the 4 KiB table, slot empty -> order 0.
    # Row gfn 600: above max_mapped 1 and its 2 MiB region (512) starts above it -> order 9.
    out = run(BASELINE, trace([1, 0, 600], [1, 1, 1]))
    assert nonzero(out["total"]) == {
        "records": 3, "instructions": 3, "ept_exits": 3, "lazy_copies": 3, "lazy_copies_4k": 2,
        "lazy_copies_2m": 1, "lazy_copy_pages": 514}
    assert nonzero(out["views"][0]) == {
        "records_completed": 3, "ept_exits": 3, "lazy_copies": 3, "lazy_copy_pages": 514,
        "pages_mapped": 514, "leaves_4k": 2, "leaves_2m": 1}
    # Alone, gfn 0 walks an empty root (hole order 18): min(9, 18) = 9, a 2 MiB copy.
    assert run(BASELINE, trace([0], [1]))["total"]["lazy_copies_2m"] == 1
    # Before 4.17 the copy takes the host order, whatever the hole: gfn 1 copies 2 MiB.
    assert run(BASELINE + '[domain]\nxen = "4.16"\n', trace([1], [1]))["total"]["lazy_copies_2m"] == 1
    # host_order 18 and RAM [0, 2^18 - 1]: gfn 0 copies the whole 1 GiB leaf, gfn 1 alone 4 KiB.
    big = BASELINE + "[domain]\nhost_order = 18\n"
    out = run(big, trace([0, GIB - 1], [1, 1]))
    assert out["total"]["lazy_copies_1g"] == 1 and out["total"]["ept_exits"] == 1
    assert out["views"][0]["pages_mapped"] == GIB and out["views"][0]["leaves_1g"] == 1
    assert run(big, trace([1], [1]))["total"]["lazy_copies_4k"] == 1


def test_xen_access_altp2m_write_policy():
    # Row 0 (w): watch is empty -> exit + 4 KiB lazy copy (rx); retry: w on rx -> exit,
    #   violation, mem_access event, step to view 0 (switch 1); view 0 empty -> exit + copy
    #   (rwx); retry completes in view 0.
    # Row 1 (r): the step ends first: MTF exit, single-step event, switch back (2); then
    #   r on rx completes in watch.
    # Row 2 (w): exit, violation, event, step (3), completes in view 0 (already copied);
    #   at the end of the trace: MTF, single-step event, switch back (4).
    out = run(WRITE_WATCH, trace([5, 5, 5], [2, 1, 2]))
    assert nonzero(out["total"]) == {
        "records": 3, "instructions": 3, "ept_exits": 4, "lazy_copies": 2, "lazy_copies_4k": 2,
        "lazy_copy_pages": 2, "access_violations": 2, "mem_access_events": 2,
        "singlestep_events": 2, "vm_events": 4, "mtf_exits": 2, "switches_vm_event": 4,
        "view_switches": 4}
    assert nonzero(out["views"][0]) == {
        "records_completed": 2, "ept_exits": 1, "lazy_copies": 1, "lazy_copy_pages": 1,
        "switches_in": 2, "pages_mapped": 1, "leaves_4k": 1}
    assert nonzero(out["views"][1]) == {
        "records_completed": 1, "ept_exits": 3, "lazy_copies": 1, "lazy_copy_pages": 1,
        "access_violations": 2, "switches_in": 2, "pages_mapped": 1, "leaves_4k": 1}
    assert out["gfns"] == {
        (0, 5): {"ept_exits": 1, "viol_r": 0, "viol_w": 0, "viol_x": 0, "ve_delivered": 0, "lazy_copies": 1},
        (1, 5): {"ept_exits": 3, "viol_r": 0, "viol_w": 2, "viol_x": 0, "ve_delivered": 0, "lazy_copies": 1},
    }


HIDDEN_BREAKPOINT = """
name = "calibration"
[[view]]
name = "exec"
[[setup]]
op = "set_mem_access"
view = "exec"
gfns = 5
access = "x"
[[setup]]
op = "switch_p2m"
view = "exec"
[[on_violation]]
kind = ["r", "w"]
action = "step"
to = 0
"""


@pytest.mark.parametrize(("fast", "expected_cycles"), [(False, 248_400), (True, 128_400)])
def test_spec_calibration_read_of_hidden_breakpoint(fast, expected_cycles):
    # set_mem_access prepopulates gfn 5's 2 MiB host leaf into exec, then splits it (1 split).
    # The first read also lazy-copies gfn 5 into view 0; the second read finds it there, so
    # its cost is the SPEC §8 calibration: exit, event, step to 0, MTF, single-step event
    # (or Xen's fast switch back), two switches.
    policy = HIDDEN_BREAKPOINT + ("fast = true\n" if fast else "")
    one = run(policy, trace([5], [1]))["total"]
    two = run(policy, trace([5, 5], [1, 1]))["total"]
    delta = {k: two[k] - one[k] for k in TOTAL_COUNTERS}
    expected = {"records": 1, "instructions": 1, "ept_exits": 1, "access_violations": 1,
                "mem_access_events": 1, "vm_events": 1, "mtf_exits": 1, "view_switches": 2}
    if fast:
        expected |= {"switches_vm_event": 1, "switches_fast_ss": 1}
    else:
        expected |= {"singlestep_events": 1, "vm_events": 2, "switches_vm_event": 2}
    assert nonzero(delta) == expected
    assert cycles(delta) == expected_cycles
    assert one["setup_splits"] == 1 and one["ept_exits"] == 2 and one["lazy_copies"] == 1


def test_view0_restriction_survives_lazy_copy_only_before_4_19():
    # set_mem_access on view 0 writes the host (2 MiB leaf split: 1 setup split). View 0 has
    # not copied gfn 5 yet: from 4.19 its lazy copy takes view 0's default access (rwx) and the
    # restriction is lost; before, it copies the host entry's access r, the write faults, and
    # set-access in view 0 rewrites the host and propagates into view 0.
    policy = """
name = "host-r"
[domain]
xen = "XEN"
[[setup]]
op = "set_mem_access"
view = 0
gfns = 5
access = "r"
[[on_violation]]
action = "set-access"
"""
    new = run(policy.replace("XEN", "4.22"), trace([5], [2]))["total"]
    assert nonzero(new) == {"records": 1, "instructions": 1, "ept_exits": 1, "lazy_copies": 1,
                            "lazy_copies_4k": 1, "lazy_copy_pages": 1, "setup_splits": 1}
    old = run(policy.replace("XEN", "4.18"), trace([5, 5], [2, 2]))["total"]
    assert nonzero(old) == {"records": 2, "instructions": 2, "ept_exits": 2, "lazy_copies": 1,
                            "lazy_copies_4k": 1, "lazy_copy_pages": 1, "access_violations": 1,
                            "mem_access_events": 1, "vm_events": 1, "access_changes": 1,
                            "setup_splits": 1}


def test_one_gib_split_counts_513():
    # host_order 18, RAM [0, 2^18 - 1]: a 4 KiB host write splits the 1 GiB leaf and all 512
    # of its 2 MiB pieces.
    out = run('name = "x"\n[domain]\nhost_order = 18\n[[setup]]\nop = "set_mem_access"\n'
              'view = 0\ngfns = [5, 6]\naccess = "rw"\n', trace([GIB - 1], [1]))
    assert out["total"]["setup_splits"] == 513


def test_rx2rw_and_n2rwx():
    # rx2rw: copy (exit 1), write faults (exit 2, violation), entry becomes rw, no event.
    out = run('name = "a"\n[[view]]\nname = "v"\ndefault_access = "rx2rw"\n[[setup]]\nop = "switch_p2m"\n'
              'view = "v"\n', trace([5, 5], [2, 2]))["total"]
    assert nonzero(out) == {"records": 2, "instructions": 2, "ept_exits": 2, "lazy_copies": 1,
                            "lazy_copies_4k": 1, "lazy_copy_pages": 1, "access_violations": 1,
                            "access_changes": 1}
    # n2rwx: copy, read faults, entry becomes rwx and an async event goes out; retry completes.
    out = run('name = "b"\n[[view]]\nname = "v"\ndefault_access = "n2rwx"\n[[setup]]\nop = "switch_p2m"\n'
              'view = "v"\n[[on_violation]]\naction = "emulate"\n', trace([5, 5], [1, 4]))["total"]
    assert nonzero(out) == {"records": 2, "instructions": 2, "ept_exits": 2, "lazy_copies": 1,
                            "lazy_copies_4k": 1, "lazy_copy_pages": 1, "access_violations": 1,
                            "async_events": 1, "vm_events": 1, "access_changes": 1}


def test_crash_without_monitor():
    # Row 0 copies and completes; row 1 (w on rx) crashes: nothing after it, no MTF etc.
    out = run('name = "c"\n[domain]\nmonitor = false\n[[view]]\nname = "v"\ndefault_access = "rx"\n'
              '[[setup]]\nop = "switch_p2m"\nview = "v"\n', trace([5, 5, 6], [1, 2, 1], vcpu=[0, 1, 0]))
    assert nonzero(out["total"]) == {"records": 2, "instructions": 2, "ept_exits": 2, "lazy_copies": 1,
                                     "lazy_copies_4k": 1, "lazy_copy_pages": 1,
                                     "access_violations": 1, "crashed": 1, "crash_record": 1}
    assert out["vcpus"][0]["crashed"] == 1 and out["vcpus"][0]["crash_record"] == 1
    assert out["vcpus"][1]["records"] == 1 and out["vcpus"][1]["crash_record"] == 1
    # Without access_required the entry is relaxed to rwx instead.
    out = run('name = "c"\n[domain]\nmonitor = false\naccess_required = false\n[[view]]\nname = "v"\n'
              'default_access = "rx"\n[[setup]]\nop = "switch_p2m"\nview = "v"\n', trace([5, 5], [1, 2]))
    assert nonzero(out["total"]) == {"records": 2, "instructions": 2, "ept_exits": 2, "lazy_copies": 1,
                                     "lazy_copies_4k": 1, "lazy_copy_pages": 1,
                                     "access_violations": 1, "access_changes": 1}


def test_emulate_covers_the_rest_of_the_instruction():
    # altp2m off: host gfn 5 is r (2 MiB leaf split). Row 0 (w) exits, event, emulate: rows
    # 0 and 1 (same insn) are emulated; row 2 starts a new instruction and completes.
    out = run('name = "e"\n[domain]\naltp2m = false\n[[setup]]\nop = "set_mem_access"\nview = 0\n'
              'gfns = 5\naccess = "r"\n[[on_violation]]\naction = "emulate"\n',
              trace([5, 7, 7], [2, 1, 1], insn=[1, 1, 2]))
    assert nonzero(out["total"]) == {"records": 3, "instructions": 2, "ept_exits": 1,
                                     "access_violations": 1, "mem_access_events": 1, "vm_events": 1,
                                     "emulations": 1, "records_emulated": 2, "setup_splits": 1}
    assert list(out["views"]) == [0]
    # View 0 is the host here: RAM [0, 511], its 2 MiB leaf now 512 4 KiB leaves.
    assert nonzero(out["views"][0]) == {"records_completed": 1, "ept_exits": 1, "access_violations": 1,
                                        "pages_mapped": 512, "leaves_4k": 512}


def test_shatter_with_exec_sp_false():
    # altp2m off, host 2 MiB leaf: an execute faults (XSA-304), the gfn is rewritten as 4 KiB,
    # the retry completes; the next execute in the same superpage is a 4 KiB leaf already.
    out = run('name = "s"\n[domain]\naltp2m = false\nexec_sp = false\n', trace([5, 6], [4, 4]))
    assert nonzero(out["total"]) == {"records": 2, "instructions": 2, "ept_exits": 1, "shatters": 1}
    assert out["views"][0]["leaves_4k"] == 512 and out["views"][0]["leaves_2m"] == 0


VE_POLICY = """
name = "ve"
[[view]]
name = "pt"
[[view]]
name = "open"
[[view]]
name = "pt2"
[[setup]]
op = "set_mem_access"
view = "pt"
gfns = 5
access = "rx"
[[setup]]
op = "set_suppress_ve"
view = "pt"
gfns = 5
suppress = false
[[setup]]
op = "set_mem_access"
view = "pt2"
gfns = 5
access = "rx"
[[setup]]
op = "set_suppress_ve"
view = "pt2"
gfns = 5
suppress = false
[[setup]]
op = "enable_notify"
[[setup]]
op = "switch_p2m"
view = "pt"
[[on_violation]]
action = "set-access"
[on_ve]
action = "vmfunc-step"
to = "TARGET"
"""


def test_ve_vmfunc_step():
    # Row 0 (insn 1): w on pt's rx leaf with suppress-VE 0 -> #VE (no exit), VMFUNC to open
    #   (1); open is empty -> exit + 4 KiB copy; the retry completes in open.
    # Row 1 (insn 1): still in open, completes. Row 2 (insn 2): the instruction end VMFUNCs
    #   back to pt (2) and clears #VE busy; #VE again, to open (3), completes; end: back (4).
    out = run(VE_POLICY.replace("TARGET", "open"), trace([5, 5, 5], [2, 2, 2], insn=[1, 1, 2]))
    assert nonzero(out["total"]) == {"records": 3, "instructions": 2, "ept_exits": 1, "lazy_copies": 1,
                                     "lazy_copies_4k": 1, "lazy_copy_pages": 1, "ve_delivered": 2,
                                     "switches_vmfunc": 4, "view_switches": 4, "setup_splits": 2}
    assert out["views"][1]["ve_delivered"] == 2 and out["views"][1]["switches_in"] == 2
    assert out["views"][2]["records_completed"] == 3 and out["views"][2]["switches_in"] == 2
    assert out["gfns"][(1, 5)]["ve_delivered"] == 2 and out["gfns"][(1, 5)]["ept_exits"] == 0
    assert (2, 5) in out["gfns"]


def test_ve_blocked_while_busy():
    # #VE in pt, VMFUNC to pt2 where gfn 5 is rx with suppress-VE 0 too: the vCPU is #VE busy,
    # so this violation exits (ve_blocked), goes to the monitor, and set-access makes it rwx.
    out = run(VE_POLICY.replace("TARGET", "pt2"), trace([5], [2]))
    assert nonzero(out["total"]) == {"records": 1, "instructions": 1, "ept_exits": 1, "ve_delivered": 1,
                                     "ve_blocked": 1, "access_violations": 1, "mem_access_events": 1,
                                     "vm_events": 1, "access_changes": 1, "switches_vmfunc": 2,
                                     "view_switches": 2, "setup_splits": 2}


def test_mmio_and_add_ram():
    # RAM [0, 15]: gfn 16 is a hole (MMIO, one exit); add_ram maps gfn 17 as 4 KiB RAM.
    out = run('name = "m"\n[domain]\nram = [[0, 15]]\n[[setup]]\nop = "add_ram"\ngfns = { above_ram = [1, 1] }\n'
              '[[setup]]\nop = "set_mem_access"\nview = 0\ngfns = [15, 18]\naccess = "rx"\n',
              trace([16, 17], [1, 1]))
    assert nonzero(out["total"]) == {"records": 2, "instructions": 2, "ept_exits": 2, "mmio_accesses": 1,
                                     "lazy_copies": 1, "lazy_copies_4k": 1, "lazy_copy_pages": 1,
                                     "setup_skipped": 2}   # gfns 16 and 18 are holes; 17 is RAM


def test_runtime_errors_name_the_row():
    with pytest.raises(ReplayRuntimeError, match="row 1"):   # no rule for a read violation
        run(WRITE_WATCH.replace('default_access = "rx"', 'default_access = "x"'), trace([5, 5], [4, 1]))
    loop = """
name = "loop"
[[view]]
name = "a"
default_access = "r"
[[view]]
name = "b"
default_access = "r"
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
    with pytest.raises(ReplayRuntimeError, match="row 2"):
        run(loop, trace([5, 5, 5], [1, 1, 2]))


@pytest.mark.parametrize(("op", "match"), [
    ('op = "change_gfn"\nview = "v"\nold = 5000\nnew = 5\n', "setup\\[0\\].*0x1388"),
    ('op = "change_gfn"\nview = "v"\nold = 5\nnew = 5000\n', "setup\\[0\\].*0x1388"),
    ('op = "set_suppress_ve"\nview = "v"\ngfns = 5000\nsuppress = false\n', "setup\\[0\\].*0x1388"),
    ('op = "change_gfn"\nview = "v"\nold = [5, 7]\nnew = [8, 9]\n', "setup\\[0\\]"),
])
def test_setup_errors(op, match):
    with pytest.raises(PolicyError, match=match):
        run(f'name = "p"\n[domain]\nram = [[0, 1023]]\n[[view]]\nname = "v"\n[[setup]]\n{op}', trace([5], [1]))


def test_change_gfn_remap_takes_the_new_entry():
    # old 5 is prepopulated (2 MiB, rwx) then remapped to the effective entry of 600 (host
    # RAM, rwx); the later set_mem_access x on 5 applies on top of the remap. A read of 5
    # faults; "invalid" on 7 removes its 4 KiB leaf, so 7 lazy-copies again.
    out = run('name = "r"\n[domain]\nram = [[0, 1023]]\n[[view]]\nname = "v"\n'
              '[[setup]]\nop = "change_gfn"\nview = "v"\nold = 5\nnew = 600\n'
              '[[setup]]\nop = "set_mem_access"\nview = "v"\ngfns = 5\naccess = "x"\n'
              '[[setup]]\nop = "change_gfn"\nview = "v"\nold = 7\nnew = "invalid"\n'
              '[[setup]]\nop = "switch_p2m"\nview = "v"\n[[on_violation]]\naction = "emulate"\n',
              trace([5, 7, 8], [1, 1, 1]))
    assert nonzero(out["total"]) == {"records": 3, "instructions": 3, "ept_exits": 2,
                                     "lazy_copies": 1, "lazy_copies_4k": 1, "lazy_copy_pages": 1,
                                     "access_violations": 1, "mem_access_events": 1, "vm_events": 1,
                                     "emulations": 1, "records_emulated": 1, "setup_splits": 1}
    assert out["views"][1]["pages_mapped"] == 512   # 511 pieces + the lazy copy of 7


def test_second_step_keeps_the_first_return_view():
    # Views a and b are r. Row 0 (insn 1): a copies 5 (exit), w faults (exit, event), step to
    #   b; b copies (exit), w faults (exit, event), step to 0 (single-step already on: only a
    #   switch, the return view stays a); view 0 copies rwx (exit), completes.
    # Row 1 (insn 2): the step ends: MTF, single-step event, back to a; then the same again.
    out = run('name = "two-steps"\n[[view]]\nname = "a"\ndefault_access = "r"\n[[view]]\nname = "b"\n'
              'default_access = "r"\n[[setup]]\nop = "switch_p2m"\nview = "a"\n'
              '[[on_violation]]\nview = "a"\naction = "step"\nto = "b"\n'
              '[[on_violation]]\nview = "b"\naction = "step"\nto = 0\n', trace([5, 5], [2, 2]))
    assert nonzero(out["total"]) == {
        "records": 2, "instructions": 2, "ept_exits": 7, "lazy_copies": 3, "lazy_copies_4k": 3,
        "lazy_copy_pages": 3, "access_violations": 4, "mem_access_events": 4, "singlestep_events": 2,
        "vm_events": 6, "mtf_exits": 2, "switches_vm_event": 6, "view_switches": 6}
    a, b, host = out["views"][1], out["views"][2], out["views"][0]
    assert (a["ept_exits"], a["access_violations"], a["switches_in"]) == (3, 2, 2)
    assert (b["ept_exits"], b["access_violations"], b["switches_in"]) == (3, 2, 2)
    assert (host["ept_exits"], host["records_completed"], host["switches_in"]) == (1, 2, 2)


def test_set_access_in_view0_rewrites_the_host_and_propagates():
    # Host rw. v1 holds 5 and 6 as r (prepopulated 2 MiB, split: 1 setup split).
    # Row 0 (insn 1): w 6 in v1 faults, step to 0; view 0 copies 6 (rw), completes.
    # Row 1 (insn 1): x 5 in view 0: copy (rw), x faults; set-access in view 0 is a host
    #   write (the host's 2 MiB leaf splits: 1 superpage split) that propagates to view 0
    #   and to v1, whose r at 5 becomes rwx.
    # Row 2 (insn 2): the step ends (back to v1); w 5 in v1 now completes.
    out = run('name = "prop"\n[domain]\nhost_access = "rw"\n[[view]]\nname = "v1"\n'
              '[[setup]]\nop = "set_mem_access"\nview = "v1"\ngfns = [5, 6]\naccess = "r"\n'
              '[[setup]]\nop = "switch_p2m"\nview = "v1"\n'
              '[[on_violation]]\nview = "v1"\naction = "step"\nto = 0\n'
              '[[on_violation]]\nview = 0\naction = "set-access"\n',
              trace([6, 5, 5], [2, 4, 2], insn=[1, 1, 2]))
    assert nonzero(out["total"]) == {
        "records": 3, "instructions": 2, "ept_exits": 4, "lazy_copies": 2, "lazy_copies_4k": 2,
        "lazy_copy_pages": 2, "access_violations": 2, "mem_access_events": 2, "singlestep_events": 1,
        "vm_events": 3, "mtf_exits": 1, "switches_vm_event": 2, "view_switches": 2,
        "access_changes": 1, "superpage_splits": 1, "setup_splits": 1}
    assert out["views"][1]["records_completed"] == 1 and out["views"][1]["access_violations"] == 1
