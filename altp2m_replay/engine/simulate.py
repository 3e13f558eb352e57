"""Python driver of the replay engine: build the p2ms, run setup, feed batches, collect counters.

``Replayer`` owns every state array of one trace x policy cell. It checks and prepares
inputs, calls the kernels in ``_kernels`` and grows the node pool or the per-gfn and per-ip
tables when a kernel stops at a row boundary to ask for room. Feeding the same rows in batches of any size
gives identical results, because all state lives in these arrays.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field

import numpy as np

from altp2m_replay import budget
from altp2m_replay.engine import _kernels as K
from altp2m_replay.engine import sizing
from altp2m_replay.errors import PolicyError, ReplayRuntimeError, TraceError
from altp2m_replay.policy import ACCESS_CODES, KIND_CODES, PERMITS, RESPONSE_CODES, VE_CODES, Policy
from altp2m_replay.ranges import (
    expand,
    first_outside,
    intersect_ranges,
    iter_gfn_chunks,
    merge_ranges,
    range_count,
)
from altp2m_replay.schema import (
    COUNTERS,
    DERIVED_COUNTERS,
    GFN_BITS,
    GFN_COUNTERS,
    GFN_LIMIT,
    GFN_MASK,
    RUN_COUNTERS,
    SETUP_COUNTERS,
    VCPU_LIMIT,
    VIEW_COUNTERS,
)
from altp2m_replay.selectors import TraceFacts, facts_from_arrays, needs_insn_stats, resolve_all

# change_gfn pairs and add_ram are applied gfn by gfn from explicit lists; bound them.
MAX_EXPLICIT_GFNS = 1 << 24
# Event-log entries between drains into the per-gfn / per-ip tables (tests shrink it).
LOG_ROWS = K.LOG_ROWS
# Most rows of the per-ip table (24 bytes each): past it, the ips with the fewest events fold
# into one "other" count (SimResult.ip_other).
IP_ROWS = 1 << 20
# Most bytes of the fast-path cache (one per p2m and gfn); gfns past it are walked every time
# (a module global, so tests can shrink it; sizing is told the value in use).
PMAP_BYTES = sizing.PMAP_BYTES

# Kernel counter columns (C_*) by the schema's names; the rest of COUNTERS is derived here.
_KERNEL_COLUMN = {
    "records": K.C_RECORDS,
    "instructions": K.C_INSTRUCTIONS,
    "ept_exits": K.C_EPT_EXITS,
    "lazy_copies": K.C_LAZY,
    "lazy_copies_4k": K.C_LAZY_4K,
    "lazy_copies_2m": K.C_LAZY_2M,
    "lazy_copies_1g": K.C_LAZY_1G,
    "lazy_copy_pages": K.C_LAZY_PAGES,
    "access_violations": K.C_VIOLATIONS,
    "mem_access_events": K.C_MEM_ACCESS,
    "singlestep_events": K.C_SINGLESTEP,
    "async_events": K.C_ASYNC,
    "ve_delivered": K.C_VE,
    "ve_blocked": K.C_VE_BLOCKED,
    "ve_emulations": K.C_VE_EMUL,
    "mtf_exits": K.C_MTF,
    "switches_vm_event": K.C_SW_EVENT,
    "switches_fast_ss": K.C_SW_FAST,
    "switches_vmfunc": K.C_SW_VMFUNC,
    "emulations": K.C_EMULATIONS,
    "records_emulated": K.C_REC_EMUL,
    "access_changes": K.C_ACCESS_CHANGES,
    "superpage_splits": K.C_SPLITS,
    "shatters": K.C_SHATTERS,
    "mmio_accesses": K.C_MMIO,
    "restarts": K.C_RESTARTS,
    "ept_syncs": K.C_EPT_SYNCS,
    "breakpoint_events": K.C_BP_EVENTS,
    "cr3_events": K.C_CR3_EVENTS,
    "int3_exits": K.C_INT3,
    "control_records": K.C_CONTROL,
    "cr3_writes": K.C_CR3_WRITES,
    "cr3_exits": K.C_CR3_EXITS,
    "guest_vmfuncs": K.C_GUEST_VMFUNCS,
    "vmfunc_exits": K.C_VMFUNC_EXITS,
    "host_drops": K.C_HOST_DROPS,
    "host_maps": K.C_HOST_MAPS,
    "view_resets": K.C_VIEW_RESETS,
}
# Kernel counter columns, in C_* order.
KERNEL_COUNTERS = tuple(sorted(_KERNEL_COLUMN, key=_KERNEL_COLUMN.__getitem__))
assert sorted(_KERNEL_COLUMN.values()) == list(range(K.N_COUNTERS))
assert set(KERNEL_COUNTERS).isdisjoint(DERIVED_COUNTERS + RUN_COUNTERS + SETUP_COUNTERS)
assert set(KERNEL_COUNTERS) | {*DERIVED_COUNTERS, *RUN_COUNTERS, *SETUP_COUNTERS} == set(COUNTERS)
# The kernel keeps its own copy of the permission table; it must be the policy model's.
assert (K.PERMITS == PERMITS).all()
# Kernel per-view columns (V_*) and per-gfn columns (G_*, after the key) by name.
_VIEW_KERNEL = {
    "records_completed": K.V_COMPLETED,
    "ept_exits": K.V_EXITS,
    "int3_exits": K.V_INT3,
    "lazy_copies": K.V_LAZY,
    "lazy_copy_pages": K.V_LAZY_PAGES,
    "access_violations": K.V_VIOLATIONS,
    "ve_delivered": K.V_VE,
    "switches_in": K.V_SWITCHES_IN,
    "resets": K.V_RESETS,
}
_GFN_KERNEL = {
    "ept_exits": K.G_EXITS,
    "int3_exits": K.G_INT3,
    "viol_r": K.G_VIOL_R,
    "viol_w": K.G_VIOL_R + 1,
    "viol_x": K.G_VIOL_R + 2,
    "ve_delivered": K.G_VE,
    "lazy_copies": K.G_LAZY,
}

_KIDX = {name: i for i, name in enumerate(KERNEL_COUNTERS)}
_NODES_PER_P2M = 520  # most nodes one access can allocate in one p2m (1 GiB split: 513, + path)


def derive(row: dict, nvcpus: int = 1, domain_syncs=0) -> dict:
    """Add what SPEC §7 derives (vm_events, view_switches, ept_sync_ipis) to a dict of kernel
    counters. Each EPT sync of a vCPU's step interrupts the other ``nvcpus - 1`` vCPUs; the
    ``domain_syncs`` among ``ept_syncs`` (host drops and maps) interrupt all of them."""
    row["vm_events"] = (
        row["mem_access_events"]
        + row["singlestep_events"]
        + row["async_events"]
        + row["breakpoint_events"]
        + row["cr3_events"]
    )
    row["view_switches"] = (
        row["switches_vm_event"] + row["switches_fast_ss"] + row["switches_vmfunc"]
    )
    row["ept_sync_ipis"] = (row["ept_syncs"] - domain_syncs) * max(
        nvcpus - 1, 0
    ) + domain_syncs * nvcpus
    return row


def carve_ram(ranges: np.ndarray, host_order: int) -> tuple[np.ndarray, np.ndarray]:
    """Split RAM ranges into the largest aligned pages of order <= host_order wholly inside.

    Returns (bases int64 (n,), entry levels int64 (n,)).
    """
    bases, levels = [], []

    def carve(a: int, b: int, order: int) -> None:
        if a > b:
            return
        size = 1 << order
        lo = -(-a // size) * size
        hi = ((b + 1) // size) * size
        if order == 0 or lo >= hi:
            if order == 0:
                bases.append(np.arange(a, b + 1, dtype=np.int64))
                levels.append(np.full(b + 1 - a, 1, dtype=np.int64))
                return
            carve(a, b, order - 9)
            return
        bases.append(np.arange(lo, hi, size, dtype=np.int64))
        levels.append(np.full((hi - lo) // size, order // 9 + 1, dtype=np.int64))
        carve(a, lo - 1, order - 9)
        carve(hi, b, order - 9)

    for a, b in ranges:
        carve(int(a), int(b), host_order)
    if not bases:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(bases), np.concatenate(levels)


@dataclass
class SimResult:
    """Counters of one trace x policy cell (SPEC §7), as plain dicts and arrays.

    Per-gfn counters are arrays (``gfn_keys`` int64 (n, 2) of view, gfn sorted; ``gfn_values``
    int64 (n, 7) in GFN_COUNTERS order); ``gfns`` offers them as a dict.
    """

    total: dict[str, int]
    vcpus: dict[int, dict[str, int]]
    views: dict[int, dict[str, int]]
    gfn_keys: np.ndarray
    gfn_values: np.ndarray
    ip_keys: np.ndarray  # uint64 (m,) instruction pointers with an exit or #VE, sorted
    ip_values: np.ndarray  # int64 (m, 3): ept_exits, ve_delivered, int3_exits
    timeline: dict[str, np.ndarray]
    population: dict[int, np.ndarray]  # view -> int64 (windows,) pages mapped at each window end
    window: int
    warnings: list[str] = field(default_factory=list)
    guest_cycles: dict[int, int] = field(default_factory=dict)
    # ept_exits, ve_delivered of ips without a row of their own (per-ip table at IP_ROWS)
    ip_other: tuple[int, int, int] = (0, 0, 0)

    @property
    def gfns(self) -> dict[tuple[int, int], dict[str, int]]:
        return {
            (int(k[0]), int(k[1])): dict(zip(GFN_COUNTERS, map(int, v), strict=True))
            for k, v in zip(self.gfn_keys, self.gfn_values, strict=True)
        }


class Replayer:
    """State and driver of one trace x policy cell.

    ``vcpus`` lists every vCPU number in the trace (uint16-valued ints); ``total_rows`` and
    ``window`` size the timeline.
    """

    def __init__(
        self, policy: Policy, facts: TraceFacts, vcpus, total_rows: int, window: int | None = None
    ):
        self.policy = policy
        d = policy.domain
        self.ram, sels = resolve_all(policy, facts)
        self.warnings = list(sels.warnings) + setup_warnings(policy)
        self.total_rows = int(total_rows)
        self.window = int(window or max(1, math.ceil(self.total_rows / 256)))
        self.n_windows = max(1, math.ceil(self.total_rows / self.window))
        sizing.check_cell(policy, facts, self.total_rows, self.window, (self.ram, sels), PMAP_BYTES)

        self.vcpu_list = [int(v) for v in vcpus]
        self.lut = np.zeros(VCPU_LIMIT, dtype=np.int64)
        self.lut[self.vcpu_list] = np.arange(len(self.vcpu_list))
        nslots = max(1, len(self.vcpu_list))

        n_p2m = 1 + (d.nr_altp2m if d.altp2m else 0)
        self.active = np.zeros(n_p2m, dtype=np.bool_)
        self.active[0] = True
        if d.altp2m:
            self.active[1] = True
            for v in policy.views:
                self.active[v.index + 1] = True
        # Most nodes one access can allocate per p2m: a full path (3) plus, with 1 GiB host
        # pages, the 513 tables of a 1 GiB leaf taken down to 4 KiB.
        per_p2m = _NODES_PER_P2M if d.host_order == 18 else 8
        self.headroom = int(self.active.sum()) * per_p2m + 16
        self.pool = np.zeros((2 * self.headroom + 64, 512), dtype=np.int64)
        self.gs = np.zeros(K.N_GS, dtype=np.int64)
        self.gs[K.GS_NFREE] = 0
        self.roots = np.full(n_p2m, -1, dtype=np.int64)
        for p in np.flatnonzero(self.active):
            self.roots[p] = K.alloc_node(self.pool, self.gs)
        self.maxm = np.zeros(n_p2m, dtype=np.int64)
        self.remap = np.zeros((n_p2m, 2), dtype=np.int64)
        self.remap[:, 0] = 1 << 62
        self.dflt = np.full(n_p2m, ACCESS_CODES[d.host_access], dtype=np.int64)
        for v in policy.views:
            self.dflt[v.index + 1] = ACCESS_CODES[v.default_access]

        self.dom = np.zeros(K.N_DOM, dtype=np.int64)
        self.dom[K.D_ALTP2M] = d.altp2m
        self.dom[K.D_EXEC_SP] = d.exec_sp
        self.dom[K.D_MONITOR] = d.monitor
        self.dom[K.D_ACCESS_REQUIRED] = d.access_required
        self.dom[K.D_LAZY_MIN] = d.xen >= (4, 17)
        self.dom[K.D_LAZY_DEFAULT] = d.xen >= (4, 19)
        self.dom[K.D_PREPOP_DEFAULT] = d.xen >= (4, 22)
        self.dom[K.D_VE_ACTION] = VE_CODES[policy.on_ve.action] if policy.on_ve else -1
        self.dom[K.D_VE_TO] = policy.on_ve.to if policy.on_ve else 0
        self.dom[K.D_HOST_ACCESS] = ACCESS_CODES[d.host_access]
        self.dom[K.D_WINDOW] = self.window
        self.dom[K.D_HEADROOM] = self.headroom
        cr3 = policy.on_cr3
        self.dom[K.D_CR3_ON] = cr3 is not None
        self.dom[K.D_CR3_SYNC] = cr3 is not None and cr3.sync
        self.dom[K.D_CR3_ONCHANGE] = cr3 is None or cr3.onchangeonly
        bp = policy.on_breakpoint
        self.dom[K.D_BP_ACTION] = -1 if bp is None else (0 if bp.action == "step" else 1)
        self.dom[K.D_BP_TO] = bp.to if bp is not None else 0
        self.dom[K.D_BP_FAST] = bp is not None and bp.fast
        # [[on_cr3.switch]] rules as (value, matches any, view) rows: a rule per value
        rows = []
        for values, other, to in sels.cr3_rules:
            rows += [[int(np.uint64(v).astype(np.int64)), 0, to] for v in values]
            if other:
                rows.append([0, 1, to])
        self.cr3r = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
        self.breakpoints = sels.breakpoints
        self.bpkey = np.zeros(0, dtype=np.int64)  # filled by write_breakpoints
        self.bpmfn = np.zeros(0, dtype=np.int64)

        self.vst = np.zeros((nslots, K.N_VCPU_STATE), dtype=np.int64)
        # the rows of each vCPU's current instruction, for restarts (SPEC §5)
        self.ibuf = np.zeros((nslots, K.MAX_INSN_ROWS, K.B_WIDTH), dtype=np.int64)
        self.pseg = np.zeros((nslots, 513, 2), dtype=np.int64)
        # one counter row per vCPU slot, and a last one for domain-wide events (op 3 and 4)
        self.vc = np.zeros((nslots + 1, K.N_COUNTERS), dtype=np.int64)
        self.pv = np.zeros((max(1, n_p2m - 1), K.N_VIEW_COUNTERS), dtype=np.int64)
        self.htab = np.zeros((1 << 10, K.H_WIDTH), dtype=np.int64)
        self.itab = np.zeros((1 << 10, K.I_WIDTH), dtype=np.int64)
        self.ip_other = np.zeros(
            3, dtype=np.int64
        )  # ept_exits, ve_delivered, int3_exits of compacted ips
        self.xtab = np.zeros((K.N_X, 4), dtype=np.int64)  # execute's arrays (K.X_POOL)
        self.elog = np.zeros((max(LOG_ROWS, K.LOG_SLACK + 1), 3), dtype=np.int64)
        # fast-path cache over the gfns the trace can touch, within PMAP_BYTES (pages of it
        # that no access reaches are never touched, so cost no memory)
        self.pmap = np.zeros(
            (n_p2m, max(1, min(facts.max_gfn + 1, PMAP_BYTES // n_p2m))), dtype=np.uint8
        )
        # per window: every counter, each view's cumulative lazy-copy pages, the domain's
        # EPT syncs, each view's pages mapped when counted (see K.snapshot)
        self.snaps = np.zeros(
            (self.n_windows + 1, K.N_COUNTERS + 2 * self.pv.shape[0] + 1), dtype=np.int64
        )
        self.rules, self.granges = rule_table(policy, sels.ranges)
        self.guest_seen = np.zeros(nslots, dtype=np.int64)
        self.guest_first = np.zeros(nslots, dtype=np.uint64)
        self.guest_last = np.zeros(nslots, dtype=np.uint64)
        self.done = False
        self.has_ip = False
        self._build_host()
        self.ram_now = self.ram  # host RAM as setup goes (add_ram widens it)
        self._run_setup(sels.ranges)
        self.setup_pages = {
            view: int(K.tree_stats(self.pool, self.roots[self._p2m(view)])[0])
            for view in self.view_ids
        }
        self.gs[K.GS_POP_DIRTY] = 0  # setup_pages are exact

    @property
    def view_ids(self) -> list[int]:
        return sorted([0] + [v.index for v in self.policy.views])

    def _p2m(self, view: int) -> int:
        """p2m index of a view: the host stands for view 0 when altp2m is off."""
        return view + 1 if self.policy.domain.altp2m else 0

    # ------------------------------------------------------------------ set-up
    def _grow_pool(self) -> None:
        used = int(self.gs[K.GS_NFREE])
        least = used + 2 * self.headroom
        # double, or less when the budget has less room; the copy holds both pools a while
        rows = max(least, min(2 * self.pool.shape[0], budget.room() // sizing.NODE_BYTES))
        budget.ensure(
            rows * sizing.NODE_BYTES,
            f"policy {self.policy.name!r}: the p2m tables ({rows:,} nodes of 4 KiB)",
        )
        new = np.zeros((rows, 512), dtype=np.int64)
        new[:used] = self.pool[:used]
        self.pool = new

    def _build_host(self) -> None:
        bases, levels = carve_ram(self.ram, self.policy.domain.host_order)
        i = 0
        while True:
            st, i = K.map_host(
                self.pool,
                self.gs,
                self.roots,
                self.maxm,
                bases,
                levels,
                self.dom[K.D_HOST_ACCESS],
                i,
            )
            if st == K.ST_DONE:
                return
            self._grow_pool()

    def _setup_call(self, fn, *args):
        # fn reads self.pool when called, so a grown pool is picked up on the next call.
        i = 0
        while True:
            st, i = fn(*args, i)
            if st != K.ST_NEED_NODES:
                return st, i
            self._grow_pool()

    def _run_setup(self, ranges: dict[int, np.ndarray]) -> None:
        p = self.policy
        visible = {0: True} | {v.index: v.visible for v in p.views}
        start_view = 0
        notify: set[int] | None = set()
        for op in p.setup:
            if op.op == "set_visibility":
                visible[op.view] = op.visible
            elif op.op == "switch_p2m":
                start_view = op.view
            elif op.op == "enable_notify":
                if op.vcpus is None:
                    notify = None
                elif notify is not None:
                    notify |= set(op.vcpus)
            elif op.op == "change_gfn":
                self._setup_change_gfn(op, ranges)
            elif op.op == "write_breakpoints":
                self._write_breakpoints(op)
            elif op.op == "add_ram":
                sel = ranges[id(op.gfns)]
                self._check_size(op, sel)
                for chunk in iter_gfn_chunks(sel):
                    self._setup_status(op, self._setup_call(self._gfns_op, 2, 0, chunk, 0)[0])
                self.ram_now = merge_ranges(list(map(tuple, self.ram_now)) + list(map(tuple, sel)))
            else:
                # set_mem_access / set_suppress_ve: only host RAM gfns can do anything, so the
                # rest is counted (or refused) here without visiting each of them.
                sel = ranges[id(op.gfns)]
                inside = intersect_ranges(sel, self.ram_now)
                outside = range_count(sel) - range_count(inside)
                code = 0 if op.op == "set_mem_access" else 1
                if outside and code == 1 and op.view != 0:
                    g = first_outside(sel, self.ram_now)
                    raise PolicyError(
                        f"{p.source}: {op.where}: gfn {g:#x} has no entry in the view nor host RAM (Xen returns -ESRCH)"
                    )
                self.gs[K.GS_SETUP_SKIPPED] += outside
                arg = ACCESS_CODES[op.access] if code == 0 else int(op.suppress)
                pview = 0 if op.view == 0 else self._p2m(op.view)
                for chunk in iter_gfn_chunks(inside):
                    self._setup_status(
                        op, self._setup_call(self._gfns_op, code, pview, chunk, arg)[0]
                    )
        # guest VMFUNC targets: view 0 and the declared views visible at the end of setup
        self.vis = np.zeros(max(self.view_ids) + 1, dtype=np.int64)
        for view in self.view_ids:
            self.vis[view] = int(visible[view])
        if p.domain.altp2m:
            self.vst[:, K.S_VIEW] = start_view
        for v, slot in zip(self.vcpu_list, range(len(self.vcpu_list)), strict=True):
            if p.domain.altp2m and (notify is None or v in notify):
                self.vst[slot, K.S_VE_EN] = 1

    def _write_breakpoints(self, op) -> None:
        """SPEC §4: an INT3 at each breakpoint address in the frame the view maps there."""
        addrs = np.ascontiguousarray(self.breakpoints, dtype=np.int64)
        keys = np.full(len(addrs), -1, dtype=np.int64)
        pview = self._p2m(op.view)
        self._setup_call(
            lambda start: K.setup_breakpoints(
                self.pool,
                self.gs,
                self.roots,
                self.maxm,
                self.dflt,
                self.dom,
                pview,
                addrs,
                keys,
                start,
            )
        )
        self.bpkey = np.unique(np.concatenate([self.bpkey, keys[keys >= 0]]))
        self.bpmfn = np.unique(self.bpkey >> 12)

    def _check_size(self, op, sel: np.ndarray) -> None:
        if range_count(sel) > MAX_EXPLICIT_GFNS:
            raise PolicyError(
                f"{self.policy.source}: {op.where}: selects {range_count(sel):,} gfns; "
                f"{op.op} handles at most {MAX_EXPLICIT_GFNS:,} here"
            )

    def _setup_change_gfn(self, op, ranges: dict[int, np.ndarray]) -> None:
        p = self.policy
        sel = ranges[id(op.gfns)]
        pview = self._p2m(op.view)
        if op.new is None:
            # only gfns the view can hold (host RAM) can have a leaf to remove
            for chunk in iter_gfn_chunks(intersect_ranges(sel, self.ram_now)):
                self._setup_status(op, self._setup_call(self._gfns_op, 3, pview, chunk, 0)[0])
            return
        g = first_outside(sel, self.ram_now)
        if g is not None:
            raise PolicyError(
                f"{p.source}: {op.where}: old gfn {g:#x} is not host RAM (Xen returns -ESRCH)"
            )
        self._check_size(op, sel)
        olds = expand(sel)
        new_sel = ranges[id(op.new)]
        self._check_size(op, new_sel)
        news = expand(new_sel)
        if len(news) == 1:
            news = np.full(len(olds), news[0], dtype=np.int64)
        elif len(news) < len(olds):
            raise PolicyError(
                f'{p.source}: {op.where}: "new" selects {len(news)} gfns for {len(olds)} old gfns'
            )
        news = np.ascontiguousarray(news[: len(olds)])
        self._setup_status(op, self._setup_call(self._change_gfn, pview, olds, news)[0])

    def _gfns_op(self, code, pview, gfns, arg, start):
        return K.setup_gfns(
            code,
            self.pool,
            self.gs,
            self.roots,
            self.maxm,
            self.active,
            self.dflt,
            self.dom,
            pview,
            gfns,
            arg,
            start,
        )

    def _change_gfn(self, pview, olds, news, start):
        return K.setup_change_gfn(
            self.pool,
            self.gs,
            self.roots,
            self.maxm,
            self.dflt,
            self.dom,
            self.remap,
            pview,
            olds,
            news,
            start,
        )

    def _setup_status(self, op, st) -> None:
        g = int(self.gs[K.GS_ERR_GFN])
        if st == K.ST_NOT_RAM:
            raise PolicyError(
                f"{self.policy.source}: {op.where}: old gfn {g:#x} is not host RAM (Xen returns -ESRCH)"
            )
        if st == K.ST_NO_ENTRY:
            raise PolicyError(
                f"{self.policy.source}: {op.where}: gfn {g:#x} has no entry in the view nor host RAM (Xen returns -ESRCH)"
            )

    # ------------------------------------------------------------------ replay
    def feed(
        self,
        gfn,
        access,
        vcpu=None,
        insn=None,
        tsc=None,
        start_row: int = 0,
        ip=None,
        op=None,
        arg=None,
        gpa=None,
    ) -> None:
        """Replay one batch. gfn uint64 (n,), access uint8 (n,), vcpu uint16 (n,) or None,
        insn, tsc and ip uint64 (n,) or None, op uint8 and arg uint64 (n,) or None (control
        rows), gpa uint64 (n,) or None (byte addresses for breakpoints; else ip's page
        offset); rows start at global ``start_row``."""
        if self.done:
            return
        n = len(gfn)
        gfn = np.ascontiguousarray(gfn, dtype=np.uint64).view(np.int64)
        access = np.ascontiguousarray(access, dtype=np.uint8)
        vcpu = (
            np.zeros(n, dtype=np.uint16)
            if vcpu is None
            else np.ascontiguousarray(vcpu, dtype=np.uint16)
        )
        has_insn = insn is not None
        insn_arr = np.ascontiguousarray(insn, dtype=np.uint64).view(np.int64) if has_insn else gfn
        has_ip = ip is not None
        ip_arr = np.ascontiguousarray(ip, dtype=np.uint64).view(np.int64) if has_ip else gfn
        self.has_ip = self.has_ip or has_ip
        has_op = op is not None
        op_arr = np.ascontiguousarray(op, dtype=np.uint8) if has_op else access
        if has_op and arg is None:
            arg = np.zeros(n, dtype=np.uint64)  # SPEC §2: arg defaults to 0
        arg_arr = np.ascontiguousarray(arg, dtype=np.uint64).view(np.int64) if has_op else gfn
        if len(self.bpkey) and gpa is not None:
            boff = (np.asarray(gpa, dtype=np.uint64) & np.uint64(4095)).astype(np.int64)
        elif len(self.bpkey) and has_ip:
            boff = ip_arr & 4095
        elif len(self.bpkey):
            boff = np.full(n, -1, dtype=np.int64)
        else:
            boff = gfn  # never read without breakpoints
        # Read-only views of every input: Numba compiles one variant per mix of writable and
        # read-only arrays (decoded Parquet columns are read-only, computed ones are not),
        # each taking tens of seconds; with all of them read-only there is one.
        gfn, access, vcpu, insn_arr, ip_arr, op_arr, arg_arr, boff = (
            _read_only(a) for a in (gfn, access, vcpu, insn_arr, ip_arr, op_arr, arg_arr, boff)
        )
        i = 0
        while True:
            args = (
                gfn,
                access,
                vcpu,
                insn_arr,
                has_insn,
                ip_arr,
                has_ip,
                op_arr,
                arg_arr,
                has_op,
                boff,
                start_row,
                i,
                self.pool,
                self.gs,
                self.roots,
                self.maxm,
                self.active,
                self.dflt,
                self.dom,
                self.vst,
                self.vc,
                self.pv,
                self.elog,
                self.htab,
                self.itab,
                self.rules,
                self.granges,
                self.lut,
                self.snaps,
                self.pmap,
                self.ibuf,
                self.remap,
                self.bpmfn,
                self.bpkey,
                self.cr3r,
                self.vis,
                self.pseg,
                self.xtab,
            )
            _check_c_order(args)  # execute rebuilds arrays from address and shape alone
            st, i = K.replay_batch(*args)
            if st == K.ST_NEED_NODES:
                self._grow_pool()
            elif st in (K.ST_NEED_HASH, K.ST_NEED_IPHASH):
                self._grow_tables()
            elif st in (K.ST_CRASH, K.ST_LIVELOCK):
                self.done = True
                break
            elif st == K.ST_UNMATCHED:
                row = int(self.gs[K.GS_ERR_ROW])
                raise ReplayRuntimeError(
                    f"row {row}: violation in view {self.policy.view_name(int(self.gs[K.GS_ERR_VIEW]))!r} "
                    f"(gfn {int(self.gs[K.GS_ERR_GFN]):#x}) matches no [[on_violation]] rule of policy {self.policy.name!r}"
                )
            elif st == K.ST_LONG_INSN:
                row = int(self.gs[K.GS_ERR_ROW])
                raise TraceError(
                    f"row {row}: instruction has more than {K.MAX_INSN_ROWS} rows "
                    "(insn ids must change per instruction)"
                )
            else:
                break
        if tsc is not None:
            K.track_tsc(
                _read_only(np.ascontiguousarray(tsc, dtype=np.uint64)),
                vcpu,
                self.lut,
                self.guest_seen,
                self.guest_first,
                self.guest_last,
                i,
                op_arr,
                has_op,
            )

    def _grow_tables(self) -> None:
        """Grow the per-gfn and per-ip tables until draining the event log fits in them; a
        per-ip table at IP_ROWS is compacted instead (``_compact_ips``)."""
        while (st := K.drain_status(self.gs, self.htab, self.itab)) != K.ST_DONE:
            table = self.htab if st == K.ST_NEED_HASH else self.itab
            # (compacting frees a quarter of the rows: enough unless the log alone is bigger)
            if (
                st != K.ST_NEED_HASH
                and table.shape[0] >= IP_ROWS
                and 4 * int(self.gs[K.GS_LOGN]) < table.shape[0]
            ):
                self._compact_ips()
                continue
            what = "per-gfn" if st == K.ST_NEED_HASH else "per-ip"
            budget.ensure(
                2 * table.nbytes,
                f"policy {self.policy.name!r}: the {what} table ({2 * table.shape[0]:,} rows)",
            )
            if st == K.ST_NEED_HASH:
                self.htab = _grown(self.htab, False)
            else:
                self.itab = _grown(self.itab, True)

    def _compact_ips(self) -> None:
        """Keep the half of the per-ip table's rows with the most events (ties: lower ip) and
        add the rest to ``ip_other``: totals stay exact, the table stays at IP_ROWS rows."""
        t = self.itab
        counts = t[:, K.I_EXITS : K.I_INT3 + 1]  # exits, #VEs, INT3s: adjacent columns
        events = counts.sum(axis=1)
        used = np.flatnonzero(events)
        room = (3 * t.shape[0]) // 4 - int(self.gs[K.GS_LOGN]) - 1
        keep = max(0, min(t.shape[0] // 2, room))
        kept = t[used[_most_events(t[used, K.I_IP], events[used], keep)]]
        self.ip_other += counts.sum(axis=0) - kept[:, K.I_EXITS : K.I_INT3 + 1].sum(axis=0)
        new = np.frombuffer(mmap.mmap(-1, t.nbytes), dtype=np.int64).reshape(t.shape)
        K.rehash(kept, new, True, np.zeros(K.N_GS, dtype=np.int64))
        self.itab = new
        self.gs[K.GS_ICOUNT] = len(kept)

    def finish(self, vcpus=None) -> SimResult:
        """End open instructions (unless crashed) and collect every table.

        ``vcpus``: report only these of the vCPUs given at construction (the trace's own
        set, when slots were made for a range of candidates; the others saw no row).
        """
        if not self.done:
            K.finish(self.vst, self.vc, self.pv)
        self.done = True
        self._grow_tables()
        K.drain_log(self.elog, self.gs, self.htab, self.itab)
        w = int(self.gs[K.GS_NEXT_WIN])
        for j in range(w, self.n_windows + 1):
            K.snapshot(
                self.vc,
                self.pv,
                self.snaps,
                j,
                self.vc.shape[0],
                self.pool,
                self.roots,
                self.gs,
                self.dom[K.D_ALTP2M],
            )
        wanted = None if vcpus is None else {int(v) for v in vcpus}
        return self._collect(
            [(slot, v) for slot, v in enumerate(self.vcpu_list) if wanted is None or v in wanted]
        )

    def _collect(self, reported: list[tuple[int, int]]) -> SimResult:
        """``reported``: (counter slot, vCPU number) of the vCPUs the tables name."""
        crashed = int(self.gs[K.GS_CRASHED])
        livelocked = int(self.gs[K.GS_LIVELOCKED])
        run = {
            "crashed": crashed,
            "crash_record": int(self.gs[K.GS_CRASH_ROW]) if crashed else -1,
            "livelocked": livelocked,
            "livelock_record": int(self.gs[K.GS_LIVELOCK_ROW]) if livelocked else -1,
        }
        nvcpus = len(reported)
        vcpus = {}
        for slot, v in reported:
            row = {name: int(self.vc[slot, i]) for i, name in enumerate(KERNEL_COUNTERS)}
            row.update(run, setup_splits=0, setup_skipped=0)
            derive(row, nvcpus)
            vcpus[v] = {k: row[k] for k in COUNTERS}
        tot = {name: int(self.vc[:, i].sum()) for i, name in enumerate(KERNEL_COUNTERS)}
        tot.update(
            run,
            setup_splits=int(self.gs[K.GS_SETUP_SPLITS]),
            setup_skipped=int(self.gs[K.GS_SETUP_SKIPPED]),
        )
        derive(tot, nvcpus, int(self.vc[-1, K.C_EPT_SYNCS]))
        total = {k: tot[k] for k in COUNTERS}

        views = {}
        for view in self.view_ids:
            p = self._p2m(view)
            pages, l4k, l2m, l1g = K.tree_stats(self.pool, self.roots[p])
            row = {name: int(self.pv[view, col]) for name, col in _VIEW_KERNEL.items()}
            row.update(
                pages_mapped=int(pages), leaves_4k=int(l4k), leaves_2m=int(l2m), leaves_1g=int(l1g)
            )
            views[view] = {k: row[k] for k in VIEW_COUNTERS}

        used = np.flatnonzero(self.htab[:, 0])
        keys = self.htab[used, 0] - 1
        vals = self.htab[used][:, [_GFN_KERNEL[c] for c in GFN_COUNTERS]]
        keep = (
            (self.htab[used, K.G_EXITS] > 0)
            | (self.htab[used, K.G_VE] > 0)
            | (self.htab[used, K.G_INT3] > 0)
        )
        views_, gfns_ = keys[keep] >> GFN_BITS, keys[keep] & GFN_MASK
        order = np.lexsort((gfns_, views_))
        gfn_keys = np.stack([views_[order], gfns_[order]], axis=1)
        gfn_values = vals[keep][order]

        diffs = np.diff(self.snaps[:, : K.N_COUNTERS], axis=0)
        tl = {name: diffs[:, _KIDX[name]] for name in KERNEL_COUNTERS}
        timeline = {
            "window": np.arange(self.n_windows, dtype=np.int64),
            "first_record": np.arange(self.n_windows, dtype=np.int64) * self.window,
        }
        nv = self.pv.shape[0]
        timeline.update(derive(tl, nvcpus, np.diff(self.snaps[:, K.N_COUNTERS + nv])))
        population = {
            view: _population(
                self.setup_pages[view],
                self.snaps[:, K.N_COUNTERS + view],
                self.snaps[:, K.N_COUNTERS + nv + 1 + view],
            )
            for view in self.view_ids
        }
        guest = {}
        for slot, v in reported:
            seen = self.guest_seen[slot]
            guest[v] = int(self.guest_last[slot]) - int(self.guest_first[slot]) if seen else 0
        used_ip = np.flatnonzero(
            self.itab[:, K.I_EXITS] | self.itab[:, K.I_VE] | self.itab[:, K.I_INT3]
        )
        ips = self.itab[used_ip, K.I_IP].view(np.uint64)
        iorder = np.argsort(ips)  # ips are unique: any sort gives one order
        rows = used_ip[iorder]  # one gather per column: 2-D fancy indexing is much slower
        ip_values = np.stack(
            [self.itab[rows, K.I_EXITS], self.itab[rows, K.I_VE], self.itab[rows, K.I_INT3]], axis=1
        )
        return SimResult(
            total,
            vcpus,
            views,
            gfn_keys,
            gfn_values,
            ips[iorder],
            ip_values,
            timeline,
            population,
            self.window,
            self.warnings,
            guest,
            ip_other=(int(self.ip_other[0]), int(self.ip_other[1]), int(self.ip_other[2])),
        )


def _check_c_order(args: tuple) -> None:
    """Raise if an array among the kernel's arguments is not C-contiguous (numpy's flag: an
    empty array always is)."""
    for a in args:
        if isinstance(a, np.ndarray) and not a.flags.c_contiguous:
            raise AssertionError("the replay kernel's arrays must be C-contiguous")


def _read_only(a: np.ndarray) -> np.ndarray:
    """A read-only view of ``a`` (no copy)."""
    v = a.view()
    v.flags.writeable = False
    return v


def _population(setup: int, lazy: np.ndarray, counted: np.ndarray) -> np.ndarray:
    """A view's pages mapped at the end of each window, int64 (windows,): the last count of
    its tree (``counted`` >= 0; ``setup`` before any) plus the pages lazy copies added since
    (``lazy``: cumulative lazy-copy pages). ``lazy`` and ``counted`` are int64 (windows + 1,),
    row 0 the start of the replay."""
    out = np.empty(len(lazy) - 1, dtype=np.int64)
    base, at = setup, 0
    for w in range(1, len(lazy)):
        if counted[w] >= 0:
            base, at = int(counted[w]), int(lazy[w])
        out[w - 1] = base + int(lazy[w]) - at
    return out


def _most_events(ips: np.ndarray, events: np.ndarray, keep: int) -> np.ndarray:
    """Indices of the ``keep`` entries first in the order (events descending, ip ascending as
    unsigned), in no particular order: the rows a compacted per-ip table keeps.

    ips int64 (n,) unique bit patterns, events int64 (n,). Two partitions, O(n): a full sort
    of a million rows took a quarter of a second per compaction, and a trace with more
    distinct ips than the table holds compacts again every few hundred thousand events.
    """
    n = len(events)
    if keep >= n:
        return np.arange(n)
    if keep <= 0:
        return np.arange(0)
    cut = np.partition(events, n - keep)[n - keep]  # the keep-th most events
    above = np.flatnonzero(events > cut)
    tied = np.flatnonzero(events == cut)
    need = keep - len(above)
    if need < len(tied):  # the lowest ips among the ties; ips are unique, so exactly ``need``
        u = ips[tied].view(np.uint64)
        tied = tied[u <= np.partition(u, need - 1)[need - 1]]
    return np.concatenate([above, tied])


def _grown(table: np.ndarray, ip_table: bool) -> np.ndarray:
    """A hash table of twice the rows holding ``table``'s entries.

    The memory is an anonymous mmap (zero-filled) rather than np.zeros: numpy asks for
    transparent huge pages on large arrays, and the first touch of a large table then waits
    on page compaction for a time that depends on the OS's free huge pages; with 4 KiB
    pages the first pass takes the same time on every run (docs/performance.md).
    """
    rows, cols = 2 * table.shape[0], table.shape[1]
    new = np.frombuffer(mmap.mmap(-1, rows * cols * 8), dtype=np.int64).reshape(rows, cols)
    K.rehash(table, new, ip_table, np.zeros(K.N_GS, dtype=np.int64))
    return new


def rule_table(policy: Policy, ranges: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Rules as int64 (n, 8): view (-1 any), kind mask, gfn range [lo, hi) or -1, action, to,
    fast, access; and the concatenated gfn ranges int64 (m, 2) they point into."""
    rows, chunks, at = [], [], 0
    for r in policy.rules:
        mask = 7 if r.kinds is None else sum(1 << KIND_CODES[k] for k in r.kinds)
        lo = hi = -1
        if r.gfns is not None:
            rr = ranges[id(r.gfns)]
            lo, hi = at, at + len(rr)
            chunks.append(rr)
            at = hi
        rows.append(
            [
                -1 if r.view is None else r.view,
                mask,
                lo,
                hi,
                RESPONSE_CODES[r.action],
                r.to,
                int(r.fast),
                ACCESS_CODES[r.access],
            ]
        )
    table = np.asarray(rows, dtype=np.int64).reshape(-1, 8)
    granges = np.concatenate(chunks) if chunks else np.zeros((1, 2), dtype=np.int64)
    return table, np.ascontiguousarray(granges, dtype=np.int64)


