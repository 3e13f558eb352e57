"""Independent fidelity review: more hand-derived scenarios (SPEC §3-§8, Revision 2).

Each expectation below was derived by hand from SPEC.md; the comment above it shows how.
The notation is the one of ``test_scenarios.py`` (``exit(V)``, ``lazy 4K (V)``,
``done(V)``, ``svm`` / ``sfs`` / ``svf``, ``mm`` for ``max_mapped``), and the helpers
there assert every counter (unlisted ones must be 0).

Unless a test says otherwise the domain has ``ram = [[0, 1023]]``: the host maps gfns
0-511 and 512-1023 with two 2 MiB leaves, access rwx (origin "create": host_order 18, but
no 1 GiB page lies wholly in RAM), xen 4.22, one vCPU.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_scenarios import (
    ENGINES,
    RAM_1K,
    _runner,
    check,
    make_policy,
    make_trace,
    make_trace2,
)

from altp2m_replay.costs import COSTS, cycles, effective_costs


@pytest.fixture(params=ENGINES)
def sim(request):
    return _runner(request, make_trace)


@pytest.fixture(params=ENGINES)
def sim2(request):
    return _runner(request, make_trace2)


@pytest.fixture(params=ENGINES)
def sim_arrays(request):
    """``sim_arrays(policy_body, [arrays])``: the trace is given as a dict of arrays."""
    return _runner(request, lambda arrays: arrays)


RO_VIEW = (
    RAM_1K
    + """
[[view]]
name = "ro"
default_access = "r"

[[setup]]
op = "switch_p2m"
view = "ro"
"""
)


# =========================================================================== CR3 rules (§6.5)
def test_restarted_cr3_write_is_unchanged_on_the_second_pass(sim2):
    res = sim2(RAM_1K + "[on_cr3]\n", ["i1 cr3 0x1000", "i1 r 5"])
    # §6.5, onchangeonly defaults to true. row0 (insn 1) cr3 0x1000: [on_cr3] -> exit
    #   (cr3_exits 1); the vCPU's first write is a change -> sync cr3 event 1; no switch rule.
    # row1 r 5: view 0 fresh -> exit(0), lazy 4K -> restart -> the pass executes the CR3
    #   write again (§5: a control row of a restarted instruction runs again): cr3_writes 2,
    #   cr3_exits 2, but the value equals the vCPU's current CR3 -> no event. r 5 done(0).
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
            "cr3_events": 1,
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


def test_cr3_current_value_is_per_vcpu(sim2):
    res = sim2(
        RAM_1K + "[on_cr3]\nsync = false\n",
        ["v0 cr3 0x1000", "v1 cr3 0x1000", "v1 cr3 0x1000", "v0 cr3 0x2000"],
    )
    # §6.5: "a vCPU's first write is always a change" - v1's first write of the value v0
    # already holds is still a change. Every write exits ([on_cr3]).
    # v0 0x1000: first -> async event. v1 0x1000: v1's first -> async event.
    # v1 0x1000: unchanged for v1 -> no event. v0 0x2000: changed -> async event.
    # Async CR3 events restart nothing (the write completes).
    v0 = {
        "instructions": 2,
        "control_records": 2,
        "cr3_writes": 2,
        "cr3_exits": 2,
        "async_events": 2,
        "restarts": 0,
    }
    v1 = {
        "instructions": 2,
        "control_records": 2,
        "cr3_writes": 2,
        "cr3_exits": 2,
        "async_events": 1,
        "restarts": 0,
    }
    check(
        res,
        {k: v0[k] + v1[k] for k in v0},
        vcpus={0: v0, 1: v1},
        views={},
        gfns={},
    )


def test_cr3_without_on_cr3_counts_writes_only_and_rules_pick_the_first_match(sim2):
    body = (
        RAM_1K
        + """
        [[view]]
        name = "a"

        [[setup]]
        op = "switch_p2m"
        view = "a"
        """
    )
    res = sim2(body, ["cr3 0x1000", "cr3 0x2000"])
    # No [on_cr3]: CR3-load exiting is off -> cr3_writes only, no exit, no event.
    check(
        res,
        {"instructions": 2, "control_records": 2, "cr3_writes": 2},
        views={},
        gfns={},
    )

    res = sim2(
        body
        + """
        [on_cr3]

        [[on_cr3.switch]]
        cr3 = [0x3000, 0x1000]
        to = "a"

        [[on_cr3.switch]]
        cr3 = "other"
        to = 0
        """,
        ["cr3 0x1000", "cr3 0x2000", "cr3 0x3000"],
    )
    # cr3 0x1000: first write -> exit, sync event 1; rule 1 (a list holding 0x1000) -> to
    #   "a", where the vCPU already is: no switch counted (§5: only actual changes count).
    # cr3 0x2000: exit, event 2; rule 2 ("other") -> view 0: svm 1 (switches_in[0]).
    # cr3 0x3000: exit, event 3; rule 1 -> a: svm 2 (switches_in[1]).
    check(
        res,
        {
            "instructions": 3,
            "control_records": 3,
            "cr3_writes": 3,
            "cr3_exits": 3,
            "cr3_events": 3,
            "switches_vm_event": 2,
        },
        views={0: {"switches_in": 1}, 1: {"switches_in": 1}},
        gfns={},
    )


def test_cr3_write_takes_effect_in_an_emulated_instruction(sim2):
    res = sim2(
        RO_VIEW
        + """
        [[on_violation]]
        kind = "w"
        action = "emulate"

        [on_cr3]

        [[on_cr3.switch]]
        cr3 = "other"
        to = 0
        """,
        ["i1 w 5", "i1 cr3 0x1000", "i2 r 5"],
    )
    # row0 w 5 in ro (fresh): exit(1), lazy 4K (r) -> restart -> viol_w (1,5), exit(1), event
    #   -> emulate (§6.1): emulations 1, this row and the rest of insn 1 complete unchecked:
    #   records_emulated 1.
    # row1 cr3 in the emulated instruction: still takes effect (§5, Xen emulates mov cr3):
    #   cr3_writes, cr3_exits, sync cr3 event -> "other" -> view 0 (svm 1). It is a control
    #   row, not an access row: records_emulated stays 1 (records counts access rows).
    # row2 (insn 2) r 5 in view 0 (fresh): exit(0), lazy 4K -> restart -> done(0).
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
            "control_records": 1,
            "cr3_writes": 1,
            "cr3_exits": 1,
            "cr3_events": 1,
            "switches_vm_event": 1,
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
            (0, 5): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


# =========================================================================== guest VMFUNC (§6.5)
def test_guest_vmfunc_to_view0_current_view_and_a_view_hidden_by_set_visibility(sim2):
    res = sim2(
        RAM_1K
        + """
        [[view]]
        name = "a"

        [[view]]
        name = "b"

        [[setup]]
        op = "set_visibility"
        view = "b"
        visible = false

        [[setup]]
        op = "enable_notify"
        vcpus = "all"
        """,
        ["vmfunc 0", "vmfunc 1", "vmfunc 1", "vmfunc 2", "vmfunc 0"],
    )
    # vmfunc 0: enabled, view 0 active and visible, already current: guest_vmfuncs 1, no
    #   switch. vmfunc 1: guest_vmfuncs 2, svf 1 (switches_in[1]). vmfunc 1 again: 3, no switch.
    # vmfunc 2: b was made invisible by set_visibility -> exit + #UD (vmfunc_exits 1).
    # vmfunc 0: guest_vmfuncs 4, svf 2 (switches_in[0]).
    check(
        res,
        {
            "instructions": 5,
            "control_records": 5,
            "guest_vmfuncs": 4,
            "switches_vmfunc": 2,
            "vmfunc_exits": 1,
        },
        views={0: {"switches_in": 1}, 1: {"switches_in": 1}},
        gfns={},
    )


def test_guest_vmfunc_with_altp2m_off_raises_ud(sim2):
    res = sim2(
        """
        [domain]
        altp2m = false
        ram = [[0, 1023]]
        """,
        ["vmfunc 0", "r 5"],
    )
    # §6.5: #VE/VMFUNC is never enabled with altp2m off -> vmfunc_exits even for view 0.
    # r 5 walks the host p2m (2M rwx) -> done(0), no exit.
    check(
        res,
        {"records": 1, "instructions": 2, "control_records": 1, "vmfunc_exits": 1},
        views={0: {"records_completed": 1, "pages_mapped": 1024, "leaves_2m": 2}},
        gfns={},
    )


# =========================================================================== breakpoints (§2, §4, §5.2, §6.4)
def test_breakpoint_traps_only_on_a_first_row_fetch_and_skips_non_ram(sim2):
    res = sim2(
        RAM_1K
        + """
        [breakpoints]
        at = [0x5010, 0x7d0010]

        [[setup]]
        op = "write_breakpoints"
        view = 0

        [on_breakpoint]
        action = "emulate"
        """,
        ["i1 x 6", "i1 x 5@0x10", "i2 r 5@0x10", "i3 x 5@0x10"],
    )
    # Setup: write_breakpoints view 0: view 0 holds nothing -> the host's frame of gfn 5 gets
    #   the INT3 at 0x10 (no prepopulate). 0x7d0010 is gfn 2000, not RAM: setup_skipped 1.
    # row0 (insn 1) x 6: view 0 fresh: exit(0), lazy 4K (6 > mm 0, regions at 0) -> restart
    #   -> done(0) (byte address 0x6000: no INT3).
    # row1 (insn 1) x 5@0x10: no leaf: exit(0), lazy 4K (walk: entry 5 empty) -> restart:
    #   row0 done(0); row1 fetches the INT3 byte but is not the instruction's first row
    #   (§5.2) -> done(0).
    # row2 (insn 2) r 5@0x10: first row is a read, not a fetch -> no byte address -> done(0).
    # row3 (insn 3) x 5@0x10: first row, a fetch at 0x5010 whose leaf maps the frame holding
    #   the INT3 -> trap (§6.4): int3_exits (0, 5), breakpoint event -> emulate: emulations 1,
    #   records_emulated 1; a trapping fetch is never a completion.
    check(
        res,
        {
            "records": 4,
            "instructions": 3,
            "ept_exits": 2,
            "lazy_copies": 2,
            "lazy_copies_4k": 2,
            "lazy_copy_pages": 2,
            "int3_exits": 1,
            "breakpoint_events": 1,
            "emulations": 1,
            "records_emulated": 1,
            "setup_skipped": 1,
        },
        views={
            0: {
                "records_completed": 3,
                "ept_exits": 2,
                "int3_exits": 1,
                "lazy_copies": 2,
                "lazy_copy_pages": 2,
                "pages_mapped": 2,
                "leaves_4k": 2,
            }
        },
        gfns={
            (0, 6): {"ept_exits": 1, "lazy_copies": 1},
            (0, 5): {"ept_exits": 1, "lazy_copies": 1, "int3_exits": 1},
        },
    )


def test_breakpoint_written_through_an_unremapped_view_shows_in_view0(sim2):
    res = sim2(
        RAM_1K
        + """
        [[view]]
        name = "x"

        [breakpoints]
        at = 0x5010

        [[setup]]
        op = "write_breakpoints"
        view = "x"

        [on_breakpoint]
        action = "emulate"
        """,
        ["x 5@0x10"],
    )
    # Setup: write_breakpoints x: x holds nothing for gfn 5 -> prepopulate as set_mem_access
    #   does: the host's 2M leaf [0,511] copied at host order (x: one 2M leaf, no split: no
    #   entry is rewritten); x maps gfn 5 to the host frame, which gets the INT3 (§4: a
    #   breakpoint belongs to the frame, not the view).
    # x 5@0x10 in view 0 (the vCPU never left it): exit(0), lazy 4K -> restart -> the fetch
    #   maps the same frame -> trap: int3_exits(0, 5), event -> emulate.
    check(
        res,
        {
            "records": 1,
            "instructions": 1,
            "ept_exits": 1,
            "lazy_copies": 1,
            "lazy_copies_4k": 1,
            "lazy_copy_pages": 1,
            "int3_exits": 1,
            "breakpoint_events": 1,
            "emulations": 1,
            "records_emulated": 1,
        },
        views={
            0: {
                "ept_exits": 1,
                "int3_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
            1: {"pages_mapped": 512, "leaves_2m": 1},
        },
        gfns={(0, 5): {"ept_exits": 1, "lazy_copies": 1, "int3_exits": 1}},
    )


def test_breakpoint_trap_is_never_a_ve_and_write_breakpoints_keeps_an_existing_leaf(sim2):
    res = sim2(
        RAM_1K
        + """
        [[view]]
        name = "x"

        [breakpoints]
        at = 0x5010

        [[setup]]
        op = "set_suppress_ve"
        view = "x"
        gfns = 5
        suppress = false

        [[setup]]
        op = "write_breakpoints"
        view = "x"

        [[setup]]
        op = "enable_notify"

        [[setup]]
        op = "switch_p2m"
        view = "x"

        [on_ve]
        action = "emulate"

        [on_breakpoint]
        action = "emulate"
        """,
        ["x 5@0x10"],
    )
    # Setup: set_suppress_ve on x (view >= 1) takes the host's RAM leaf WITHOUT prepopulate:
    #   x gets one 4K leaf at 5 (rwx, suppress-VE 0). write_breakpoints x: x holds a valid
    #   leaf for 5 -> no prepopulate; the INT3 goes into the host frame of 5.
    # x 5@0x10 in x: the leaf permits x -> first-row fetch on the INT3 -> trap: int3 exit,
    #   breakpoint event -> emulate. #VE is enabled and the bit is 0, but a trap is never
    #   converted to #VE (§6.4): no ve_delivered.
    check(
        res,
        {
            "records": 1,
            "instructions": 1,
            "int3_exits": 1,
            "breakpoint_events": 1,
            "emulations": 1,
            "records_emulated": 1,
        },
        views={1: {"int3_exits": 1, "pages_mapped": 1, "leaves_4k": 1}},
        gfns={(1, 5): {"int3_exits": 1}},
    )


def test_breakpoint_byte_address_from_gfn_and_ip_with_an_ip_selector(sim_arrays):
    ip0 = 0xFFFFFFFF81000010
    arrays = {
        "gfn": np.array([5, 5, 5], dtype=np.uint64),
        "access": np.array([4, 4, 4], dtype=np.uint8),
        "ip": np.array([ip0, ip0 + 0x10, ip0], dtype=np.uint64),
    }
    res = sim_arrays(
        RAM_1K
        + f"""
        [breakpoints]
        at = {{ ip = [{ip0}] }}

        [[setup]]
        op = "write_breakpoints"
        view = 0

        [on_breakpoint]
        action = "emulate"
        """,
        [arrays],
    )
    # §2: without gpa the byte address is (gfn << 12) | (ip & 0xfff): rows 0 and 2 are at
    #   0x5010, row 1 at 0x5020. §4 { ip = [...] }: the first instruction starting with a
    #   fetch at ip0 is row 0 -> breakpoint at 0x5010, written into the host frame of 5.
    # row0: view 0 fresh: exit(0), lazy 4K -> restart -> trap: int3 (0,5), event, emulate.
    # row1: 0x5020, no INT3 -> done(0). row2: 0x5010 -> trap again: int3, event, emulate.
    check(
        res,
        {
            "records": 3,
            "instructions": 3,
            "ept_exits": 1,
            "lazy_copies": 1,
            "lazy_copies_4k": 1,
            "lazy_copy_pages": 1,
            "int3_exits": 2,
            "breakpoint_events": 2,
            "emulations": 2,
            "records_emulated": 2,
        },
        views={
            0: {
                "records_completed": 1,
                "ept_exits": 1,
                "int3_exits": 2,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            }
        },
        gfns={(0, 5): {"ept_exits": 1, "lazy_copies": 1, "int3_exits": 2}},
    )


# =========================================================================== emulate (§6.1)
def test_emulate_completes_later_rows_unchecked_even_at_a_hole(sim):
    res = sim(
        RO_VIEW
        + """
        [[on_violation]]
        kind = "w"
        action = "emulate"
        """,
        ["i1 r 6", "i1 w 5", "i1 r 2000", "i2 r 6"],
    )
    # row0 r 6 in ro: exit(1), lazy 4K (6 > mm 0) -> restart -> done(1).
    # row1 w 5: no leaf: exit(1), lazy 4K (5 <= mm 6, entry 5 empty) r -> restart: row0
    #   done(1); row1 viol_w (1,5), exit(1), event -> emulate: emulations 1, records_emulated 1.
    # row2 r 2000 (a hole) in the emulated instruction: completes unchecked: records_emulated
    #   2, no exit, no mmio_accesses.
    # row3 (insn 2) r 6: done(1).
    # records_completed[ro]: insn 1's final pass is the emulated one: row0 counts (1); row3 (2).
    check(
        res,
        {
            "records": 4,
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
            (1, 6): {"ept_exits": 1, "lazy_copies": 1},
            (1, 5): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
        },
    )


def test_crash_mid_instruction_counts_the_pass_in_progress(sim):
    res = sim(
        """
        [domain]
        altp2m = false
        monitor = false
        ram = [[0, 1023]]

        [[setup]]
        op = "set_mem_access"
        view = 0
        gfns = 6
        access = "r"
        """,
        ["i1 r 5", "i1 w 6", "i2 r 7"],
    )
    # Setup: view-0 set_mem_access (altp2m off) writes the host's 4K leaf 6 r: the 2M leaf
    #   [0,511] splits (setup_splits 1).
    # row0 r 5: host 4K piece rwx -> done(0).
    # row1 w 6: leaf r -> EPT violation: exit(0), viol_w (0,6); no monitor, access_required
    #   -> crash: crashed 1, crash_record 1. records 2 (the stopping row included);
    #   records_completed counts the pass in progress: row0 (1). Row 2 is never processed.
    check(
        res,
        {
            "records": 2,
            "instructions": 1,
            "ept_exits": 1,
            "access_violations": 1,
            "crashed": 1,
            "crash_record": 1,
            "setup_splits": 1,
        },
        vcpus={
            0: {
                "records": 2,
                "instructions": 1,
                "ept_exits": 1,
                "access_violations": 1,
                "crashed": 1,
                "crash_record": 1,
            }
        },
        views={
            0: {
                "records_completed": 1,
                "ept_exits": 1,
                "access_violations": 1,
                "pages_mapped": 1024,
                "leaves_4k": 512,
                "leaves_2m": 1,
            }
        },
        gfns={(0, 6): {"ept_exits": 1, "viol_w": 1}},
    )


# =========================================================================== EPT syncs (§5)
def test_set_access_on_a_no_permission_leaf_causes_no_ept_sync(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "nv"
        default_access = "n"

        [[setup]]
        op = "switch_p2m"
        view = "nv"

        [[on_violation]]
        action = "set-access"
        """,
        ["v0 w 5", "v1 r 6"],
    )
    # v0 w 5 in nv: exit(1), lazy 4K (n) -> restart -> viol_w, exit(1), event -> set-access
    #   rwx: rewrites a leaf that permitted nothing -> access_changes 1, no ept_sync (§5) ->
    #   restart -> done(1).
    # v1 r 6 in nv: 6 > mm 5, regions at 0 -> exit, lazy 4K (n) -> viol_r, exit, event,
    #   set-access -> done(1). Again no sync, so no IPI to the other vCPU.
    one = {
        "records": 1,
        "instructions": 1,
        "ept_exits": 2,
        "lazy_copies": 1,
        "lazy_copies_4k": 1,
        "lazy_copy_pages": 1,
        "access_violations": 1,
        "mem_access_events": 1,
        "access_changes": 1,
    }
    check(
        res,
        {k: 2 * v for k, v in one.items()},
        vcpus={0: one, 1: one},
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
            (1, 5): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
            (1, 6): {"ept_exits": 2, "lazy_copies": 1, "viol_r": 1},
        },
    )


