"""Pure-Python reference model of altp2m replay (SPEC §3-§7), used to check the Numba engine.

Written from the SPEC alone and meant to be read, not to be fast: every p2m (the host, view 0
and each declared view) is a literal 4-level radix tree of dicts whose leaves are ``Leaf``
tuples, and every step of SPEC §5 is one branch of ``Replay._attempt``.

Layout: ``Leaf`` / ``P2M`` (the EPT-shaped tables), ``Replay`` (domain state, setup ops of §4,
the per-row procedure of §5 and the responses of §6), ``reference_simulate`` (entry point).
"""

from __future__ import annotations

import gc
from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from altp2m_replay.errors import PolicyError, ReplayRuntimeError
from altp2m_replay.policy import Policy
from altp2m_replay.ranges import expand
from altp2m_replay.selectors import facts_from_arrays, resolve_all

TOTAL_COUNTERS = (
    "records",
    "instructions",
    "ept_exits",
    "lazy_copies",
    "lazy_copies_4k",
    "lazy_copies_2m",
    "lazy_copies_1g",
    "lazy_copy_pages",
    "access_violations",
    "mem_access_events",
    "singlestep_events",
    "async_events",
    "breakpoint_events",
    "cr3_events",
    "vm_events",
    "ve_delivered",
    "ve_blocked",
    "ve_emulations",
    "mtf_exits",
    "switches_vm_event",
    "switches_fast_ss",
    "switches_vmfunc",
    "view_switches",
    "emulations",
    "records_emulated",
    "access_changes",
    "superpage_splits",
    "shatters",
    "mmio_accesses",
    "restarts",
    "int3_exits",
    "control_records",
    "cr3_writes",
    "cr3_exits",
    "guest_vmfuncs",
    "vmfunc_exits",
    "host_drops",
    "host_maps",
    "view_resets",
    "ept_syncs",
    "ept_sync_ipis",
    "crashed",
    "crash_record",
    "livelocked",
    "livelock_record",
    "setup_splits",
    "setup_skipped",
)
VIEW_COUNTERS = (
    "records_completed",
    "ept_exits",
    "int3_exits",
    "lazy_copies",
    "lazy_copy_pages",
    "access_violations",
    "ve_delivered",
    "switches_in",
    "resets",
    "pages_mapped",
    "leaves_4k",
    "leaves_2m",
    "leaves_1g",
)
GFN_COUNTERS = (
    "ept_exits",
    "int3_exits",
    "viol_r",
    "viol_w",
    "viol_x",
    "ve_delivered",
    "lazy_copies",
)

MFN_OFFSET = 1 << 24  # SPEC §3: mfn = gfn + 2^24 for RAM
MAX_RESTARTS = 64  # SPEC §5: an instruction restarted more than this livelocks
RAM_RW = "ram_rw"  # the only p2m type this model creates
TYPE_PERMITS = {RAM_RW: "rwx"}
# What each access value lets through (SPEC §3 table; rx2rw acts as rx, n2rwx as n).
ACCESS_PERMITS = {
    "n": "",
    "r": "r",
    "rw": "rw",
    "x": "x",
    "rx": "rx",
    "rwx": "rwx",
    "rx2rw": "rx",
    "n2rwx": "",
}

# Levels as in SPEC §3: 4 is the root (gfn bits 27-35) ... 1 holds 4 KiB leaves (bits 0-8).
LEVEL_SHIFT = {4: 27, 3: 18, 2: 9, 1: 0}
LEAF_ORDER = {3: 18, 2: 9, 1: 0}
ORDER_LEVEL = {18: 3, 9: 2, 0: 1}
# Hole order when a walk meets an empty slot at this level (an empty root slot is at least
# a 1 GiB hole; the order is only ever min'ed with a host order <= 18).
EMPTY_SLOT_ORDER = {4: 18, 3: 18, 2: 9, 1: 0}

# Outcomes of one attempt at a row (SPEC §5): complete, restart the instruction, the rest of
# the instruction emulated, the domain crashed.
DONE, RESTART, EMULATED, CRASH = "done", "restart", "emulated", "crash"


# --------------------------------------------------------------------------- p2m tables
class Leaf(NamedTuple):
    """One leaf entry; its order is the level it sits at. ``valid=False`` is a removed leaf."""

    mfn: int
    type: str
    access: str
    sve: int
    valid: bool = True


def _index(gfn: int, level: int) -> int:
    return (gfn >> LEVEL_SHIFT[level]) & 511


def _base(gfn: int, order: int) -> int:
    return gfn & ~((1 << order) - 1)


def invisible(leaf: Leaf, order: int) -> bool:
    """SPEC §3: Xen's lookups do not see a superpage leaf whose bits permit nothing."""
    return order > 0 and ACCESS_PERMITS[leaf.access] == ""


def mfn_at(leaf: Leaf, order: int, gfn: int) -> int:
    """The mfn a leaf of ``order`` gives ``gfn`` (leaves map aligned, contiguous ranges)."""
    return leaf.mfn + (gfn - _base(gfn, order))