def setup_warnings(policy: Policy) -> list[str]:
    """SPEC §4 warnings: view-0 restrictions that a lazy copy will drop, view-0 suppress-VE."""
    out = []
    d = policy.domain
    if not d.altp2m:
        return out
    for op in policy.setup:
        if (
            op.op == "set_mem_access"
            and op.view == 0
            and d.xen >= (4, 19)
            and op.access != d.host_access
        ):
            out.append(
                f"{op.where}: view-0 access {op.access!r} is written to the host p2m; view 0 "
                f"copies gfns it has not mapped yet with its default access {d.host_access!r} "
                "(xen >= 4.19), so the restriction is lost on those gfns"
            )
        if op.op == "set_suppress_ve" and op.view == 0:
            out.append(
                f"{op.where}: set_suppress_ve on view 0 writes the host p2m; the bit never "
                "reaches the tables vCPUs walk"
            )
    return out


def simulate_arrays(
    policy: Policy,
    arrays: dict[str, np.ndarray],
    *,
    meta_ram=None,
    gfn_sets=None,
    symbols=None,
    processes=None,
    batch_rows: int | None = None,
    window: int | None = None,
    before_feed=None,
) -> SimResult:
    """Replay an in-memory trace (dict of arrays: gfn or gpa, access, optional vcpu, insn,
    tsc, ip, op, arg) with optional metadata ``symbols`` / ``processes`` (SPEC §2).

    The arrays are trusted to follow SPEC §2 beyond the checks below (use
    ``traces.validate`` on files). ``before_feed``: called once the policy's setup has run,
    before the first row.
    """
    gpa = arrays.get("gpa")
    gfn = np.asarray(
        arrays["gfn"] if gpa is None else np.asarray(gpa, dtype=np.uint64) >> np.uint64(12),
        dtype=np.uint64,
    )
    n = len(gfn)
    access = np.asarray(arrays["access"])
    op = arrays.get("op")
    ctl = np.zeros(n, dtype=bool) if op is None else np.asarray(op) != 0
    if n and ((access[~ctl] < 1).any() or (access[~ctl] > 7).any() or (access[ctl] != 0).any()):
        raise ValueError(
            "access values must be 1..7 on access rows and 0 on control rows (SPEC §2)"
        )
    if n and gfn.max() >= GFN_LIMIT:
        raise ValueError("gfn values must be below 2^36 (SPEC §2)")
    vcpu = arrays.get("vcpu")
    vcpu = np.zeros(n, dtype=np.uint16) if vcpu is None else np.asarray(vcpu, dtype=np.uint16)
    facts = facts_from_arrays(
        dict(arrays, gfn=gfn),
        meta_ram=meta_ram,
        gfn_sets=gfn_sets,
        symbols=symbols,
        processes=processes,
        insn_stats=needs_insn_stats(policy),
    )
    domain_rows = np.zeros(n, dtype=bool) if op is None else np.asarray(op) >= 3
    rep = Replayer(policy, facts, np.unique(vcpu[~domain_rows]), n, window=window)
    if before_feed is not None:
        before_feed()
    step = batch_rows or max(n, 1)
    for a in range(0, n, step):
        b = min(n, a + step)
        part = {
            k: (None if arrays.get(k) is None else np.asarray(arrays[k])[a:b])
            for k in ("insn", "tsc", "ip", "op", "arg", "gpa")
        }
        rep.feed(
            gfn[a:b],
            access[a:b],
            vcpu[a:b],
            part["insn"],
            part["tsc"],
            start_row=a,
            ip=part["ip"],
            op=part["op"],
            arg=part["arg"],
            gpa=part["gpa"],
        )
        if rep.done:
            break
    return rep.finish()