def test_rx2rw_on_a_superpage_splits_and_syncs_the_other_vcpu(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "p"
        default_access = "rx2rw"

        [[setup]]
        op = "switch_p2m"
        view = "p"
        """,
        ["v0 r 600", "v1 w 700"],
    )
    # v0 r 600 in p: 600 > mm 0, 2M region 512 above it -> hole 9: exit(1), lazy 2M rx2rw
    #   -> restart -> r permitted -> done(1).
    # v1 w 700: the 2M rx2rw leaf forbids w (counts as rx): exit(1), viol_w (1,700) -> §5.7
    #   rx2rw: rewrite 700 as 4K rw: the 2M leaf splits (superpage_splits 1), access_changes
    #   1; the entry permitted r/x -> one ept_sync in p, one IPI (to v0) -> restart -> done(1).
    #   No event.
    v0 = {
        "records": 1,
        "instructions": 1,
        "ept_exits": 1,
        "lazy_copies": 1,
        "lazy_copies_2m": 1,
        "lazy_copy_pages": 512,
        "restarts": 1,
    }
    v1 = {
        "records": 1,
        "instructions": 1,
        "ept_exits": 1,
        "access_violations": 1,
        "access_changes": 1,
        "superpage_splits": 1,
        "ept_syncs": 1,
        "ept_sync_ipis": 1,
        "restarts": 1,
    }
    check(
        res,
        {k: v0.get(k, 0) + v1.get(k, 0) for k in set(v0) | set(v1)},
        vcpus={0: v0, 1: v1},
        views={
            1: {
                "records_completed": 2,
                "ept_exits": 2,
                "lazy_copies": 1,
                "lazy_copy_pages": 512,
                "access_violations": 1,
                "pages_mapped": 512,
                "leaves_4k": 512,
            }
        },
        gfns={
            (1, 600): {"ept_exits": 1, "lazy_copies": 1},
            (1, 700): {"ept_exits": 1, "viol_w": 1},
        },
    )


def test_xen_416_lazy_copy_over_a_table_is_an_ept_sync(sim):
    res = sim(
        """
        [domain]
        ram = [[0, 1023]]
        xen = "4.16"

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
        old = 6
        new = "invalid"

        [[setup]]
        op = "switch_p2m"
        view = "v"
        """,
        ["v0 r 6", "v1 r 7"],
    )
    # Setup: set_mem_access v 5: v holds nothing -> prepopulate the host's 2M [0,511] at host
    #   order (xen < 4.22: host access rwx), then rewrite 5 as 4K r: split (setup_splits 1).
    #   change_gfn 6 invalid: v's 4K leaf 6 removed.
    # v0 r 6 in v: no valid leaf -> exit(1) -> lazy copy at the HOST order (xen < 4.17): the
    #   2M leaf [0,511], host access (xen < 4.19). It replaces v's 4K table, whose leaves
    #   permitted something -> one ept_sync (§5), one IPI (to v1). -> restart -> done(1).
    # v1 r 7: inside the 2M leaf -> done(1).
    v0 = {
        "records": 1,
        "instructions": 1,
        "ept_exits": 1,
        "lazy_copies": 1,
        "lazy_copies_2m": 1,
        "lazy_copy_pages": 512,
        "ept_syncs": 1,
        "ept_sync_ipis": 1,
    }
    v1 = {"records": 1, "instructions": 1}
    check(
        res,
        {k: v0.get(k, 0) + v1.get(k, 0) for k in set(v0) | set(v1)} | {"setup_splits": 1},
        vcpus={0: v0, 1: v1},
        views={
            1: {
                "records_completed": 2,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 512,
                "pages_mapped": 512,
                "leaves_2m": 1,
            }
        },
        gfns={(1, 6): {"ept_exits": 1, "lazy_copies": 1}},
    )


# =========================================================================== host drops and maps (§6.5)
def test_host_drop_of_a_remapped_old_gfn_removes_it_and_map_brings_back_its_own_frame(sim2):
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
        ["r 5", "v3 drop 5", "r 5", "v3 map 5", "r 5"],
    )
    # Setup: change_gfn prepopulates s with 2M [0,511] and rewrites 5 as 4K (setup_splits 1):
    #   s[5] -> frame of 1000; s's remap interval is [1000, 1000]; mm(s) 511.
    # r 5: done(s).
    # drop 5 (its vcpu column is ignored: op 3/4 belong to no vCPU): the host's 2M [0,511]
    #   splits (superpage_splits 1) and 5 becomes a hole: it permitted rwx -> sync 1. View 0
    #   holds nothing. s: 5 is not in its remap interval [1000,1000], but s holds a valid
    #   leaf at 5 -> removed (4K, no split), it permitted rwx -> sync 2. No reset.
    #   IPIs: all vCPUs of the trace for op 3 (one: vCPU 0) -> 2.
    # r 5 in s: no valid leaf -> exit(1); the host no longer maps 5 -> MMIO (no completion).
    # map 5: the host's hole becomes 4K RAM (nothing permitted before: no sync; already 4K:
    #   no split); no view holds a valid leaf covering 5: nothing propagates.
    # r 5 in s: exit(1), lazy: 5 <= mm 511, s's 4K table exists, entry 5 empty -> 4K, the
    #   host frame of 5 (the remap is gone) -> restart -> done(1).
    v0 = {
        "records": 3,
        "instructions": 3,
        "ept_exits": 2,
        "mmio_accesses": 1,
        "lazy_copies": 1,
        "lazy_copies_4k": 1,
        "lazy_copy_pages": 1,
    }
    check(
        res,
        v0
        | {
            "control_records": 2,
            "host_drops": 1,
            "host_maps": 1,
            "superpage_splits": 1,
            "ept_syncs": 2,
            "ept_sync_ipis": 2,
            "setup_splits": 1,
        },
        vcpus={0: v0},
        views={
            1: {
                "records_completed": 2,
                "ept_exits": 2,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "pages_mapped": 512,
                "leaves_4k": 512,
            }
        },
        gfns={(1, 5): {"ept_exits": 2, "lazy_copies": 1}},
    )


def test_host_map_of_ram_inside_superpages_splits_and_syncs_each_p2m(sim2):
    res = sim2(RAM_1K, ["v0 r 600", "v1 r 5", "map 700", "v0 r 700", "v1 r 6"])
    # v0 r 600: view 0 fresh, 2M region 512 above mm 0 -> exit(0), lazy 2M [512,1023] -> done.
    # v1 r 5: 5 <= mm 1023: walk; the 2M-level entry [0,511] is empty -> hole 9 -> lazy 2M.
    # map 700 (already RAM): a 4K host write: the host's 2M leaf splits (superpage_splits 1),
    #   the rewritten entry permitted rwx -> sync 1. Propagation: view 0 holds a valid 2M leaf
    #   covering 700 -> 4K leaf at 700: split (superpage_splits 2), sync 2. IPIs: every vCPU
    #   for op 4 (two) per sync -> 4. host_maps 1.
    # v0 r 700: 4K rwx -> done. v1 r 6: 2M leaf [0,511] -> done.
    one = {
        "records": 2,
        "instructions": 2,
        "ept_exits": 1,
        "lazy_copies": 1,
        "lazy_copies_2m": 1,
        "lazy_copy_pages": 512,
    }
    check(
        res,
        {k: 2 * v for k, v in one.items()}
        | {
            "control_records": 1,
            "host_maps": 1,
            "superpage_splits": 2,
            "ept_syncs": 2,
            "ept_sync_ipis": 4,
        },
        vcpus={0: one, 1: one},
        views={
            0: {
                "records_completed": 4,
                "ept_exits": 2,
                "lazy_copies": 2,
                "lazy_copy_pages": 1024,
                "pages_mapped": 1024,
                "leaves_2m": 1,
                "leaves_4k": 512,
            }
        },
        gfns={
            (0, 600): {"ept_exits": 1, "lazy_copies": 1},
            (0, 5): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


def test_host_drop_of_a_hole_then_map_beyond_ram(sim2):
    res = sim2(RAM_1K, ["drop 2000", "map 2000", "r 2000"])
    # drop 2000: already a hole: the host write still happens (host_drops 1) but removes no
    #   entry that permitted anything -> no sync; no view holds it.
    # map 2000: host maps 2000 as 4K RAM; nothing to propagate, nothing permitted before.
    # r 2000 in view 0: 2000 > mm 0, 2M region 1536 above it -> hole 9; host order there 0
    #   -> lazy 4K -> restart -> done(0).
    v0 = {
        "records": 1,
        "instructions": 1,
        "ept_exits": 1,
        "lazy_copies": 1,
        "lazy_copies_4k": 1,
        "lazy_copy_pages": 1,
    }
    check(
        res,
        v0 | {"control_records": 2, "host_drops": 1, "host_maps": 1},
        vcpus={0: v0},
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
        gfns={(0, 2000): {"ept_exits": 1, "lazy_copies": 1}},
    )


def test_ve_from_a_leaf_removed_by_a_host_drop(sim2):
    res = sim2(
        RAM_1K
        + """
        [[view]]
        name = "w"

        [[setup]]
        op = "set_suppress_ve"
        view = "w"
        gfns = 5
        suppress = false

        [[setup]]
        op = "enable_notify"

        [[setup]]
        op = "switch_p2m"
        view = "w"

        [on_ve]
        action = "emulate"
        """,
        ["i0 drop 5", "i1 r 5", "i2 r 6"],
    )
    # Setup: set_suppress_ve on w takes the host RAM leaf without prepopulate: w[5] = 4K rwx,
    #   suppress-VE 0; mm(w) 5.
    # drop 5: host 2M [0,511] splits (superpage_splits 1), 5 becomes a hole: sync 1. View 0
    #   holds nothing. w: no remap interval; holds a valid leaf at 5 -> removed (it permitted
    #   rwx: sync 2); the removed leaf keeps its suppress-VE bit 0. IPIs: 1 vCPU x 2.
    # i1 r 5 in w: no valid leaf -> EPT violation; §5.3: #VE enabled, not busy, the deciding
    #   entry is the removed leaf with bit 0 -> #VE (no exit, so no MMIO): ve_delivered (w,5),
    #   busy; the agent emulates: ve_emulations 1, records_emulated 1.
    # i2: insn 1 ends, busy clears. r 6 in w: 6 > mm 5, regions at 0 -> hole 0; the walk stops
    #   at an empty slot (suppress-VE 1) -> exit(w), lazy 4K -> restart -> done(w).
    v0 = {
        "records": 2,
        "instructions": 2,
        "ve_delivered": 1,
        "ve_emulations": 1,
        "records_emulated": 1,
        "ept_exits": 1,
        "lazy_copies": 1,
        "lazy_copies_4k": 1,
        "lazy_copy_pages": 1,
    }
    check(
        res,
        v0
        | {
            "control_records": 1,
            "host_drops": 1,
            "superpage_splits": 1,
            "ept_syncs": 2,
            "ept_sync_ipis": 2,
        },
        vcpus={0: v0},
        views={
            1: {
                "records_completed": 1,
                "ve_delivered": 1,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            }
        },
        gfns={(1, 5): {"ve_delivered": 1}, (1, 6): {"ept_exits": 1, "lazy_copies": 1}},
    )


# =========================================================================== timeline (§7)
@pytest.mark.parametrize("batch_rows", [1, 2, None])
def test_timeline_instruction_end_goes_to_the_row_that_ends_it(batch_rows):
    from altp2m_replay.engine import simulate_arrays

    res = simulate_arrays(
        make_policy(
            RO_VIEW
            + """
            [[on_violation]]
            kind = "w"
            action = "step"
            to = 0
            """
        ),
        make_trace("v0 i1 w 5", "v1 i1 r 600", "v0 i2 r 5"),
        window=1,
        batch_rows=batch_rows,
    )
    # window = 1 row.
    # row0 v0 w 5 in ro: exit(1), lazy 4K r -> restart -> viol_w, exit(1), event, step to 0
    #   (svm) -> restart in 0: exit(0), lazy 4K -> restart -> done(0).
    #   window 0: 3 exits, 2 lazy, 1 event, 1 switch.
    # row1 v1 r 600 in ro: another vCPU's row does not end v0's instruction: 600 > mm 5,
    #   2M region above -> exit(1), lazy 2M -> done(1). window 1: 1 exit, 1 lazy.
    # row2 v0 i2: v0's insn 1 ends here: MTF exit, single-step event, switch back (svm) -
    #   all in window 2; r 5 in ro: 4K r -> done.
    # cycles (§8 defaults): w0 = 3*5000 + 2*500 + 90000 + 30000 + 200 = 136,200;
    #   w1 = 5000 + 500 = 5,500; w2 = 3000 (mtf) + 90000 + 30000 + 200 = 123,200.
    tl = res.timeline
    assert list(tl["first_record"]) == [0, 1, 2]
    assert list(tl["ept_exits"]) == [3, 1, 0]
    assert list(tl["lazy_copies"]) == [2, 1, 0]
    assert list(tl["vm_events"]) == [1, 0, 1]
    assert list(tl["view_switches"]) == [1, 0, 1]
    win_cycles = cycles(tl, effective_costs({}))["cycles_total"]
    assert [int(c) for c in win_cycles] == [136_200, 5_500, 123_200]


# =========================================================================== costs (§8)
def test_cost_formula_charges_each_key_on_the_listed_counters():
    # Distinct powers of two per counter, so every misplaced charge shows.
    names = [
        "ept_exits",
        "lazy_copies",
        "mem_access_events",
        "singlestep_events",
        "breakpoint_events",
        "cr3_events",
        "int3_exits",
        "cr3_exits",
        "vmfunc_exits",
        "view_resets",
        "ept_sync_ipis",
        "async_events",
        "mtf_exits",
        "switches_vm_event",
        "switches_fast_ss",
        "switches_vmfunc",
        "ve_delivered",
        "emulations",
        "ve_emulations",
        "access_changes",
        "superpage_splits",
        "shatters",
        "mmio_accesses",
        "setup_splits",
        "ept_syncs",
        "guest_vmfuncs",
    ]
    c = {n: 1 << i for i, n in enumerate(names)}
    got = cycles(c, effective_costs({}))
    # §8 table, key by key, with the default profile xen-dom0.
    sync_events = (
        c["mem_access_events"] + c["singlestep_events"] + c["breakpoint_events"] + c["cr3_events"]
    )
    want = {
        "ept_exit": 5000 * c["ept_exits"],
        "lazy_copy": 500 * c["lazy_copies"],
        "vm_event_sync": 90000 * sync_events,
        "monitor_callback": 30000 * sync_events,
        "int3_exit": 5000 * c["int3_exits"],
        "cr3_exit": 3000 * c["cr3_exits"],
        "vmfunc_exit": 5000 * c["vmfunc_exits"],
        "view_reset": 20000 * c["view_resets"],
        "ept_sync_ipi": 4000 * c["ept_sync_ipis"],
        "vm_event_async": 5000 * c["async_events"],
        "mtf_exit": 3000 * c["mtf_exits"],
        "view_switch": 200 * (c["switches_vm_event"] + c["switches_fast_ss"]),
        "vmfunc": 150 * c["switches_vmfunc"],
        "ve_delivery": 500 * c["ve_delivered"],
        "ve_agent": 2500 * c["ve_delivered"],
        "emulation": 10000 * (c["emulations"] + c["ve_emulations"]),
        "access_change": 3000 * c["access_changes"],
        "superpage_split": 8000 * (c["superpage_splits"] + c["shatters"]),
        "mmio": 40000 * c["mmio_accesses"],
    }
    assert set(COSTS) == set(want)
    for key, value in want.items():
        assert got[f"cycles_{key}"] == value, key
    assert got["cycles_total"] == sum(want.values())
    # Profile polling-agent: vm_event_sync 15000, monitor_callback 0.
    polling = cycles(c, effective_costs({}, profile="polling-agent"))
    assert polling["cycles_vm_event_sync"] == 15000 * sync_events
    assert polling["cycles_monitor_callback"] == 0


# =========================================================================== more edge cases
def test_livelock_record_is_the_row_of_the_attempt_not_the_arriving_row(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "e"

        [[view]]
        name = "d"

        [[setup]]
        op = "set_mem_access"
        view = "e"
        gfns = 5
        access = "x"

        [[setup]]
        op = "set_mem_access"
        view = "d"
        gfns = 5
        access = "rw"

        [[setup]]
        op = "switch_p2m"
        view = "d"

        [[on_violation]]
        view = "e"
        action = "switch"
        to = "d"

        [[on_violation]]
        view = "d"
        action = "switch"
        to = "e"
        """,
        ["v0 i1 x 5", "v1 i1 r 7", "v0 i1 r 5"],
    )
    # Setup: e and d each prepopulate the host's 2M [0,511] and split it for gfn 5
    #   (setup_splits 2): e[5] x, d[5] rw, the other pieces rwx. Every vCPU in d.
    # row0 (v0) x 5 in d: viol_x, exit(d), event, switch to e (svm) -> restart 1 -> x 5 in e
    #   done(e) (on a pass that will be abandoned).
    # row1 (v1) r 7 in d: 4K rwx piece -> done(d); v1's only pass.
    # row2 (v0) r 5 in e: viol_r, exit(e), event, switch d -> restart 2 -> row0 in d: viol_x,
    #   exit, event, switch e -> restart 3 -> row0 done(e), row2 viol_r -> restart 4 ...
    #   Odd restarts come from row0's attempts in d, even ones from row2's in e. The attempt
    #   that would be restart 65 is row0's (in d): livelock_record 0 (§5: "the row index of
    #   the attempt"); its exit, event and switch count (as in test_scenarios). restarts 64.
    # Violation attempts: 65 (d: restarts 1, 3, .., 65 = 33; e: 2, .., 64 = 32); switches
    #   into e 33, into d 32. records_completed: the livelocked pass (in d since restart 64)
    #   completed nothing; v1's row completed in d (1).
    v0 = {
        "records": 2,
        "instructions": 1,
        "ept_exits": 65,
        "access_violations": 65,
        "mem_access_events": 65,
        "switches_vm_event": 65,
        "restarts": 64,
    }
    v1 = {"records": 1, "instructions": 1, "restarts": 0}
    ll = {"livelocked": 1, "livelock_record": 0}
    check(
        res,
        v0 | {"records": 3, "instructions": 2, "setup_splits": 2} | ll,
        vcpus={0: v0, 1: v1},
        views={
            1: {
                "ept_exits": 32,
                "access_violations": 32,
                "switches_in": 33,
                "pages_mapped": 512,
                "leaves_4k": 512,
            },
            2: {
                "records_completed": 1,
                "ept_exits": 33,
                "access_violations": 33,
                "switches_in": 32,
                "pages_mapped": 512,
                "leaves_4k": 512,
            },
        },
        gfns={(1, 5): {"ept_exits": 32, "viol_r": 32}, (2, 5): {"ept_exits": 33, "viol_x": 33}},
    )