def _split(leaf: Leaf, level: int, down_to: int) -> tuple[dict, int]:
    """Split a superpage leaf at ``level`` into a table of its pieces, recursing to ``down_to``.

    Returns the new table and the number of superpage leaves split: like Xen's
    ``ept_split_super_page``, a 1 GiB leaf taken to 4 KiB splits all 512 of its 2 MiB pieces.
    """
    child_level = level - 1
    step = 1 << LEAF_ORDER[child_level]
    mfn, typ, access, sve, valid = leaf
    table = {i: Leaf(mfn + i * step, typ, access, sve, valid) for i in range(512)}
    splits = 1
    if child_level > down_to:
        for i, piece in table.items():
            table[i], n = _split(piece, child_level, down_to)
            splits += n
    return table, splits


class P2M:
    """An EPT-shaped p2m: nested dicts (missing key = empty slot) with ``Leaf`` leaves."""

    def __init__(self, default_access: str):
        self.root: dict = {}
        self.default_access = default_access
        self.max_mapped = 0  # highest gfn ever covered by a valid leaf
        self.remap_min: int | None = None  # change_gfn remap interval (kept for the record)
        self.remap_max: int | None = None

    def find(self, gfn: int) -> tuple[Leaf | None, int]:
        """The hardware walk for ``gfn``: (leaf, its order), or (None, order of the empty
        slot's level). Invisible superpages are found (the hardware faults on them)."""
        table = self.root
        for level in (4, 3, 2, 1):
            entry = table.get(_index(gfn, level))
            if entry is None:
                return None, EMPTY_SLOT_ORDER[level]
            if isinstance(entry, Leaf):
                return entry, LEAF_ORDER[level]
            table = entry
        raise AssertionError("level-1 entries are leaves")

    def valid_leaf(self, gfn: int) -> tuple[Leaf, int] | None:
        """Xen's lookup: the valid leaf covering ``gfn`` and its order, None for an empty
        slot, a removed leaf or an invisible superpage (SPEC §3)."""
        leaf, order = self.find(gfn)
        if leaf is None or not leaf.valid or invisible(leaf, order):
            return None
        return leaf, order

    def entry_at(self, gfn: int, order: int):
        """What the slot of ``order`` covering ``gfn`` holds: a Leaf, a table (dict), or None
        (also when a leaf above it covers the slot)."""
        table = self.root
        for level in range(4, ORDER_LEVEL[order], -1):
            table = table.get(_index(gfn, level))
            if not isinstance(table, dict):
                return None
        return table.get(_index(gfn, ORDER_LEVEL[order]))

    def hole_order(self, gfn: int) -> int:
        """SPEC §3 hole order (only asked where no valid leaf maps ``gfn``)."""
        if gfn > self.max_mapped:
            # Xen's ept_get_entry does not consult the tables above max_mapped.
            if _base(gfn, 18) > self.max_mapped:
                return 18
            if _base(gfn, 9) > self.max_mapped:
                return 9
            return 0
        # An invisible superpage is an empty slot at its level: the order it reports is the
        # order of that level, as for an empty slot.
        _, order = self.find(gfn)
        return order

    def write(self, gfn: int, order: int, leaf: Leaf) -> int:
        """Store ``leaf`` as the order-``order`` entry covering ``gfn``.

        A bigger leaf on the way is split first (its other pieces keep their values) unless it
        is invisible (SPEC §3), which becomes an empty table; a table where the leaf goes is
        replaced, dropping what it held (as ``ept_set_entry`` frees it). Returns the number
        of superpage leaves split.
        """
        target = ORDER_LEVEL[order]
        table = self.root
        splits = 0
        for level in range(4, target, -1):
            i = _index(gfn, level)
            entry = table.get(i)
            if entry is None or (isinstance(entry, Leaf) and invisible(entry, LEAF_ORDER[level])):
                entry = table[i] = {}
            elif isinstance(entry, Leaf):
                entry, n = _split(entry, level, target)
                table[i] = entry
                splits += n
            table = entry
        table[_index(gfn, target)] = leaf
        if leaf.valid:
            self.max_mapped = max(self.max_mapped, _base(gfn, order) + (1 << order) - 1)
        return splits

    def rewrite_4k(self, gfn: int, **changes) -> int:
        """Rewrite the valid leaf covering ``gfn`` as a 4 KiB leaf with ``changes``; splits."""
        leaf, order = self.valid_leaf(gfn)
        return self.write(gfn, 0, leaf._replace(mfn=mfn_at(leaf, order, gfn), **changes))

    def leaf_counts(self) -> dict[int, int]:
        """Valid leaves by order."""
        counts = {0: 0, 9: 0, 18: 0}

        def visit(table: dict, level: int) -> None:
            for entry in table.values():
                if isinstance(entry, Leaf):
                    counts[LEAF_ORDER[level]] += entry.valid
                else:
                    visit(entry, level - 1)

        visit(self.root, 4)
        return counts


def permits(leaf: Leaf, kind: str) -> bool:
    """Hardware bits = type permissions ∩ access permissions (SPEC §3)."""
    return kind in TYPE_PERMITS[leaf.type] and kind in ACCESS_PERMITS[leaf.access]