def kernels_cached() -> bool:
    """Whether Numba's cache holds the replay kernel for this source (no compile ahead).

    Reads Numba's cache index (a private interface): when that cannot be read, says True
    (nothing is announced, the run compiles as it goes)."""
    try:
        return bool(K.replay_batch._cache._cache_file._load_index())
    except Exception:
        return True


WARM_POLICY = """
name = "warm-up"
[domain]
ram = [[0, 1023]]
[[view]]
name = "a"
default_access = "rx"
[breakpoints]
at = 0x5010
[[setup]]
op = "set_mem_access"
view = "a"
gfns = [6, 7]
access = "x"
[[setup]]
op = "change_gfn"
view = "a"
old = 8
new = 9
[[setup]]
op = "set_suppress_ve"
view = "a"
gfns = 10
suppress = false
[[setup]]
op = "write_breakpoints"
view = "a"
[[setup]]
op = "switch_p2m"
view = "a"
[[on_violation]]
action = "step"
[on_breakpoint]
action = "emulate"
[on_cr3]
"""


def execute_signature() -> tuple:
    """``execute``'s argument types as replay_batch calls it (xtab, has_ip, has_op, start_row,
    s, j, k, e, lv, has_walk): a tuple of types, not a string, because Numba's cache index
    keys an entry by the signature as given. tests/test_threads_startup.py checks that the
    cache holds this one only."""
    from numba import types

    i64 = types.int64
    return (types.Array(i64, 2, "C"), types.boolean, types.boolean) + (i64,) * 7