def test_breakpoint_traps_when_a_restart_moves_the_first_fetch_into_the_shadow_view(sim2):
    res = sim2(
        RAM_1K
        + """
        [[view]]
        name = "x"

        [[view]]
        name = "d"
        default_access = "rx"

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
        view = "d"

        [[on_violation]]
        view = "d"
        kind = "w"
        action = "switch"
        to = "x"

        [on_breakpoint]
        action = "emulate"
        """,
        ["i1 x 5@0x10", "i1 w 600"],
    )
    # Setup: change_gfn x 5 -> 1000: x prepopulated with 2M [0,511] and split (setup_splits
    #   1); x[5] maps frame 1000 (rwx). write_breakpoints x: x's leaf at 5 -> the INT3 goes
    #   into frame 1000 at 0x10. d (index 2, rx) maps 5 to its own frame: no INT3.
    # row0 x 5@0x10 in d: exit(d), lazy 4K rx -> restart 1 -> done(d) (frame 5, no INT3).
    # row1 w 600 in d: 600 > mm 5, 2M region above -> exit(d), lazy 2M rx -> restart 2: row0
    #   done(d); row1 viol_w (d,600), exit(d), event -> switch x (svm) -> restart 3 in x:
    #   row0 is again the instruction's first fetch, and x maps frame 1000 -> trap (§5.2):
    #   int3_exits (x,5), breakpoint event -> emulate: the row and the rest of the instruction
    #   (rows 0 and 1) complete unchecked: emulations 1, records_emulated 2. Nothing of the
    #   final pass completed in a walk: records_completed 0 everywhere.
    check(
        res,
        {
            "records": 2,
            "instructions": 1,
            "ept_exits": 3,
            "lazy_copies": 2,
            "lazy_copies_4k": 1,
            "lazy_copies_2m": 1,
            "lazy_copy_pages": 513,
            "access_violations": 1,
            "mem_access_events": 1,
            "switches_vm_event": 1,
            "int3_exits": 1,
            "breakpoint_events": 1,
            "emulations": 1,
            "records_emulated": 2,
            "setup_splits": 1,
        },
        views={
            1: {"int3_exits": 1, "switches_in": 1, "pages_mapped": 512, "leaves_4k": 512},
            2: {
                "ept_exits": 3,
                "lazy_copies": 2,
                "lazy_copy_pages": 513,
                "access_violations": 1,
                "pages_mapped": 513,
                "leaves_4k": 1,
                "leaves_2m": 1,
            },
        },
        gfns={
            (1, 5): {"int3_exits": 1},
            (2, 5): {"ept_exits": 1, "lazy_copies": 1},
            (2, 600): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
        },
    )