def access_kind(access: int) -> str:
    """SPEC §2: x if bit 4, else w if bit 2, else r."""
    return "x" if access & 4 else "w" if access & 2 else "r"


# --------------------------------------------------------------------------- replay
@dataclass
class VcpuState:
    """SPEC §5 per-vCPU state, plus the instruction bookkeeping of §5 and §6.3."""

    view: int
    ve_enabled: bool
    ve_busy: bool = False
    singlestep: tuple[int, bool] | None = None  # (return view, fast) while stepping
    ve_return: int | None = None  # view to VMFUNC back to (vmfunc-step)
    emulating: bool = False  # rest of the instruction is emulated
    insn: int | None = None  # None until the vCPU's first row
    rows: list = field(default_factory=list)  # (trace row, gfn, kind) of the instruction so far
    restarts: int = 0  # restarts of the current instruction
    completed: list = field(default_factory=list)  # views of the completions of this pass
    cr3: int | None = None  # the last CR3 value written


class Replay:
    """The domain: host p2m, views, vCPUs and counters for one policy and one trace."""

    def __init__(
        self, policy: Policy, ram: np.ndarray, selectors: dict[int, np.ndarray], vcpus: list[int]
    ):
        self.p = policy
        self.d = policy.domain
        self.sel = selectors
        self.host = P2M(self.d.host_access)
        for first, last in ram:
            self._map_ram(int(first), int(last))
        # With altp2m off vCPUs walk the host itself, which then stands for view 0.
        self.views: dict[int, P2M] = {0: P2M(self.d.host_access) if self.d.altp2m else self.host}
        for v in policy.views:
            self.views[v.index] = P2M(v.default_access)
        self.visible = {0: True} | {v.index: v.visible for v in policy.views}
        self.vcpu_ids = vcpus
        self.cpu_ctr = {v: dict.fromkeys(TOTAL_COUNTERS, 0) for v in vcpus}
        self.view_ctr = {i: dict.fromkeys(VIEW_COUNTERS, 0) for i in self.views}
        self.gfn_ctr: dict[tuple[int, int], dict[str, int]] = defaultdict(
            lambda: dict.fromkeys(GFN_COUNTERS, 0)
        )
        self.setup_ctr = {"setup_splits": 0, "setup_skipped": 0}
        # host drops and maps belong to no vCPU: their counters go to the total row only
        self.domain_ctr = dict.fromkeys(TOTAL_COUNTERS, 0)
        self.breakpoints: set[tuple[int, int]] = set()  # (mfn, offset) holding an INT3
        self.crash_record = -1
        self.livelock_record = -1
        # Where split counts go: setup_splits during setup, the acting vCPU during replay.
        self._split_sink = (self.setup_ctr, "setup_splits")
        self.start_view = 0
        self.notify: set[int] | None = set()  # None: every vCPU

    # ----------------------------------------------------------------- host and helpers
    def _map_ram(self, first: int, last: int) -> None:
        """Map [first, last] with the largest aligned pages of order <= host_order inside it."""
        g = first
        while g <= last:
            order = next(
                o
                for o in (18, 9, 0)
                if o <= self.d.host_order and g % (1 << o) == 0 and g + (1 << o) - 1 <= last
            )
            self.host.write(g, order, Leaf(g + MFN_OFFSET, RAM_RW, self.d.host_access, 1))
            g += 1 << order

    def _splits(self, n: int) -> None:
        counters, key = self._split_sink
        counters[key] += n

    def _host_ram(self, gfn: int) -> tuple[Leaf, int] | None:
        return self.host.valid_leaf(gfn)

    def _gfns(self, selector) -> list[int]:
        return [int(g) for g in expand(self.sel[id(selector)])]

    def _host_write_4k(self, gfn: int, **changes) -> None:
        """A 4 KiB write into the host entry of ``gfn`` (a RAM gfn), then propagation."""
        self._splits(self.host.rewrite_4k(gfn, **changes))
        self._propagate(gfn)

    def _propagate(self, gfn: int, v: int | None = None, sink: dict | None = None) -> None:
        """SPEC §4 propagation: views holding a valid leaf for gfn take the host's new entry.
        During replay (``v``, the acting vCPU, or the domain's counters ``sink``) each rewritten
        view may cost an EPT sync."""
        if not self.d.altp2m:
            return
        host_leaf, host_order = self.host.valid_leaf(gfn)
        for index in sorted(self.views):
            view = self.views[index]
            held = view.valid_leaf(gfn)
            if held is None:
                continue
            if v is not None:
                self._sync(v, held)
            elif sink is not None and ACCESS_PERMITS[held[0].access]:
                sink["ept_syncs"] += 1
            leaf = Leaf(
                mfn_at(host_leaf, host_order, gfn), host_leaf.type, host_leaf.access, held[0].sve
            )
            self._splits(view.write(gfn, 0, leaf))

    def _prepopulate(self, view: P2M, gfn: int) -> None:
        """Copy the whole host leaf covering a RAM gfn into ``view`` at the host order."""
        host_leaf, order = self._host_ram(gfn)
        access = view.default_access if self.d.xen >= (4, 22) else host_leaf.access
        self._splits(view.write(gfn, order, Leaf(host_leaf.mfn, host_leaf.type, access, 1)))

    def _effective(self, view: P2M, gfn: int) -> tuple[int, str, str] | None:
        """(mfn, type, access) of the view's valid leaf for gfn, else of the host RAM leaf."""
        found = view.valid_leaf(gfn) or self._host_ram(gfn)
        if found is None:
            return None
        leaf, order = found
        return mfn_at(leaf, order, gfn), leaf.type, leaf.access

    # ----------------------------------------------------------------- setup (SPEC §4)
    def run_setup(self) -> None:
        for op in self.p.setup:
            getattr(self, "_op_" + op.op)(op)
        self._split_sink = None  # set per row from now on

    def _op_set_mem_access(self, op) -> None:
        for g in self._gfns(op.gfns):
            if op.view == 0:
                if self._host_ram(g) is None:
                    self.setup_ctr["setup_skipped"] += 1
                else:
                    self._host_write_4k(g, access=op.access)
                continue
            view = self.views[op.view]
            if view.valid_leaf(g) is not None:
                self._splits(view.rewrite_4k(g, access=op.access))
                continue
            host = self._host_ram(g)
            if host is None:
                self.setup_ctr["setup_skipped"] += 1
                continue
            self._prepopulate(view, g)
            # Xen writes the 4 KiB leaf from the host entry it looked up (not by reading the
            # view again: a prepopulated superpage that permits nothing is invisible, §3)
            host_leaf, order = host
            self._splits(
                view.write(g, 0, Leaf(mfn_at(host_leaf, order, g), host_leaf.type, op.access, 1))
            )

    def _op_change_gfn(self, op) -> None:
        view = self.views[op.view]
        olds = self._gfns(op.gfns)
        if op.new is None:
            for g in olds:
                if view.valid_leaf(g) is not None:
                    self._splits(view.rewrite_4k(g, valid=False))
            return
        news = self._gfns(op.new)
        if len(news) == 1:
            pairs = [(g, news[0]) for g in olds]
        elif len(news) >= len(olds):
            pairs = list(zip(olds, news, strict=False))
        else:
            raise PolicyError(f"{op.where}: {len(olds)} old gfns but only {len(news)} new gfns")
        for old, new in pairs:
            if view.valid_leaf(old) is None:
                if self._host_ram(old) is None:
                    raise PolicyError(f"{op.where}: old gfn {old:#x} is not host RAM")
                self._prepopulate(view, old)
            entry = self._effective(view, new)
            if entry is None:
                raise PolicyError(
                    f"{op.where}: new gfn {new:#x} has no entry in the view or the host"
                )
            mfn, typ, access = entry
            self._splits(view.write(old, 0, Leaf(mfn, typ, access, 1)))
            view.remap_min = new if view.remap_min is None else min(view.remap_min, new)
            view.remap_max = new if view.remap_max is None else max(view.remap_max, new)

    def _op_set_suppress_ve(self, op) -> None:
        bit = int(op.suppress)
        for g in self._gfns(op.gfns):
            if op.view == 0:
                if self._host_ram(g) is None:
                    self.setup_ctr["setup_skipped"] += 1
                else:
                    self._host_write_4k(g, sve=bit)
                continue
            view = self.views[op.view]
            entry = self._effective(view, g)  # no superpage prepopulate here
            if entry is None:
                raise PolicyError(f"{op.where}: gfn {g:#x} has no entry in the view or the host")
            mfn, typ, access = entry
            self._splits(view.write(g, 0, Leaf(mfn, typ, access, bit)))

    def _op_set_visibility(self, op) -> None:
        # Visibility only gates guest VMFUNC and switch_p2m, both checked by parse_policy.
        self.visible[op.view] = op.visible

    def _op_add_ram(self, op) -> None:
        for g in self._gfns(op.gfns):
            if self._host_ram(g) is None:
                self._splits(
                    self.host.write(g, 0, Leaf(g + MFN_OFFSET, RAM_RW, self.d.host_access, 1))
                )
                self._propagate(g)

    def _op_write_breakpoints(self, op) -> None:
        """SPEC §4: an INT3 at each address in the frame ``op.view``'s effective entry maps."""
        view = self.views[op.view]
        for a in self.bp_addresses:
            g = a >> 12
            if op.view != 0 and view.valid_leaf(g) is None and self._host_ram(g) is not None:
                self._prepopulate(view, g)
            found = view.valid_leaf(g) or self._host_ram(g)
            if found is None:
                self.setup_ctr["setup_skipped"] += 1
                continue
            leaf, order = found
            self.breakpoints.add((mfn_at(leaf, order, g), a & 0xFFF))

    def _op_switch_p2m(self, op) -> None:
        self.start_view = op.view

    def _op_enable_notify(self, op) -> None:
        if op.vcpus is None:
            self.notify = None
        elif self.notify is not None:
            self.notify |= set(op.vcpus)

    # ----------------------------------------------------------------- replay (SPEC §5-§6)
    def run(
        self,
        gfn: np.ndarray,
        access: np.ndarray,
        vcpu: np.ndarray,
        insn: np.ndarray | None,
        op: np.ndarray,
        arg: np.ndarray,
        boff: np.ndarray,
    ) -> None:
        """Every row in trace order; ``op``/``arg`` control rows, ``boff`` each row's byte
        offset in its page (-1 unknown)."""
        self.cpus = {
            v: VcpuState(self.start_view, self.notify is None or v in self.notify)
            for v in self.vcpu_ids
        }
        for row in range(len(gfn)):
            o = int(op[row])
            if o >= 3:
                self._split_sink = (self.domain_ctr, "superpage_splits")
                self.domain_ctr["control_records"] += 1
                self._host_change(o, int(gfn[row]))
                continue
            v = int(vcpu[row])
            st = self.cpus[v]
            c = self.cpu_ctr[v]
            self._split_sink = (c, "superpage_splits")
            ident = int(insn[row]) if insn is not None else row
            if st.insn is None or ident != st.insn:
                if st.insn is not None:
                    self._end_instruction(v)
                st.insn = ident
                st.rows = []
                st.restarts = 0
                st.completed = []
                c["instructions"] += 1
            st.rows.append(
                (
                    row,
                    int(gfn[row]),
                    access_kind(int(access[row])),
                    o,
                    int(arg[row]),
                    int(boff[row]),
                )
            )
            if o:
                c["control_records"] += 1
                self._control(v, o, int(arg[row]))
                continue
            c["records"] += 1
            if st.emulating:
                c["records_emulated"] += 1
                continue
            if not self._execute(v):
                return
        for v in self.vcpu_ids:
            if self.cpus[v].insn is not None:
                self._split_sink = (self.cpu_ctr[v], "superpage_splits")
                self._end_instruction(v)

    def _control(self, v: int, o: int, value: int) -> None:
        """SPEC §6.5: a guest VMFUNC (op 1) or CR3 write (op 2) takes effect; no restart."""
        st = self.cpus[v]
        c = self.cpu_ctr[v]
        if o == 1:
            if st.ve_enabled and value in self.views and self.visible.get(value, False):
                c["guest_vmfuncs"] += 1
                self._switch(v, value, "switches_vmfunc")
            else:
                c["vmfunc_exits"] += 1
            return
        c["cr3_writes"] += 1
        rules = self.p.on_cr3
        if rules is not None:
            c["cr3_exits"] += 1
            if not rules.onchangeonly or st.cr3 != value:
                if rules.sync:
                    c["cr3_events"] += 1
                    for values, other, to in self.cr3_rules:
                        if other or value in values:
                            self._switch(v, to, "switches_vm_event")
                            break
                else:
                    c["async_events"] += 1
        st.cr3 = value

    def _host_change(self, o: int, g: int) -> None:
        """SPEC §6.5: host drop (op 3) or map (op 4) of gfn g, counted for the domain."""
        d = self.domain_ctr
        old = self.host.valid_leaf(g)
        if old is not None and ACCESS_PERMITS[old[0].access]:
            d["ept_syncs"] += 1
        if o == 4:
            sve = old[0].sve if old is not None else 1
            self._splits(
                self.host.write(g, 0, Leaf(g + MFN_OFFSET, RAM_RW, self.d.host_access, sve))
            )
            self._propagate(g, None, d)
            d["host_maps"] += 1
            return
        self._splits(
            self.host.write(g, 0, Leaf(0, RAM_RW, "n", old[0].sve if old else 1, valid=False))
        )
        d["host_drops"] += 1
        if not self.d.altp2m:
            return
        hit = None
        for index in sorted(self.views):
            view = self.views[index]
            if view.remap_min is not None and view.remap_min <= g <= view.remap_max:
                if hit is None:
                    hit = index
                    self._reset(index)
                    continue
                for other in sorted(self.views):
                    if other != hit:
                        self._reset(other)
                return
            held = view.valid_leaf(g)
            if held is not None:
                if ACCESS_PERMITS[held[0].access]:
                    d["ept_syncs"] += 1
                self._splits(view.rewrite_4k(g, valid=False))

    def _reset(self, index: int) -> None:
        """Reset a view: every entry gone, remap interval cleared, max_mapped kept."""
        view = self.views[index]
        view.root = {}
        view.remap_min = view.remap_max = None
        self.domain_ctr["view_resets"] += 1
        self.view_ctr[index]["resets"] += 1

    def _execute(self, v: int) -> bool:
        """Execute the instruction's newest row (SPEC §5): attempts, restarting the whole
        instruction from its first row as often as an attempt asks (its control rows take
        effect again on each pass). False: replay stops."""
        st = self.cpus[v]
        c = self.cpu_ctr[v]
        last = len(st.rows) - 1
        j = last
        while True:
            row, g, kind, o, value, boff = st.rows[j]
            if o:
                self._control(v, o, value)
                j += 1
                continue
            outcome = self._attempt(row, v, g, kind, j == 0, boff)
            if outcome == DONE:
                if j == last:
                    return True
                j += 1
            elif outcome == EMULATED:
                # this row and the rest of the instruction complete unchecked; its control rows
                # take effect (Xen emulates VMFUNC and mov cr3)
                c["records_emulated"] += 1
                for r in st.rows[j + 1 :]:
                    if r[3]:
                        self._control(v, r[3], r[4])
                    else:
                        c["records_emulated"] += 1
                st.emulating = True
                return True
            elif outcome == CRASH:
                self.crash_record = row
                return False
            else:
                if st.restarts == MAX_RESTARTS:
                    self.livelock_record = row
                    return False
                st.restarts += 1
                c["restarts"] += 1
                # completions of the abandoned pass do not count (SPEC §5: final pass only)
                for view in st.completed:
                    self.view_ctr[view]["records_completed"] -= 1
                st.completed = []
                j = 0

    def _end_instruction(self, v: int) -> None:
        """SPEC §6.3: finish a pending single-step, then a #VE step, then clear the flags."""
        st = self.cpus[v]
        c = self.cpu_ctr[v]
        if st.singlestep is not None:
            back, fast = st.singlestep
            st.singlestep = None
            c["mtf_exits"] += 1
            if fast:
                self._switch(v, back, "switches_fast_ss")
            else:
                c["singlestep_events"] += 1
                self._switch(v, back, "switches_vm_event")
        if st.ve_return is not None:
            self._switch(v, st.ve_return, "switches_vmfunc")
            st.ve_return = None
        st.ve_busy = False
        st.emulating = False

    def _switch(self, v: int, to: int, counter: str) -> None:
        """Move vCPU v to view ``to``; counted only when the view changes."""
        st = self.cpus[v]
        if st.view != to:
            st.view = to
            self.cpu_ctr[v][counter] += 1
            self.view_ctr[to]["switches_in"] += 1

    def _sync(self, v: int, old: tuple[Leaf, int] | None) -> None:
        """SPEC §5 EPT syncs: rewriting or removing a valid entry that permitted something
        flushes that p2m on the other CPUs (one per p2m and step; every caller writes one
        p2m once per step)."""
        if old is not None and ACCESS_PERMITS[old[0].access]:
            self.cpu_ctr[v]["ept_syncs"] += 1

    def _attempt(
        self, row: int, v: int, g: int, kind: str, first: bool = False, boff: int = -1
    ) -> str:
        """One attempt of SPEC §5 steps 1-8 for vCPU v touching gfn g (``first``: the
        instruction's first row; ``boff``: its byte offset in the page, -1 unknown)."""
        st = self.cpus[v]
        c = self.cpu_ctr[v]
        V = st.view if self.d.altp2m else 0
        p2m = self.views[V]
        leaf, order = p2m.find(g)  # step 1
        hw_valid = leaf is not None and leaf.valid
        sp_exec_fault = hw_valid and kind == "x" and order > 0 and not self.d.exec_sp
        if hw_valid and permits(leaf, kind) and not sp_exec_fault:  # step 2
            if (
                kind == "x"
                and first
                and boff >= 0
                and (mfn_at(leaf, order, g), boff) in self.breakpoints
            ):
                return self._breakpoint(v, V, g)
            self.view_ctr[V]["records_completed"] += 1
            st.completed.append(V)
            return DONE
        sve = leaf.sve if leaf is not None else 1  # step 3
        if st.ve_enabled and sve == 0:
            if not st.ve_busy:
                return self._deliver_ve(v, V, g)
            c["ve_blocked"] += 1
        c["ept_exits"] += 1  # step 4
        self.view_ctr[V]["ept_exits"] += 1
        self.gfn_ctr[(V, g)]["ept_exits"] += 1
        if p2m.valid_leaf(g) is None:  # Xen's lookup: invisible superpages are not there
            host = self._host_ram(g)
            if host is None:  # step 6
                c["mmio_accesses"] += 1
                return DONE
            self._lazy_copy(v, V, g, *host)  # step 5
            return RESTART
        if not permits(leaf, kind):  # step 7
            return self._access_violation(row, v, V, g, kind, leaf)
        self._sync(v, (leaf, order))  # step 8
        p2m.rewrite_4k(g)
        c["shatters"] += 1  # the split inside a shatter is not a superpage_split
        return RESTART

    def _lazy_copy(self, v: int, V: int, g: int, host_leaf: Leaf, host_order: int) -> None:
        # Only views get here: with altp2m off the host is V and has a valid leaf for RAM.
        view = self.views[V]
        order = min(host_order, view.hole_order(g)) if self.d.xen >= (4, 17) else host_order
        base = _base(g, order)
        access = view.default_access if self.d.xen >= (4, 19) else host_leaf.access
        leaf = Leaf(mfn_at(host_leaf, host_order, base), host_leaf.type, access, 1)
        if isinstance(view.entry_at(base, order), dict):
            # replacing a table drops the entries below it (only before 4.17 can the copy's
            # slot hold one): a present entry rewritten, so a sync
            self.cpu_ctr[v]["ept_syncs"] += 1
        self._splits(view.write(base, order, leaf))
        c = self.cpu_ctr[v]
        pages = 1 << order
        c["lazy_copies"] += 1
        c[{0: "lazy_copies_4k", 9: "lazy_copies_2m", 18: "lazy_copies_1g"}[order]] += 1
        c["lazy_copy_pages"] += pages
        self.view_ctr[V]["lazy_copies"] += 1
        self.view_ctr[V]["lazy_copy_pages"] += pages
        self.gfn_ctr[(V, g)]["lazy_copies"] += 1

    def _rewrite(self, v: int, p2m: P2M, g: int, access: str) -> None:
        """A replay-time 4 KiB access rewrite of the valid leaf covering g in one p2m."""
        self._sync(v, p2m.valid_leaf(g))
        self._splits(p2m.rewrite_4k(g, access=access))
        self.cpu_ctr[v]["access_changes"] += 1

    def _access_violation(self, row: int, v: int, V: int, g: int, kind: str, leaf: Leaf) -> str:
        """SPEC §5 step 7."""
        c = self.cpu_ctr[v]
        p2m = self.views[V]
        c["access_violations"] += 1
        self.view_ctr[V]["access_violations"] += 1
        self.gfn_ctr[(V, g)]["viol_" + kind] += 1
        if leaf.access == "rx2rw" and kind == "w":
            self._rewrite(v, p2m, g, "rw")
            return RESTART
        if leaf.access == "n2rwx":
            self._rewrite(v, p2m, g, "rwx")
        if not self.d.monitor:
            if self.d.access_required:
                return CRASH
            if leaf.access != "n2rwx":
                self._rewrite(v, p2m, g, "rwx")
            return RESTART
        if leaf.access == "n2rwx":
            c["async_events"] += 1
            return RESTART
        c["mem_access_events"] += 1
        return self._respond(row, v, V, g, kind)

    def _breakpoint(self, v: int, V: int, g: int) -> str:
        """SPEC §6.4: the #BP exit, the breakpoint event, the [on_breakpoint] response."""
        c = self.cpu_ctr[v]
        c["int3_exits"] += 1
        self.view_ctr[V]["int3_exits"] += 1
        self.gfn_ctr[(V, g)]["int3_exits"] += 1
        c["breakpoint_events"] += 1
        resp = self.p.on_breakpoint
        if resp.action == "emulate":
            c["emulations"] += 1
            return EMULATED
        self._step(v, V, resp.to, resp.fast)
        return RESTART

    def _step(self, v: int, V: int, to: int, fast: bool) -> None:
        """SPEC §6.1 step: single-step on with return view V, or Xen's flags when it is on."""
        st = self.cpus[v]
        if st.singlestep is None:
            st.singlestep = (V, fast)
        elif not fast:
            st.singlestep = None  # TOGGLE_SINGLESTEP: off; v stays in `to`
        else:
            st.singlestep = (V, True)  # fast: on, with the new return view
        self._switch(v, to, "switches_vm_event")

    def _rule_for(self, V: int, g: int, kind: str):
        for rule in self.p.rules:
            if rule.view is not None and rule.view != V:
                continue
            if rule.kinds is not None and kind not in rule.kinds:
                continue
            if rule.gfns is not None and not any(a <= g <= b for a, b in self.sel[id(rule.gfns)]):
                continue
            return rule
        return None

    def _respond(self, row: int, v: int, V: int, g: int, kind: str) -> str:
        """SPEC §6.1: the monitor's response to a mem_access event."""
        rule = self._rule_for(V, g, kind)
        if rule is None:
            raise ReplayRuntimeError(
                f"row {row}: no on_violation rule matches the {kind} violation of gfn {g:#x} "
                f"in view {self.p.view_name(V)} (vcpu {v})"
            )
        if rule.action == "step":
            self._step(v, V, rule.to, rule.fast)
            return RESTART
        if rule.action == "switch":
            self._switch(v, rule.to, "switches_vm_event")
            return RESTART
        if rule.action == "emulate":
            self.cpu_ctr[v]["emulations"] += 1
            return EMULATED
        # set-access: view 0 (or the host itself) means Xen's set_mem_access on the host.
        if V == 0:
            self._sync(v, self.host.valid_leaf(g))
            self._splits(self.host.rewrite_4k(g, access=rule.access))
            self._propagate(g, v)
            self.cpu_ctr[v]["access_changes"] += 1
        else:
            self._rewrite(v, self.views[V], g, rule.access)
        return RESTART

    def _deliver_ve(self, v: int, V: int, g: int) -> str:
        """SPEC §5 step 3 and §6.2: a #VE to the in-guest agent, no VM exit."""
        st = self.cpus[v]
        self.cpu_ctr[v]["ve_delivered"] += 1
        self.view_ctr[V]["ve_delivered"] += 1
        self.gfn_ctr[(V, g)]["ve_delivered"] += 1
        st.ve_busy = True
        agent = self.p.on_ve
        if agent is None:
            # enable_notify without [on_ve]: no agent acts; the instruction restarts (and,
            # the vCPU now being #VE busy, exits).
            return RESTART
        if agent.action == "vmfunc-step":
            st.ve_return = V
            self._switch(v, agent.to, "switches_vmfunc")
            return RESTART
        if agent.action == "vmfunc-switch":
            self._switch(v, agent.to, "switches_vmfunc")
            return RESTART
        self.cpu_ctr[v]["ve_emulations"] += 1
        return EMULATED

    # ----------------------------------------------------------------- results
    def results(self) -> dict:
        run = {
            "crashed": int(self.crash_record >= 0),
            "crash_record": self.crash_record,
            "livelocked": int(self.livelock_record >= 0),
            "livelock_record": self.livelock_record,
        }
        n = len(self.vcpu_ids)

        def sums(c: dict) -> dict:
            c["vm_events"] = (
                c["mem_access_events"]
                + c["singlestep_events"]
                + c["async_events"]
                + c["breakpoint_events"]
                + c["cr3_events"]
            )
            c["view_switches"] = (
                c["switches_vm_event"] + c["switches_fast_ss"] + c["switches_vmfunc"]
            )
            return c

        vcpus = {}
        for v in self.vcpu_ids:
            c = sums(dict(self.cpu_ctr[v]))
            # each sync of a vCPU's step interrupts every other vCPU of the trace
            c["ept_sync_ipis"] = c["ept_syncs"] * (n - 1)
            c.update(run)
            vcpus[v] = c
        dom = sums(dict(self.domain_ctr))
        dom["ept_sync_ipis"] = dom["ept_syncs"] * n  # host drops and maps interrupt every vCPU
        total = dict.fromkeys(TOTAL_COUNTERS, 0)
        for c in [*list(vcpus.values()), dom]:
            for key in TOTAL_COUNTERS:
                total[key] += c[key]
        total.update(self.setup_ctr, **run)
        views = {}
        for index, p2m in sorted(self.views.items()):
            counts = p2m.leaf_counts()
            views[index] = dict(
                self.view_ctr[index],
                pages_mapped=counts[0] + 512 * counts[9] + (1 << 18) * counts[18],
                leaves_4k=counts[0],
                leaves_2m=counts[9],
                leaves_1g=counts[18],
            )
        gfns = {
            key: dict(c)
            for key, c in sorted(self.gfn_ctr.items())
            if c["ept_exits"] or c["ve_delivered"] or c["int3_exits"]
        }
        return {"total": total, "vcpus": vcpus, "views": views, "gfns": gfns}