def _compile_execute() -> None:
    """Compile ``execute`` into Numba's cache (run by warm_kernels in a second interpreter)."""
    K.execute.compile(execute_signature())


def warm_kernels() -> None:
    """Compile (or load) every kernel a replay calls, on a few rows: run once in the main
    process before worker processes start, so they load the kernels instead of each
    compiling them.

    ``execute``, half of a cold compile, compiles meanwhile in a second process (Numba
    compiles one function at a time per process); replay_batch, which calls it, waits for
    it and then loads it from the cache. Should that process fail, replay_batch compiles it.
    """
    import subprocess
    import sys

    from altp2m_replay.policy import parse_policy

    gfn = np.array([5, 6, 600, 7, 5, 3, 3], dtype=np.uint64)
    arrays = {
        "gpa": (gfn << np.uint64(12)) | np.uint64(0x10),
        "access": np.array([4, 2, 2, 1, 4, 0, 0], dtype=np.uint8),
        "vcpu": np.array([0, 0, 1, 1, 0, 0, 1], dtype=np.uint16),
        "insn": np.array([1, 1, 2, 2, 3, 4, 5], dtype=np.uint64),
        "ip": np.arange(7, dtype=np.uint64),
        "tsc": np.arange(7, dtype=np.uint64),
        "op": np.array([0, 0, 0, 0, 0, 2, 3], dtype=np.uint8),
        "arg": np.array([0, 0, 0, 0, 0, 0x1000, 0], dtype=np.uint64),
    }
    # A plain interpreter, not multiprocessing: a spawned child would run the caller's main
    # script again, and one without a __main__ guard would fail loudly. Its output is
    # dropped: if it fails, replay_batch compiles execute itself.
    code = "from altp2m_replay.engine.simulate import _compile_execute; _compile_execute()"
    try:
        helper = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except OSError:
        helper = None
    try:
        simulate_arrays(
            parse_policy(WARM_POLICY, "warm-up"),
            arrays,
            batch_rows=4,
            before_feed=None if helper is None else helper.wait,
        )
    finally:
        if helper is not None and helper.poll() is None:  # the warm-up failed before its wait
            helper.kill()
            helper.wait()