def test_host_drop_between_two_remap_targets_resets_the_view(sim2):
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
        op = "change_gfn"
        view = "s"
        old = 6
        new = 1010

        [[setup]]
        op = "switch_p2m"
        view = "s"
        """,
        ["r 5", "drop 1005", "r 5"],
    )
    # Setup: change_gfn 5 -> 1000 prepopulates s with 2M [0,511] and splits it (setup_splits
    #   1); change_gfn 6 -> 1010: s already holds 6 (no prepopulate, no split). The remap
    #   interval widens to [1000, 1010]; mm(s) 511.
    # r 5: done(s).
    # drop 1005: nobody remaps 1005, but it lies in s's remap interval [1000,1010] (§6.5) ->
    #   s is reset (view_resets 1; no sync for a reset). The host's 2M [512,1023] splits
    #   (superpage_splits 1) and 1005 becomes a hole: sync 1, IPI to every vCPU (1). View 0
    #   holds nothing.
    # r 5 in s: empty -> exit(s); 5 <= mm 511, empty root -> hole 18; host 2M -> lazy 2M
    #   [0,511] -> restart -> done(s).
    v0 = {
        "records": 2,
        "instructions": 2,
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
            "view_resets": 1,
            "superpage_splits": 1,
            "ept_syncs": 1,
            "ept_sync_ipis": 1,
            "setup_splits": 1,
        },
        vcpus={0: v0},
        views={
            1: {
                "records_completed": 2,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 512,
                "resets": 1,
                "pages_mapped": 512,
                "leaves_2m": 1,
            }
        },
        gfns={(1, 5): {"ept_exits": 1, "lazy_copies": 1}},
    )


def test_cr3_rules_by_process_name(sim2):
    res = sim2(
        RAM_1K
        + """
        [[view]]
        name = "a"

        [on_cr3]

        [[on_cr3.switch]]
        cr3 = "process:missing"
        to = 0

        [[on_cr3.switch]]
        cr3 = "process:init"
        to = "a"

        [[on_cr3.switch]]
        cr3 = "other"
        to = 0
        """,
        ["cr3 0x1000", "cr3 0x2000", "cr3 0x1000"],
        processes={"init": 0x1000},
    )
    # cr3 0x1000: exit, event 1; "process:missing" matches nothing; "process:init" is 0x1000
    #   -> a (svm 1). cr3 0x2000: exit, event 2; "other" -> view 0 (svm 2). cr3 0x1000: a
    #   change again -> exit, event 3 -> a (svm 3).
    check(
        res,
        {
            "instructions": 3,
            "control_records": 3,
            "cr3_writes": 3,
            "cr3_exits": 3,
            "cr3_events": 3,
            "switches_vm_event": 3,
        },
        views={0: {"switches_in": 1}, 1: {"switches_in": 2}},
        gfns={},
    )


def test_cr3_switch_inside_a_single_stepped_instruction_is_undone_at_its_end(sim2):
    res = sim2(
        RO_VIEW
        + """
        [[view]]
        name = "a"

        [[on_violation]]
        view = "ro"
        kind = "w"
        action = "step"
        to = 0

        [on_cr3]

        [[on_cr3.switch]]
        cr3 = "other"
        to = "a"
        """,
        ["i1 w 5", "i1 cr3 0x1000", "i2 r 5"],
    )
    # ro = index 1 (r), a = index 2. Every vCPU in ro.
    # row0 w 5 in ro: exit(1), lazy 4K r -> restart -> viol_w (1,5), exit(1), event -> step
    #   to 0 (svm 1, single-step on, return ro) -> restart in 0: exit(0), lazy 4K -> restart
    #   -> done(0).
    # row1 cr3: exit, sync cr3 event -> "other" -> a (svm 2); the write completes, no restart.
    # row2 (insn 2): insn 1 ends: MTF exit, single-step event, switch back to the return view
    #   ro (svm 3). r 5 in ro: 4K r -> done(1).
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
            "mtf_exits": 1,
            "switches_vm_event": 3,
            "control_records": 1,
            "cr3_writes": 1,
            "cr3_exits": 1,
            "cr3_events": 1,
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
            0: {
                "records_completed": 1,
                "ept_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "switches_in": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            },
            2: {"switches_in": 1},
        },
        gfns={
            (1, 5): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
            (0, 5): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


@pytest.mark.parametrize("batch_rows", [1, None])
def test_guest_cycles_ignore_the_tsc_of_host_drop_rows(batch_rows):
    from altp2m_replay.engine import simulate_arrays

    arrays = {
        "gfn": np.array([5, 7, 6, 8], dtype=np.uint64),
        "access": np.array([1, 0, 1, 1], dtype=np.uint8),
        "op": np.array([0, 3, 0, 0], dtype=np.uint8),
        "arg": np.zeros(4, dtype=np.uint64),
        "vcpu": np.array([0, 0, 0, 1], dtype=np.uint16),
        "tsc": np.array([1000, 999_999, 2000, 50], dtype=np.uint64),
    }
    res = simulate_arrays(make_policy(RAM_1K), arrays, batch_rows=batch_rows)
    # §2: op 3/4 rows belong to no vCPU, their vcpu is ignored everywhere (no tsc rule).
    # §8: a vCPU's guest cycles = its last tsc minus its first, of the rows processed:
    #   v0: rows 0 and 2 -> 2000 - 1000 = 1000; v1: one row -> 0. No vCPU row for the drop.
    assert res.guest_cycles.get(0) == 1000
    assert res.guest_cycles.get(1, 0) == 0
    assert set(res.vcpus) == {0, 1}


def test_host_superpages_with_access_n_are_holes_to_xens_lookups(sim):
    res = sim(
        """
        [domain]
        altp2m = false
        host_access = "n"
        ram = [[0, 1023]]

        [[on_violation]]
        action = "set-access"
        """,
        ["r 5", "r 6"],
    )
    # §3: the host maps RAM with two 2M leaves of access n. "Xen's own lookups do not see a
    #   2 MiB or 1 GiB leaf whose bits permit nothing ... in any p2m, the host's included";
    #   for every lookup (the effective entry ...) it is an empty slot. So the host does
    #   not map 5 as RAM for §5.6 (as in Xen: get_entry gives an invalid mfn, the
    #   mem_access check is skipped, the fault is handled as MMIO).
    # r 5: the hardware walk faults: exit(0) -> hole -> MMIO. r 6: same.
    check(
        res,
        {"records": 2, "instructions": 2, "ept_exits": 2, "mmio_accesses": 2},
        views={0: {"ept_exits": 2, "pages_mapped": 1024, "leaves_2m": 2}},
        gfns={(0, 5): {"ept_exits": 1}, (0, 6): {"ept_exits": 1}},
    )


def test_fast_step_then_a_non_fast_step_toggles_single_step_off(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "a"
        default_access = "r"

        [[view]]
        name = "b"
        default_access = "rx"

        [[setup]]
        op = "switch_p2m"
        view = "a"

        [[on_violation]]
        view = "a"
        action = "step"
        to = "b"
        fast = true

        [[on_violation]]
        view = "b"
        action = "step"
        to = 0
        """,
        ["i1 w 5", "i2 r 5"],
    )
    # row0 w 5 in a: exit(1), lazy 4K r -> restart 1 -> viol_w, exit(1), event -> fast step
    #   to b (svm 1; single-step on, fast, return a) -> restart 2 in b: exit(2), lazy 4K rx
    #   -> restart 3 -> viol_w, exit(2), event -> non-fast step while single-stepping
    #   (§6.1 TOGGLE_SINGLESTEP, whatever the first step's flag): switch to 0 (svm 2),
    #   single-step off -> restart 4 in 0: exit(0), lazy 4K -> restart 5 -> done(0).
    # row1 (insn 2): insn 1 ends with single-step off: no MTF, no switch back; r 5 done(0).
    check(
        res,
        {
            "records": 2,
            "instructions": 2,
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
            (1, 5): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
            (2, 5): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
            (0, 5): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


def test_breakpoint_step_while_single_stepping_toggles_it_off(sim2):
    res = sim2(
        RAM_1K
        + """
        [[view]]
        name = "x"

        [[view]]
        name = "d"
        default_access = "rx"

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
        view = "d"

        [[on_violation]]
        view = "d"
        kind = "w"
        action = "step"
        to = "x"

        [on_breakpoint]
        action = "step"
        to = 0
        """,
        ["i1 x 5@0x10", "i1 w 600"],
    )
    # Setup as in the shadow-view test: x[5] -> frame 1000 holding the INT3 (setup_splits 1).
    # row0 in d: exit(d), lazy 4K rx -> restart 1 -> done(d) (frame 5).
    # row1 w 600 in d: exit(d), lazy 2M rx -> restart 2: row0 done(d); row1 viol_w, exit(d),
    #   event -> step (non-fast) to x (svm 1; single-step on, return d) -> restart 3 in x:
    #   row0, the first fetch, maps frame 1000 -> trap: int3 (x,5), breakpoint event ->
    #   step to 0 "as §6.1 step": already single-stepping, non-fast -> switch to 0 (svm 2),
    #   single-step off -> restart 4 in 0: row0: exit(0), lazy 4K (5 > mm 0) -> restart 5
    #   -> done(0); row1: 600 > mm 5, 2M region above -> exit(0), lazy 2M -> restart 6 ->
    #   rows 0 and 1 done(0).
    # End of trace: single-step is off: no MTF, no single-step event, no switch back.
    check(
        res,
        {
            "records": 2,
            "instructions": 1,
            "ept_exits": 5,
            "lazy_copies": 4,
            "lazy_copies_4k": 2,
            "lazy_copies_2m": 2,
            "lazy_copy_pages": 1026,
            "access_violations": 1,
            "mem_access_events": 1,
            "int3_exits": 1,
            "breakpoint_events": 1,
            "switches_vm_event": 2,
            "setup_splits": 1,
        },
        views={
            1: {"int3_exits": 1, "switches_in": 1, "pages_mapped": 512, "leaves_4k": 512},
            2: {
                "ept_exits": 3,
                "lazy_copies": 2,
                "lazy_copy_pages": 513,
                "access_violations": 1,
                "pages_mapped": 513,
                "leaves_4k": 1,
                "leaves_2m": 1,
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
            (2, 5): {"ept_exits": 1, "lazy_copies": 1},
            (2, 600): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
            (1, 5): {"int3_exits": 1},
            (0, 5): {"ept_exits": 1, "lazy_copies": 1},
            (0, 600): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


def test_mmio_row_of_a_restarted_instruction_counts_at_every_attempt(sim):
    res = sim(RAM_1K, ["i1 r 2000", "i1 r 5"])
    # row0 r 2000: exit(0), hole -> MMIO 1, completes (not a records_completed row).
    # row1 r 5: exit(0), lazy 4K -> restart -> row0 again: exit(0), MMIO 2 (every attempt
    #   counts, §5); row1 done(0).
    check(
        res,
        {
            "records": 2,
            "instructions": 1,
            "ept_exits": 3,
            "mmio_accesses": 2,
            "lazy_copies": 1,
            "lazy_copies_4k": 1,
            "lazy_copy_pages": 1,
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


def test_default_ram_reaches_a_host_map_row_and_the_map_splits_a_1g_host_page(sim2):
    g = 1 << 18
    res = sim2("", ["r 5", f"map {g}", f"r {g + 1}"])
    # §3 default RAM: [0, 0x9f] and [0xc0, align_up(max_gfn + 1, 2^18) - 1], max_gfn over
    #   access rows AND op 3/4 rows: 2^18 + 1 -> [0xc0, 2^19 - 1]. origin "create": host
    #   order 18: [2^18, 2^19-1] is one 1G leaf; the first 2 MiB (VGA hole) are 4K pages.
    # r 5: view 0 fresh, 5 > mm 0, regions at 0 -> hole 0 -> exit(0), lazy 4K -> done(0).
    # map 2^18 (already RAM): a 4K host write into the 1G leaf: split down to 4K
    #   (superpage_splits 513), the entry permitted rwx -> sync 1, IPI to every vCPU (1).
    #   View 0 holds nothing there.
    # r 2^18+1: > mm 5, 1G region above mm -> hole 18, host order now 0 -> lazy 4K -> done.
    v0 = {
        "records": 2,
        "instructions": 2,
        "ept_exits": 2,
        "lazy_copies": 2,
        "lazy_copies_4k": 2,
        "lazy_copy_pages": 2,
    }
    check(
        res,
        v0
        | {
            "control_records": 1,
            "host_maps": 1,
            "superpage_splits": 513,
            "ept_syncs": 1,
            "ept_sync_ipis": 1,
        },
        vcpus={0: v0},
        views={
            0: {
                "records_completed": 2,
                "ept_exits": 2,
                "lazy_copies": 2,
                "lazy_copy_pages": 2,
                "pages_mapped": 2,
                "leaves_4k": 2,
            }
        },
        gfns={
            (0, 5): {"ept_exits": 1, "lazy_copies": 1},
            (0, g + 1): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


def test_change_gfn_in_view0_breakpoints_and_a_drop_that_resets_view0(sim2):
    res = sim2(
        RAM_1K
        + """
        [[view]]
        name = "y"

        [breakpoints]
        at = 0x5010

        [[setup]]
        op = "change_gfn"
        view = 0
        old = 5
        new = 1000

        [[setup]]
        op = "write_breakpoints"
        view = 0

        [[setup]]
        op = "enable_notify"

        [on_breakpoint]
        action = "emulate"
        """,
        ["x 5@0x10", "vmfunc 1", "x 5@0x10", "drop 1000", "vmfunc 0", "x 5@0x10"],
    )
    # Setup: change_gfn in view 0 (a view like the others, §4): prepopulate view 0 with the
    #   host's 2M [0,511] and rewrite 5 -> frame 1000 (setup_splits 1); view 0's remap
    #   interval [1000,1000], mm 511. write_breakpoints view 0: its own leaf at 5 -> INT3 in
    #   frame 1000 at 0x10.
    # row0 x 5@0x10 in view 0: frame 1000 -> trap: int3 (0,5), breakpoint event -> emulate.
    # row1 vmfunc 1: guest_vmfuncs 1, svf 1.
    # row2 x 5@0x10 in y: exit(1), lazy 4K (frame 5) -> restart -> no INT3 there -> done(1).
    # row3 drop 1000: host 2M [512,1023] splits (superpage_splits 1), 1000 a hole: sync 1,
    #   IPI 1. View 0: 1000 in its remap interval -> reset (view_resets 1). y holds nothing
    #   covering 1000.
    # row4 vmfunc 0: guest_vmfuncs 2, svf 2.
    # row5 x 5@0x10 in view 0: empty, 5 <= mm 511, empty root -> hole 18 -> lazy 2M (frame 5
    #   now) -> restart -> no INT3 -> done(0).
    v0 = {
        "records": 3,
        "instructions": 5,
        "ept_exits": 2,
        "lazy_copies": 2,
        "lazy_copies_4k": 1,
        "lazy_copies_2m": 1,
        "lazy_copy_pages": 513,
        "int3_exits": 1,
        "breakpoint_events": 1,
        "emulations": 1,
        "records_emulated": 1,
        "control_records": 2,
        "guest_vmfuncs": 2,
        "switches_vmfunc": 2,
    }
    check(
        res,
        v0
        | {
            "control_records": 3,
            "host_drops": 1,
            "view_resets": 1,
            "superpage_splits": 1,
            "ept_syncs": 1,
            "ept_sync_ipis": 1,
            "setup_splits": 1,
        },
        vcpus={0: v0},
        views={
            0: {
                "records_completed": 1,
                "ept_exits": 1,
                "int3_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 512,
                "switches_in": 1,
                "resets": 1,
                "pages_mapped": 512,
                "leaves_2m": 1,
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
            (0, 5): {"ept_exits": 1, "lazy_copies": 1, "int3_exits": 1},
            (1, 5): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


def test_propagation_keeps_the_views_suppress_ve_bit(sim):
    res = sim(
        RAM_1K
        + """
        [[view]]
        name = "w"

        [[setup]]
        op = "set_suppress_ve"
        view = "w"
        gfns = 5
        suppress = false

        [[setup]]
        op = "set_mem_access"
        view = 0
        gfns = 5
        access = "r"

        [[setup]]
        op = "enable_notify"

        [[setup]]
        op = "switch_p2m"
        view = "w"

        [on_ve]
        action = "emulate"
        """,
        ["w 5", "r 5"],
    )
    # Setup: w[5] = 4K rwx, suppress-VE 0 (no prepopulate). View-0 set_mem_access 5 r: the
    #   host's 2M [0,511] splits (setup_splits 1), host[5] = r; propagation: view 0 holds
    #   nothing; w holds a valid leaf at 5 -> w[5] = host's values (r), keeping w's bit 0.
    # w 5 in w: leaf r forbids w -> #VE enabled, not busy, bit 0 -> #VE (w,5); the agent
    #   emulates: ve_emulations 1, records_emulated 1. No exit.
    # r 5 (next instruction, busy cleared): r permitted -> done(w).
    check(
        res,
        {
            "records": 2,
            "instructions": 2,
            "ve_delivered": 1,
            "ve_emulations": 1,
            "records_emulated": 1,
            "setup_splits": 1,
        },
        views={1: {"records_completed": 1, "ve_delivered": 1, "pages_mapped": 1, "leaves_4k": 1}},
        gfns={(1, 5): {"ve_delivered": 1}},
    )


POP_RESET = (
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
"""
)


@pytest.mark.parametrize("batch_rows", [1, None])
def test_population_curve_ends_at_the_views_pages_mapped_after_a_reset(batch_rows):
    from altp2m_replay.engine import simulate_arrays

    res = simulate_arrays(
        make_policy(POP_RESET),
        make_trace2("r 5", "drop 1000", "r 5"),
        window=1,
        batch_rows=batch_rows,
    )
    # s after setup: the prepopulated 2M [0,511], split: 512 pages. Window 0 (r 5): 512.
    # Window 1 (drop 1000 in s's remap interval): s is reset -> every entry gone: 0 pages.
    # Window 2 (r 5): lazy 2M [0,511] -> 512 pages, the by_view pages_mapped at the end
    # (§7). The population table's column is pages_mapped per window (SPEC §10: the
    # lazy-population curve per view). Engine: [512, 512, 1024].
    assert res.views[1]["pages_mapped"] == 512
    assert list(res.population[1]) == [512, 0, 512]


def test_population_curve_of_an_invisible_superpage_livelock():
    from altp2m_replay.engine import simulate_arrays

    res = simulate_arrays(
        make_policy(
            RAM_1K
            + """
            [[view]]
            name = "nv"
            default_access = "n"

            [[setup]]
            op = "switch_p2m"
            view = "nv"

            [[on_violation]]
            action = "emulate"
            """
        ),
        make_trace("r 600"),
    )
    # r 600 in nv: 2M region above mm -> lazy 2M with access n: invisible to Xen's lookups
    #   (§3), so every attempt copies it again: 65 copies, livelock at the 65th restart.
    #   The view ends with one 2M leaf (it counts in pages_mapped, §3): 512 pages - and so
    #   must the last point of its population curve (engine: 65 x 512).
    assert res.total["lazy_copies"] == 65
    assert res.total["livelocked"] == 1
    assert res.views[1]["pages_mapped"] == 512
    assert int(res.population[1][-1]) == 512


def test_a_host_drop_row_neither_ends_nor_joins_the_vcpus_instruction(sim2):
    res = sim2(
        RO_VIEW
        + """
        [[on_violation]]
        kind = "w"
        action = "step"
        to = 0
        """,
        ["v0 i1 w 5", "v0 i9 drop 700", "v0 i1 r 600", "v0 i2 r 6"],
    )
    # §2: op 3/4 rows belong to no instruction and no vCPU (their vcpu, and here their insn,
    #   are ignored): the drop row does not end v0's insn 1, and a restart of insn 1 does
    #   not execute it again.
    # row0 w 5 in ro: exit(1), lazy 4K r -> restart -> viol_w, exit(1), event -> step to 0
    #   (svm 1, single-step on, return ro) -> restart: exit(0), lazy 4K -> restart -> done(0).
    # row1 drop 700: host 2M [512,1023] splits (superpage_splits 1), 700 a hole: sync 1, IPI
    #   1. No view holds 700.
    # row2 r 600, still insn 1, still in view 0: 600 > mm 5, 2M region above -> hole 9; the
    #   host maps 600 with a 4K piece now -> lazy 4K -> restart -> rows 0, 2 done(0).
    # row3 (insn 2): insn 1 ends: MTF, single-step event, back to ro (svm 2). r 6 in ro:
    #   6 > mm 5 -> exit(1), lazy 4K r -> restart -> done(1).
    v0 = {
        "records": 3,
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
    }
    check(
        res,
        v0
        | {
            "control_records": 1,
            "host_drops": 1,
            "superpage_splits": 1,
            "ept_syncs": 1,
            "ept_sync_ipis": 1,
        },
        vcpus={0: v0},
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
            (1, 5): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
            (0, 5): {"ept_exits": 1, "lazy_copies": 1},
            (0, 600): {"ept_exits": 1, "lazy_copies": 1},
            (1, 6): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


def test_timeline_default_window_counts_control_rows():
    from altp2m_replay.engine import simulate_arrays

    rows = ["r 5"] * 511 + ["cr3 1", "cr3 2"]
    res = simulate_arrays(make_policy(RAM_1K), make_trace2(*rows))
    # §7: window = ceil(trace rows / 256) = ceil(513 / 256) = 3 (control rows are trace rows);
    # 171 windows starting at rows 0, 3, 6, ...
    assert res.window == 3
    tl = res.timeline
    assert len(tl["window"]) == 171
    assert list(tl["first_record"][:3]) == [0, 3, 6]
    assert int(tl["ept_exits"][0]) == 1
    assert int(sum(tl["ept_exits"])) == 1


def test_an_instruction_starting_with_a_control_row_has_no_byte_address(sim2):
    res = sim2(
        RAM_1K
        + """
        [breakpoints]
        at = 0x5010

        [[setup]]
        op = "write_breakpoints"
        view = 0

        [on_breakpoint]
        action = "emulate"
        """,
        ["i1 vmfunc 0", "i1 x 5@0x10"],
    )
    # §2: an instruction's byte address is its FIRST row's address when that row is a fetch;
    #   here the first row is a VMFUNC control row -> no byte address -> no trap (§5.2).
    # row0 vmfunc 0: #VE/VMFUNC not enabled -> exit + #UD (vmfunc_exits 1); no restart.
    # row1 x 5@0x10: exit(0), lazy 4K -> restart: the VMFUNC again (vmfunc_exits 2), then the
    #   fetch completes (it is not the first row) -> done(0).
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
            "vmfunc_exits": 2,
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


def test_executed_ips_top_breakpoints_rank_by_instruction_starts(sim2):
    res = sim2(
        RAM_1K
        + """
        [breakpoints]
        at = { set = "executed_ips", top = 2 }

        [[setup]]
        op = "write_breakpoints"
        view = 0

        [on_breakpoint]
        action = "emulate"
        """,
        ["x 5@0x10", "x 6@0x20", "x 7@0x0", "x 6@0x20", "x 5@0x10", "x 7@0x0", "x 6@0x20"],
    )
    # §4: instruction starts: 0x6020 x3, 0x5010 x2, 0x7000 x2 -> top 2 = 0x6020, then the tie
    #   0x5010 / 0x7000 goes to the lower byte address 0x5010. INT3s in the host frames.
    # row0 x 5@0x10: exit(0), lazy 4K -> restart -> trap (int3, event, emulate).
    # row1 x 6@0x20: exit(0), lazy 4K -> trap. row2 x 7: exit(0), lazy 4K -> done(0).
    # rows 3, 4, 6 trap (leaves present, no exit); row 5 done(0).
    check(
        res,
        {
            "records": 7,
            "instructions": 7,
            "ept_exits": 3,
            "lazy_copies": 3,
            "lazy_copies_4k": 3,
            "lazy_copy_pages": 3,
            "int3_exits": 5,
            "breakpoint_events": 5,
            "emulations": 5,
            "records_emulated": 5,
        },
        views={
            0: {
                "records_completed": 2,
                "ept_exits": 3,
                "int3_exits": 5,
                "lazy_copies": 3,
                "lazy_copy_pages": 3,
                "pages_mapped": 3,
                "leaves_4k": 3,
            }
        },
        gfns={
            (0, 5): {"ept_exits": 1, "lazy_copies": 1, "int3_exits": 2},
            (0, 6): {"ept_exits": 1, "lazy_copies": 1, "int3_exits": 3},
            (0, 7): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


def test_slowdown_uses_the_tsc_of_rows_processed_before_a_crash():
    from altp2m_replay.engine import simulate_arrays
    from altp2m_replay.results import cell_tables

    policy = make_policy(
        """
        [domain]
        altp2m = false
        monitor = false
        ram = [[0, 1023]]

        [[setup]]
        op = "set_mem_access"
        view = 0
        gfns = 6
        access = "r"
        """
    )
    arrays = {
        "gfn": np.array([5, 6, 7], dtype=np.uint64),
        "access": np.array([1, 2, 1], dtype=np.uint8),
        "tsc": np.array([100, 300, 10_000], dtype=np.uint64),
    }
    res = simulate_arrays(policy, arrays)
    summary = cell_tables("t", policy, res, effective_costs({}))["summary"]
    # row0 r 5: done. row1 w 6: exit, viol_w, no monitor -> crash at row 1; row 2 is never
    # processed. §8: guest cycles = last tsc - first tsc of the rows processed = 300 - 100
    # = 200; cycles_total = one ept_exit = 5000; slowdown = (200 + 5000) / 200 = 26.
    total = summary.filter(summary["vcpu"] == -1).row(0, named=True)
    assert total["crashed"] == 1
    assert total["cycles_total"] == 5000
    assert total["slowdown"] == pytest.approx(26.0)


def test_rx2rw_in_view0_rewrites_view0_not_the_host(sim2):
    res = sim2(
        """
        [domain]
        ram = [[0, 1023]]
        host_access = "rx2rw"

        [[view]]
        name = "o"

        [[setup]]
        op = "set_mem_access"
        view = "o"
        gfns = 5
        access = "rx2rw"

        [[setup]]
        op = "enable_notify"
        """,
        ["w 5", "vmfunc 1", "w 5"],
    )
    # Host: two 2M leaves rx2rw; view 0 and o default to the host access (rx2rw).
    # Setup: set_mem_access o 5: prepopulate o with 2M [0,511] (view default rx2rw), rewrite
    #   5 as 4K rx2rw: split (setup_splits 1).
    # row0 w 5 in view 0: fresh -> exit(0), lazy 4K rx2rw -> restart -> viol_w (counts as rx)
    #   -> §5.7 rx2rw: the entry of V (view 0's own table, as Xen's mem_access check writes
    #   the altp2m in use; only set-access is Xen's view-0 set_mem_access on the host) is
    #   rewritten 4K rw: access_changes 1; it permitted r/x -> ept_sync 1 (view 0 only; no
    #   host write, no propagation to o, no split) -> restart -> done(0).
    # row1 vmfunc 1: guest_vmfuncs 1, svf 1.
    # row2 w 5 in o: o's own leaf is still rx2rw -> exit(1), viol_w, rewrite 4K rw (already
    #   4K), access_changes 2, sync 2 -> restart -> done(1).
    check(
        res,
        {
            "records": 2,
            "instructions": 3,
            "ept_exits": 3,
            "lazy_copies": 1,
            "lazy_copies_4k": 1,
            "lazy_copy_pages": 1,
            "access_violations": 2,
            "access_changes": 2,
            "ept_syncs": 2,
            "control_records": 1,
            "guest_vmfuncs": 1,
            "switches_vmfunc": 1,
            "restarts": 3,
            "setup_splits": 1,
        },
        views={
            0: {
                "records_completed": 1,
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
                "access_violations": 1,
                "switches_in": 1,
                "pages_mapped": 512,
                "leaves_4k": 512,
            },
        },
        gfns={
            (0, 5): {"ept_exits": 2, "lazy_copies": 1, "viol_w": 1},
            (1, 5): {"ept_exits": 1, "viol_w": 1},
        },
    )


def test_ipis_count_the_traces_vcpus_not_the_highest_number(sim2):
    res = sim2(
        """
        [domain]
        altp2m = false
        host_access = "rx"
        ram = [[0, 1023]]

        [[on_violation]]
        action = "set-access"
        """,
        ["v0 w 5", "v7 r 6", "v9 drop 900"],
    )
    # vCPUs of the trace: 0 and 7 (the drop row's vcpu 9 is ignored, §2).
    # v0 w 5: host 2M rx -> exit(0), viol_w, event, set-access rwx: the host's 2M [0,511]
    #   splits (superpage_splits 1), 5 rewritten: sync 1, IPIs to the other vCPUs: 1 (v7)
    #   -> restart -> done(0).
    # v7 r 6: rx piece -> done(0).
    # drop 900: host 2M [512,1023] splits (superpage_splits 2), 900 removed (it permitted
    #   r/x): sync 2, IPIs to every vCPU of the trace: +2 -> 3.
    # Host at the end: 1024 - 1 pages, all 4K leaves.
    v0 = {
        "records": 1,
        "instructions": 1,
        "ept_exits": 1,
        "access_violations": 1,
        "mem_access_events": 1,
        "access_changes": 1,
        "superpage_splits": 1,
        "ept_syncs": 1,
        "ept_sync_ipis": 1,
    }
    v7 = {"records": 1, "instructions": 1}
    check(
        res,
        v0
        | {
            "records": 2,
            "instructions": 2,
            "superpage_splits": 2,
            "ept_syncs": 2,
            "ept_sync_ipis": 3,
            "control_records": 1,
            "host_drops": 1,
        },
        vcpus={0: v0, 7: v7},
        views={
            0: {
                "records_completed": 2,
                "ept_exits": 1,
                "access_violations": 1,
                "pages_mapped": 1023,
                "leaves_4k": 1023,
            }
        },
        gfns={(0, 5): {"ept_exits": 1, "viol_w": 1}},
    )


def test_the_restart_budget_is_per_instruction(sim):
    rows = [f"i1 r {g}" for g in range(1, 41)] + [f"i2 r {g}" for g in range(41, 81)]
    res = sim(RAM_1K, rows)
    # Each row reads a fresh gfn g > mm = g - 1 in view 0 (regions at 0 -> hole 0): one exit,
    # one 4K lazy copy, one restart. Insn 1: 40 restarts, insn 2: 40 more - 80 in all, but
    # never more than 64 for one instruction (§5): no livelock.
    check(
        res,
        {
            "records": 80,
            "instructions": 2,
            "ept_exits": 80,
            "lazy_copies": 80,
            "lazy_copies_4k": 80,
            "lazy_copy_pages": 80,
        },
        views={
            0: {
                "records_completed": 80,
                "ept_exits": 80,
                "lazy_copies": 80,
                "lazy_copy_pages": 80,
                "pages_mapped": 80,
                "leaves_4k": 80,
            }
        },
        gfns={(0, g): {"ept_exits": 1, "lazy_copies": 1} for g in range(1, 81)},
    )


def test_step_into_the_current_view_toggles_until_livelock(sim):
    res = sim(
        """
        [domain]
        ram = [[0, 1023]]
        host_access = "rx"

        [[on_violation]]
        kind = "w"
        action = "step"
        """,
        ["w 5"],
    )
    # View 0's default access is the host's (rx). A1: exit(0), lazy 4K rx -> restart 1.
    # A2: viol_w, exit, event -> step to 0 (the default `to`): no switch (already there),
    #   single-step on -> restart 2. A3: viol_w, event -> a non-fast step while stepping
    #   toggles single-step off (§6.1) -> restart 3. A4: on again ... A65 would be restart
    #   65: livelock at row 0, its exit and event counted. No switch ever counts (§5: only
    #   actual view changes), and the instruction never ends: no MTF.
    check(
        res,
        {
            "records": 1,
            "instructions": 1,
            "ept_exits": 65,
            "lazy_copies": 1,
            "lazy_copies_4k": 1,
            "lazy_copy_pages": 1,
            "access_violations": 64,
            "mem_access_events": 64,
            "restarts": 64,
            "livelocked": 1,
            "livelock_record": 0,
        },
        views={
            0: {
                "ept_exits": 65,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "access_violations": 64,
                "pages_mapped": 1,
                "leaves_4k": 1,
            }
        },
        gfns={(0, 5): {"ept_exits": 65, "lazy_copies": 1, "viol_w": 64}},
    )


def test_symbol_pattern_breakpoints(sim_arrays):
    ips = [0xFFFFFFFF81000010, 0xFFFFFFFF81001020, 0xFFFFFFFF81002030]
    arrays = {
        "gfn": np.array([5, 6, 7, 5], dtype=np.uint64),
        "access": np.array([4, 4, 4, 4], dtype=np.uint8),
        "ip": np.array([ips[0], ips[1], ips[2], ips[0]], dtype=np.uint64),
    }
    res = sim_arrays(
        RAM_1K
        + """
        [breakpoints]
        at = { symbol = ["__x64_sys_*"] }

        [[setup]]
        op = "write_breakpoints"
        view = 0

        [on_breakpoint]
        action = "emulate"
        """,
        [arrays],
        symbols={"__x64_sys_read": ips[0], "__x64_sys_write": ips[1], "schedule": ips[2]},
    )
    # §4: the pattern matches read and write -> their ips -> byte addresses of the first
    #   instructions starting there: 0x5010 and 0x6020 (gfn << 12 | ip & 0xfff). schedule's
    #   0x7030 is not a breakpoint.
    # row0 x 5: exit(0), lazy 4K -> restart -> trap. row1 x 6: exit, lazy 4K -> trap.
    # row2 x 7: exit, lazy 4K -> done(0). row3 x 5: trap. Each trap: int3, event, emulate.
    check(
        res,
        {
            "records": 4,
            "instructions": 4,
            "ept_exits": 3,
            "lazy_copies": 3,
            "lazy_copies_4k": 3,
            "lazy_copy_pages": 3,
            "int3_exits": 3,
            "breakpoint_events": 3,
            "emulations": 3,
            "records_emulated": 3,
        },
        views={
            0: {
                "records_completed": 1,
                "ept_exits": 3,
                "int3_exits": 3,
                "lazy_copies": 3,
                "lazy_copy_pages": 3,
                "pages_mapped": 3,
                "leaves_4k": 3,
            }
        },
        gfns={
            (0, 5): {"ept_exits": 1, "lazy_copies": 1, "int3_exits": 2},
            (0, 6): {"ept_exits": 1, "lazy_copies": 1, "int3_exits": 1},
            (0, 7): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


# The gfn of an op 1/2 row is ignored (§2): it must not stretch the default RAM (§3).
IGNORED_GFN_ROWS = {
    "gfn": np.array([5, (1 << 18) + 10], dtype=np.uint64),
    "access": np.array([1, 0], dtype=np.uint8),
    "op": np.array([0, 2], dtype=np.uint8),
    "arg": np.array([0, 0x1000], dtype=np.uint64),
}
IGNORED_GFN_POLICY = """
[[setup]]
op = "set_mem_access"
view = 0
gfns = 0x40003
access = "r"

[[on_violation]]
action = "emulate"
"""


def test_default_ram_ignores_the_gfn_of_a_cr3_row(sim_arrays):
    res = sim_arrays(IGNORED_GFN_POLICY, [IGNORED_GFN_ROWS])
    # §3: max_gfn_in_trace is over access rows and op 3/4 rows: 5 -> RAM [0, 0x9f] and
    #   [0xc0, 2^18 - 1]. gfn 0x40003 is not RAM: the view-0 set_mem_access skips it
    #   (setup_skipped 1, no split). (Counting the CR3 row's ignored gfn 2^18 + 10 would
    #   make it RAM, split a 1G host page: setup_splits 513.)
    # r 5: view 0 fresh -> exit(0), lazy 4K (host 4K around the VGA hole) -> done(0).
    # cr3 row: no [on_cr3]: cr3_writes 1 only.
    check(
        res,
        {
            "records": 1,
            "instructions": 2,
            "ept_exits": 1,
            "lazy_copies": 1,
            "lazy_copies_4k": 1,
            "lazy_copy_pages": 1,
            "control_records": 1,
            "cr3_writes": 1,
            "setup_skipped": 1,
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


def test_default_ram_ignores_the_gfn_of_a_cr3_row_through_the_cli(tmp_path):
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from altp2m_replay.cli import main

    cols = {
        "gfn": pa.array(IGNORED_GFN_ROWS["gfn"], pa.uint64()),
        "access": pa.array(IGNORED_GFN_ROWS["access"], pa.uint8()),
        "op": pa.array(IGNORED_GFN_ROWS["op"], pa.uint8()),
        "arg": pa.array(IGNORED_GFN_ROWS["arg"], pa.uint64()),
    }
    trace = tmp_path / "t.parquet"
    pq.write_table(pa.table(cols), trace)
    policy = tmp_path / "p.toml"
    policy.write_text('name = "ign"\n' + IGNORED_GFN_POLICY)
    out = tmp_path / "out"
    r = CliRunner().invoke(
        main, ["replay", str(trace), "-p", str(policy), "-o", str(out), "--no-html", "--jobs", "1"]
    )
    assert r.exit_code == 0, r.output
    summary = pl.read_parquet(out / "summary.parquet")
    total = summary.filter(pl.col("vcpu") == -1).row(0, named=True)
    # Same derivation as the test above.
    assert total["setup_skipped"] == 1
    assert total["setup_splits"] == 0
    assert total["ept_exits"] == 1
    assert total["lazy_copies_4k"] == 1


def test_a_view_remapping_another_gfn_onto_the_breakpoint_frame_traps_there(sim2):
    res = sim2(
        RAM_1K
        + """
        [[view]]
        name = "y"

        [breakpoints]
        at = 0x5010

        [[setup]]
        op = "write_breakpoints"
        view = 0

        [[setup]]
        op = "change_gfn"
        view = "y"
        old = 9
        new = 5

        [[setup]]
        op = "switch_p2m"
        view = "y"

        [on_breakpoint]
        action = "emulate"
        """,
        ["x 9@0x10", "x 9@0x20", "x 5@0x10"],
    )
    # Setup: write_breakpoints view 0 (nothing held: the host's frame of gfn 5 gets the INT3
    #   at 0x10). change_gfn y 9 -> 5: prepopulate y with 2M [0,511], rewrite 9 as 4K with
    #   frame 5 (setup_splits 1).
    # §4: "every view that maps that frame - at any gfn - executes the INT3 at that offset".
    # row0 x 9@0x10 in y: y[9] maps frame 5, offset 0x10 -> trap: int3 (y, 9), event, emulate.
    # row1 x 9@0x20: no INT3 at 0x20 -> done(y).
    # row2 x 5@0x10: y[5] (prepopulated piece) maps frame 5 -> trap: int3 (y, 5).
    check(
        res,
        {
            "records": 3,
            "instructions": 3,
            "int3_exits": 2,
            "breakpoint_events": 2,
            "emulations": 2,
            "records_emulated": 2,
            "setup_splits": 1,
        },
        views={1: {"records_completed": 1, "int3_exits": 2, "pages_mapped": 512, "leaves_4k": 512}},
        gfns={(1, 9): {"int3_exits": 1}, (1, 5): {"int3_exits": 1}},
    )


def test_access_kind_of_combined_bits(sim):
    res = sim(
        RO_VIEW
        + """
        [[on_violation]]
        kind = "r"
        action = "switch"
        to = 0

        [[on_violation]]
        action = "emulate"
        """,
        ["rw 5", "rx 6"],
    )
    # §2: the kind is x if bit 4 is set, else w if bit 2, else r.
    # rw 5 in ro: exit(1), lazy 4K r -> restart -> kind w, r forbids it: viol_w (1,5), exit,
    #   event; the kind-r rule does not match -> emulate.
    # rx 6 in ro: exit(1), lazy 4K r -> restart -> kind x: viol_x (1,6), exit -> emulate.
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
            (1, 6): {"ept_exits": 2, "lazy_copies": 1, "viol_x": 1},
        },
    )


@pytest.mark.parametrize("fast", ["true", "false"])
def test_switch_back_at_instruction_end_counts_only_a_change(sim2, fast):
    res = sim2(
        RAM_1K
        + f"""
        [[view]]
        name = "a"
        default_access = "r"

        [[setup]]
        op = "switch_p2m"
        view = "a"

        [[setup]]
        op = "enable_notify"

        [[on_violation]]
        kind = "w"
        action = "step"
        fast = {fast}
        """,
        ["i1 w 5", "i1 vmfunc 1", "i2 r 5"],
    )
    # row0 w 5 in a: exit(1), lazy 4K r -> restart -> viol_w, exit(1), event -> step to 0
    #   (svm 1; single-step on, return a) -> restart in 0: exit(0), lazy 4K -> restart ->
    #   done(0).
    # row1 guest VMFUNC to a (enabled, visible): guest_vmfuncs 1, svf 1.
    # row2 (insn 2): insn 1 ends: MTF exit; the switch back to a (by Xen when fast, else by
    #   the single-step event's response) finds the vCPU in a already: no switch counted
    #   (§5: only actual changes). Not fast: one single-step event. r 5 in a -> done(1).
    extra = {} if fast == "true" else {"singlestep_events": 1}
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
            "switches_vm_event": 1,
            "mtf_exits": 1,
            "control_records": 1,
            "guest_vmfuncs": 1,
            "switches_vmfunc": 1,
            "restarts": 3,
        }
        | extra,
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
            (0, 5): {"ept_exits": 1, "lazy_copies": 1},
        },
    )


def test_byte_address_prefers_gpa_over_ip(sim_arrays):
    arrays = {
        "gpa": np.array([0x5010, 0x5020], dtype=np.uint64),
        "access": np.array([4, 4], dtype=np.uint8),
        "ip": np.array([0xFFFFFFFF81000020, 0xFFFFFFFF81000010], dtype=np.uint64),
    }
    res = sim_arrays(
        RAM_1K
        + """
        [breakpoints]
        at = 0x5010

        [[setup]]
        op = "write_breakpoints"
        view = 0

        [on_breakpoint]
        action = "emulate"
        """,
        [arrays],
    )
    # §2: the byte address is gpa when the trace has it (ip only without gpa): row0 is at
    #   0x5010 (its ip's low bits say 0x020), row1 at 0x5020.
    # row0: exit(0), lazy 4K -> restart -> trap: int3, event, emulate. row1: done(0).
    check(
        res,
        {
            "records": 2,
            "instructions": 2,
            "ept_exits": 1,
            "lazy_copies": 1,
            "lazy_copies_4k": 1,
            "lazy_copy_pages": 1,
            "int3_exits": 1,
            "breakpoint_events": 1,
            "emulations": 1,
            "records_emulated": 1,
        },
        views={
            0: {
                "records_completed": 1,
                "ept_exits": 1,
                "int3_exits": 1,
                "lazy_copies": 1,
                "lazy_copy_pages": 1,
                "pages_mapped": 1,
                "leaves_4k": 1,
            }
        },
        gfns={(0, 5): {"ept_exits": 1, "lazy_copies": 1, "int3_exits": 1}},
    )


def test_policy_check_needs_no_rule_for_a_restriction_lost_at_the_lazy_copy(tmp_path):
    from click.testing import CliRunner

    from altp2m_replay.cli import main

    # §4: with altp2m on (xen 4.22), a view-0 set_mem_access on a gfn view 0 has not copied
    # yet is lost at the lazy copy (view 0 copies with its default access rwx), and `policy
    # check` warns about it. No view is declared and nothing else restricts anything, so the
    # policy can cause no violation: §6.1 asks for rules matching "every violation it can
    # cause" - there is none, so the check passes (exit 0, with the warning).
    policy = tmp_path / "lost.toml"
    policy.write_text(
        'name = "lost"\n[domain]\nram = [[0, 1023]]\n\n'
        '[[setup]]\nop = "set_mem_access"\nview = 0\ngfns = 5\naccess = "r"\n'
    )
    r = CliRunner().invoke(main, ["policy", "check", str(policy)])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("batch_rows", [100, None])
def test_a_control_row_counts_towards_the_1024_row_limit(batch_rows):
    from altp2m_replay.engine import simulate_arrays
    from altp2m_replay.errors import TraceError

    # §2: an op 1/2 row belongs to its vCPU's instruction and counts towards the 1024-row
    # limit: 1023 reads of gfn 5 then a CR3 write (row 1023, the 1024th row: still fine) and
    # one more read (row 1024, the 1025th row): the error names row 1024.
    n = 1025
    op = np.zeros(n, np.uint8)
    op[1023] = 2
    access = np.ones(n, np.uint8)
    access[1023] = 0
    arrays = {
        "gfn": np.full(n, 5, np.uint64),
        "access": access,
        "op": op,
        "arg": np.zeros(n, np.uint64),
        "insn": np.full(n, 7, np.uint64),
    }
    with pytest.raises(TraceError, match="row 1024"):
        simulate_arrays(make_policy(RAM_1K), arrays, batch_rows=batch_rows)