def reference_simulate(
    policy: Policy, arrays: dict, *, meta_ram=None, gfn_sets=None, symbols=None, processes=None
) -> dict:
    """Replay ``arrays`` (gfn or gpa, access, optional vcpu, insn, ip, op, arg) under
    ``policy``; SPEC §7 counters.

    Raises ``ReplayRuntimeError`` for an unmatched violation and ``PolicyError`` for a setup
    op Xen would refuse; a crash or a livelock is a result.
    """
    gpa = arrays.get("gpa")
    gfn = (
        (np.asarray(gpa, dtype=np.uint64) >> np.uint64(12))
        if gpa is not None
        else np.asarray(arrays["gfn"], dtype=np.uint64)
    )
    n = len(gfn)
    access = np.asarray(arrays["access"], dtype=np.uint8)
    vcpu = (
        np.asarray(arrays["vcpu"], dtype=np.uint16) if "vcpu" in arrays else np.zeros(n, np.uint16)
    )
    insn = np.asarray(arrays["insn"], dtype=np.uint64) if "insn" in arrays else None
    op = (
        np.asarray(arrays["op"], dtype=np.uint8)
        if arrays.get("op") is not None
        else np.zeros(n, np.uint8)
    )
    arg = (
        np.asarray(arrays["arg"], dtype=np.uint64)
        if arrays.get("arg") is not None
        else np.zeros(n, np.uint64)
    )
    if gpa is not None:
        boff = [int(a) & 0xFFF for a in gpa]
    elif arrays.get("ip") is not None:
        boff = [int(i) & 0xFFF for i in arrays["ip"]]
    else:
        boff = [-1] * n
    facts = facts_from_arrays(
        dict(arrays, gfn=gfn),
        meta_ram=meta_ram,
        gfn_sets=gfn_sets,
        symbols=symbols,
        processes=processes,
        insn_stats=policy.breakpoints is not None,
    )
    ram, resolved = resolve_all(policy, facts)
    # A split 1 GiB leaf is 262,144 tuples; the cyclic GC would rescan them again and again
    # (they hold no cycles), tripling the run time.
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        replay = Replay(
            policy, ram, resolved.ranges, sorted({int(vcpu[r]) for r in range(n) if op[r] < 3})
        )
        replay.bp_addresses = [int(a) for a in resolved.breakpoints]
        replay.cr3_rules = [(set(values), other, to) for values, other, to in resolved.cr3_rules]
        replay.run_setup()
        replay.run(gfn, access, vcpu, insn, op, arg, boff)
        out = replay.results()
    finally:
        if gc_was_on:
            gc.enable()
    out["warnings"] = list(resolved.warnings)
    return out
