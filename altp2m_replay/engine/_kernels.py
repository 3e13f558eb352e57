"""Numba kernels: EPT-shaped p2m trees in flat arrays and the per-access procedure of SPEC §5.

Everything here takes NumPy arrays and scalars only. All state lives in arrays owned by the
driver (``simulate.py``), so a run can stop at any row boundary (to grow a pool, or at the end
of a batch) and carry on with identical results.

**p2m trees.** Every p2m (index 0 = host, 1 + i = view i) is a 4-level radix tree over a shared
node pool ``pool`` (int64, shape (capacity, 512)). ``roots[p]`` is the node of its top level.
An entry is one int64:

    bits 0-1  kind: 0 empty, 1 table, 2 valid leaf, 3 removed leaf (keeps its suppress-VE bit)
    bits 2-5  access (p2m_access_t code, 0..9)
    bit  6    suppress-VE
    bits 8-   mfn of the first 4 KiB page (leaf) or node index (table)

Entry levels: 4 (top, 512 GiB slots, tables only), 3 (1 GiB), 2 (2 MiB), 1 (4 KiB). A leaf's
page order follows from its level. The type is always ``ram_rw`` (the only type the host
creates), so it is not stored.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# ---- entry layout
EMPTY = 0
TABLE = 1
LEAF = 2
REMOVED = 3
SVE_BIT = 64
MFN_SHIFT = 8
MFN_OFFSET = 1 << 24  # mfn = gfn + 2^24 for host RAM (SPEC §3)

# ---- counters, per vCPU slot: vc[slot, C_*]
C_RECORDS = 0
C_INSTRUCTIONS = 1
C_EPT_EXITS = 2
C_LAZY = 3
C_LAZY_4K = 4
C_LAZY_2M = 5
C_LAZY_1G = 6
C_LAZY_PAGES = 7
C_VIOLATIONS = 8
C_MEM_ACCESS = 9
C_SINGLESTEP = 10
C_ASYNC = 11
C_VE = 12
C_VE_BLOCKED = 13
C_VE_EMUL = 14
C_MTF = 15
C_SW_EVENT = 16
C_SW_FAST = 17
C_SW_VMFUNC = 18
C_EMULATIONS = 19
C_REC_EMUL = 20
C_ACCESS_CHANGES = 21
C_SPLITS = 22
C_SHATTERS = 23
C_MMIO = 24
C_RESTARTS = 25
C_EPT_SYNCS = 26  # ept_sync_ipis follow from these and the trace's vCPU count (driver)
C_BP_EVENTS = 27
C_CR3_EVENTS = 28
C_INT3 = 29
C_CONTROL = 30
C_CR3_WRITES = 31
C_CR3_EXITS = 32
C_GUEST_VMFUNCS = 33
C_VMFUNC_EXITS = 34
C_HOST_DROPS = 35
C_HOST_MAPS = 36
C_VIEW_RESETS = 37
N_COUNTERS = 38
# vc has one row per vCPU slot and a last row for domain-wide events (control rows op 3 and 4,
# SPEC §7: in the total row only).

# ---- per-view counters: pv[view, V_*]
V_COMPLETED = 0
V_EXITS = 1
V_LAZY = 2
V_LAZY_PAGES = 3
V_VIOLATIONS = 4
V_VE = 5
V_SWITCHES_IN = 6
V_INT3 = 7
V_RESETS = 8
N_VIEW_COUNTERS = 9

# ---- per-gfn table: htab[i] = key (view << 36 | gfn) + 1 (0: empty), then counters G_*.
# One 64-byte row per entry, so an exit touches one cache line of it.
G_EXITS = 1
G_VIOL_R = 2  # + kind (0 r, 1 w, 2 x)
G_VE = 5
G_LAZY = 6
G_INT3 = 7
N_GFN_COUNTERS = 7
H_WIDTH = 8
# ---- per-ip table: itab[i] = ip, ept_exits, ve_delivered, int3_exits (32 bytes). A row is used iff
# a count is nonzero: drain_log fills a row's key and one count together, and every ip value
# is a valid key.
I_IP = 0
I_EXITS = 1
I_VE = 2
I_INT3 = 3
I_WIDTH = 4
# ---- event log: elog[j] = (htab key, event bits E_*, ip). The replay loop appends one entry
# per exit or #VE; drain_log adds them to htab / itab. Appending is a sequential store, where
# updating the tables in place cost a cache miss per exit (about 130 ns of 230 on the bench).
E_EXIT = 1  # event bit b counts into htab column G_EXITS + b
E_VIOL_R = 2  # << kind
E_VE = 16
E_LAZY = 32
E_INT3 = 64
E_HAS_IP = 128  # the row had an ip: count into itab too
LOG_ROWS = 1 << 14

# ---- fast-path cache: pmap[p, g] (uint8) = the kinds (r 1, w 2, x 4) an access to gfn g in
# p2m p completes without leaving the fast path, as last found by a walk; 0 = not known.
# Cached bits are only ever fewer than the tree grants (a split can grant x, never take a
# bit away), and every tree write during replay clears the gfns it covers (forget).

# ---- per-vCPU state: vst[slot, S_*]
S_VIEW = 0
S_VE_EN = 1
S_VE_BUSY = 2
S_SS_ON = 3
S_SS_RET = 4
S_SS_FAST = 5
S_VES_ON = 6
S_VES_RET = 7
S_INSN = 8
S_STARTED = 9
S_EMUL = 10
S_PENDING = (
    11  # 1 while any of SS_ON, VES_ON, VE_BUSY, EMUL, RESTARTS is set: the instruction end has work
)
S_NROWS = 12  # rows of the current instruction (kept while execute waits for room)
S_RESTARTS = 13  # restarts of the current instruction
S_EXEC_J = 14  # where execute resumes: the row of the instruction to attempt next ...
S_EXEC_K = 15  # ... and the batch index it scans from
S_FIRST = 16  # where the instruction's rows are: see first_rows
S_NSPILL = 17  # rows of the instruction spilled into ibuf at earlier batch ends
S_PCOUNT = 18  # completions of the instruction's current pass in the vCPU's current view
S_CR3 = 19  # the vCPU's CR3 as last written ...
S_CR3_SEEN = 20  # ... once it has written one
S_NSEG = 21  # pass segments: completions of this pass in views a control row left (pseg)
N_VCPU_STATE = 22

# ---- Restarts (SPEC §5) execute an instruction again from its first row. Its rows are found
# in the batch (rows of the slot from S_FIRST on), after the ones an earlier batch held, which
# spill_open copied into ibuf[slot, j, B_*] when that batch ended: nothing is stored per row.
B_KEY = 0  # gfn << 3 | kind bit (1 r, 2 w, 4 x)
B_ROW = 1  # global row index
B_IP = 2  # instruction pointer (when the trace has one)
B_ARG = 3  # control rows: arg (their B_KEY is op << 3: kind bit 0)
B_BOFF = 4  # byte offset of the row's address in its page, -1 if unknown
B_WIDTH = 5
MAX_INSN_ROWS = 1024  # SPEC §2: an instruction has at most 1024 rows
# S_FIRST: f >= 0, the instruction began at batch index f; CONT, it began in an earlier batch
# (its rows so far are spilled) and has no row in this batch yet; else -(f + 1), it began in an
# earlier batch and its rows here start at batch index f.
CONT = -(1 << 62)

# ---- global scalars: gs[GS_*]
GS_NFREE = 0
GS_HCOUNT = 1
GS_CRASHED = 2
GS_CRASH_ROW = 3
GS_ERR_ROW = 4
GS_ERR_GFN = 5
GS_SETUP_SPLITS = 6
GS_SETUP_SKIPPED = 7
GS_NEXT_WIN = 8
GS_SPLITS = 9  # scratch: splits done by the last tree write
GS_ICOUNT = 10  # entries in the per-ip table
GS_LOGN = 11  # entries in the event log
GS_LIVELOCKED = 12
GS_LIVELOCK_ROW = 13
GS_RESUME = 14  # 1 + the vCPU slot whose instruction execute left half done for room, else 0
GS_SYNCS = 15  # scratch: p2ms synced by the current step
GS_ERR_VIEW = 16
# 1 when a view may map fewer pages than after setup plus its lazy copies (a reset, a host
# drop or map, a lazy copy over a leaf or a table): the next snapshot counts views exactly
GS_POP_DIRTY = 17
N_GS = 18

# ---- domain scalars: dom[D_*]
D_ALTP2M = 0
D_EXEC_SP = 1
D_MONITOR = 2
D_ACCESS_REQUIRED = 3
D_LAZY_MIN = 4  # xen >= 4.17: lazy copy order min(host, hole)
D_LAZY_DEFAULT = 5  # xen >= 4.19: lazy copies take the view's default access
D_PREPOP_DEFAULT = 6  # xen >= 4.22: prepopulate takes the view's default access
D_VE_ACTION = 7  # -1 none, 0 vmfunc-step, 1 vmfunc-switch, 2 emulate
D_VE_TO = 8
D_HOST_ACCESS = 9
D_WINDOW = 10
D_HEADROOM = 11
D_CR3_ON = 12  # [on_cr3]: CR3-load exiting on
D_CR3_SYNC = 13
D_CR3_ONCHANGE = 14
D_BP_ACTION = 15  # [on_breakpoint]: -1 none, 0 step, 1 emulate
D_BP_TO = 16
D_BP_FAST = 17
N_DOM = 18

# ---- statuses returned to the driver
ST_DONE = 0
ST_NEED_NODES = 1
ST_NEED_HASH = 2
ST_CRASH = 3
ST_UNMATCHED = 4
ST_NO_ENTRY = 6  # setup: change_gfn / set_suppress_ve found no effective entry
ST_NOT_RAM = 7  # setup: change_gfn old is not host RAM
ST_NEED_IPHASH = 8
ST_LIVELOCK = 9
ST_LONG_INSN = 10  # an instruction of more than MAX_INSN_ROWS rows (GS_ERR_ROW names the row)

# Outcomes of one attempt at a row (SPEC §5)
R_DONE = 0
R_RESTART = 1
R_EMULATED = 2
R_CRASH = 3
R_UNMATCHED = 4

# Monitor responses (policy.RESPONSE_CODES).
A_STEP = 0
A_EMULATE = 1
A_SWITCH = 2
A_SET_ACCESS = 3

MAX_RESTARTS = 64  # an instruction restarted more than this livelocks (SPEC §5)
LOG_SLACK = 4  # log entries kept free before a row; execute checks before each attempt

# Which of r(1)/w(2)/x(4) each p2m_access_t permits; rx2rw permits rx, n2rwx nothing.
# A copy of policy.PERMITS (engine/simulate.py asserts they agree): Numba freezes a global
# array into the compiled kernel and its cache only notices changes to this file, so an
# imported table could change without the cached kernels being rebuilt.
PERMITS = np.array([0, 1, 2, 3, 4, 5, 6, 7, 5, 0], dtype=np.int64)
# The kind of an access value (SPEC §2) as a permission bit: x if bit 4, else w if bit 2, else r.
KIND_BIT = np.array([1, 1, 2, 2, 4, 4, 4, 4], dtype=np.int64)
KIND_OF_BIT = np.array([0, 0, 1, 0, 2], dtype=np.int64)


PREFETCH_AHEAD = 16  # log entries between a table row's prefetch and its update (drain_log)


def _item_pointer(context, builder, aty, value, row, col):
    """Code generation: a pointer to ``value[row, col]`` of 2-D array type ``aty``; ``row`` an
    intp value, ``col`` a constant."""
    arr = context.make_array(aty)(context, builder, value)
    idx = [row, context.get_constant(types.intp, col)]
    return cgutils.get_item_pointer(context, builder, aty, arr, idx)


@intrinsic
def prefetch_row(typingctx, table, row):
    """Hint the CPU to start loading row ``row`` of a 2-D C-ordered array into cache.

    Only a hint (LLVM's ``llvm.prefetch``, for a write): it never changes results.
    """

    def codegen(context, builder, sig, args):
        ptr = _item_pointer(context, builder, sig.args[0], args[0], args[1], 0)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
            "llvm.prefetch.p0i8",
        )
        # rw 1 (write), locality 3 (keep in all cache levels), cache type 1 (data)
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(1), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(table, row), codegen


# ---- the arrays execute reads, as one table of addresses and shapes
# A call passes every array argument as its whole descriptor (7 to 11 machine words): the
# ~30 arrays execute needs made each call ~250 words of stack traffic, about 45 ns of an exit
# that costs 150-250 ns. replay_batch writes each array's address and shape into ``xtab``
# (int64 (N_X, 4)) once per call, and execute rebuilds the arrays from it (array1, array2,
# array3).
(
    X_POOL,
    X_GS,
    X_ROOTS,
    X_MAXM,
    X_ACTIVE,
    X_DFLT,
    X_DOM,
    X_VST,
    X_VC,
    X_PV,
    X_ELOG,
    X_HTAB,
    X_ITAB,
    X_RULES,
    X_GRANGES,
    X_IBUF,
    X_PMAP,
    X_GFN,
    X_ACCESS,
    X_VCPU,
    X_IP,
    X_OP,
    X_ARG,
    X_BOFF,
    X_BPMFN,
    X_BPKEY,
    X_CR3R,
    X_VIS,
    X_PSEG,
    X_LUT,
    N_X,
) = range(31)


@intrinsic
def note_array(typingctx, xtab, x, arr):
    """Row ``x`` of ``xtab``: ``arr``'s data address, then its shape. ``arr`` must be
    C-contiguous: execute rebuilds it from these alone (Replayer.feed checks).

    Code, not a jitted function: 30 inlined copies of one in replay_batch, or its variant per
    array type, added 6-12 s to a cold compile."""

    def codegen(context, builder, sig, args):
        tabty, xty, aty = sig.args
        a = context.make_array(aty)(context, builder, args[2])
        x = context.cast(builder, args[1], xty, types.intp)
        address = builder.ptrtoint(a.data, ir.IntType(64))
        builder.store(address, _item_pointer(context, builder, tabty, args[0], x, 0))
        for d, dim in enumerate(cgutils.unpack_tuple(builder, a.shape, aty.ndim)):
            builder.store(dim, _item_pointer(context, builder, tabty, args[0], x, 1 + d))
        return context.get_dummy_value()

    return types.void(xtab, x, arr), codegen


def _array_reader(ndim: int):
    """An intrinsic (xtab, x, like) -> the C-ordered ``ndim``-D array of ``like``'s dtype that
    row ``x`` of ``xtab`` describes, built in place as numba.carray builds one (carray itself
    needs the runtime these kernels are compiled without)."""

    def typer(typingctx, xtab, x, like):
        dtype = types.unliteral(like)
        aty = types.Array(dtype, ndim, "C")

        def codegen(context, builder, sig, args):
            # imported here: codegen runs only when compiling, and importing
            # numba.np.arrayobj costs 60 ms of every replay's start-up
            from numba.np.arrayobj import populate_array

            tabty, xty, _ = sig.args
            x = context.cast(builder, args[1], xty, types.intp)
            cell = [_item_pointer(context, builder, tabty, args[0], x, c) for c in range(1 + ndim)]
            dims = [builder.load(c) for c in cell[1:]]
            itemsize = context.get_constant(
                types.intp, context.get_abi_sizeof(context.get_data_type(dtype))
            )
            strides = [itemsize]
            for d in range(ndim - 1, 0, -1):
                strides.insert(0, builder.mul(strides[0], dims[d]))
            ary = context.make_array(aty)(context, builder)
            data = builder.inttoptr(
                builder.load(cell[0]), context.get_data_type(dtype).as_pointer()
            )
            populate_array(
                ary, data=data, shape=dims, strides=strides, itemsize=itemsize, meminfo=None
            )
            return ary._getvalue()

        return aty(xtab, x, like), codegen

    typer.__name__ = f"array{ndim}"
    return intrinsic(typer)


array1 = _array_reader(1)
array2 = _array_reader(2)
array3 = _array_reader(3)


# --------------------------------------------------------------------------- entries
@njit(cache=True)
def make_leaf(mfn, access, sve):
    return (mfn << MFN_SHIFT) | (sve << 6) | (access << 2) | LEAF


@njit(cache=True)
def e_access(e):
    return (e >> 2) & 15


@njit(cache=True)
def e_sve(e):
    return (e >> 6) & 1


@njit(cache=True)
def level_order(level):
    """Page order of a leaf at entry ``level``, which is also the gfn shift of its index."""
    return 9 * (level - 1)


@njit(cache=True)
def with_access(e, access):
    return (e & ~np.int64(15 << 2)) | (access << 2)


@njit(cache=True)
def with_sve(e, sve):
    return (e & ~np.int64(SVE_BIT)) | (sve << 6)


@njit(cache=True)
def piece_at(e, level, g):
    """The 4 KiB leaf for gfn ``g`` inside leaf ``e`` of entry ``level``."""
    off = g & ((np.int64(1) << level_order(level)) - 1)
    return e + (off << MFN_SHIFT)


# --------------------------------------------------------------------------- trees
@njit(cache=True, inline="always")
def walk(pool, root, g):
    """Walk one p2m for gfn ``g``: (entry, level) of the leaf, or (0, level) where it stops."""
    e = pool[root, (g >> 27) & 511]
    if e & 3 != TABLE:
        return e, 4
    e = pool[e >> MFN_SHIFT, (g >> 18) & 511]
    if e & 3 != TABLE:
        return e, 3
    e = pool[e >> MFN_SHIFT, (g >> 9) & 511]
    if e & 3 != TABLE:
        return e, 2
    return pool[e >> MFN_SHIFT, g & 511], 1


@njit(cache=True, inline="always")
def visible(e, lv):
    """Whether Xen's own lookups see entry ``e`` found at ``lv`` as a valid leaf: a 2 MiB or
    1 GiB leaf whose bits permit nothing is an empty slot to them (SPEC §3)."""
    return e & 3 == LEAF and (lv == 1 or PERMITS[(e >> 2) & 15] != 0)


@njit(cache=True, inline="always")
def xwalk(pool, root, g):
    """Xen's lookup of ``g``: as ``walk``, but an invisible superpage reads as an empty slot
    at its level (entry 0)."""
    e, lv = walk(pool, root, g)
    if e & 3 == LEAF and not visible(e, lv):
        return np.int64(0), lv
    return e, lv


@njit(cache=True, inline="always")
def permits_any(e, lv):
    """Whether a rewrite or removal of entry ``e`` (at ``lv``) needs an EPT sync: a valid leaf
    whose bits permitted something."""
    return e & 3 == LEAF and PERMITS[(e >> 2) & 15] != 0


@njit(cache=True, nogil=True)
def alloc_node(pool, gs):
    n = gs[GS_NFREE]
    gs[GS_NFREE] = n + 1
    pool[n, :] = 0
    return n


@njit(cache=True)
def split_once(pool, gs, node, idx, level):
    """Turn the leaf at ``pool[node, idx]`` (entry ``level``) into a table of 512 pieces."""
    e = pool[node, idx]
    child = alloc_node(pool, gs)
    step = np.int64(1) << level_order(level - 1)
    for i in range(512):
        pool[child, i] = e + ((i * step) << MFN_SHIFT)
    pool[node, idx] = (child << MFN_SHIFT) | TABLE
    return child


@njit(cache=True)
def split_leaf(pool, gs, node, idx, level, target):
    """Split the leaf at ``pool[node, idx]`` on the way to entry level ``target``; returns splits.

    A 1 GiB leaf taken to 4 KiB splits all 512 of its 2 MiB pieces too, as Xen's
    ``ept_split_super_page`` does (513 splits). Not recursive: Numba's cache mishandles
    self-recursive functions.
    """
    child = split_once(pool, gs, node, idx, level)
    if level == 3 and target == 1:
        for i in range(512):
            split_once(pool, gs, child, i, 2)
        return 513
    return 1


@njit(cache=True)
def set_leaf(pool, gs, roots, maxm, p, g, level, entry):
    """Write ``entry`` as the leaf of entry ``level`` covering ``g`` in p2m ``p``.

    Creates missing tables, splits a larger leaf above it (splits land in gs[GS_SPLITS]),
    and replaces whatever subtree the slot held, as ``ept_set_entry`` does. A larger leaf
    Xen does not see (SPEC §3) is not split: it becomes an empty table.
    """
    node = roots[p]
    for lv in range(4, level, -1):
        idx = (g >> level_order(lv)) & 511
        e = pool[node, idx]
        k = e & 3
        if k == TABLE:
            node = e >> MFN_SHIFT
        elif k == LEAF and lv <= 3 and visible(e, lv):
            gs[GS_SPLITS] += split_leaf(pool, gs, node, idx, lv, level)
            node = pool[node, idx] >> MFN_SHIFT
        else:
            child = alloc_node(pool, gs)
            pool[node, idx] = (child << MFN_SHIFT) | TABLE
            node = child
    pool[node, (g >> level_order(level)) & 511] = entry
    if entry & 3 == LEAF:
        last = g | ((np.int64(1) << level_order(level)) - 1)
        if last > maxm[p]:
            maxm[p] = last


@njit(cache=True)
def write_4k(pool, gs, roots, maxm, p, g, entry):
    """A 4 KiB write (splitting a covering superpage); returns the number of splits."""
    gs[GS_SPLITS] = 0
    set_leaf(pool, gs, roots, maxm, p, g, 1, entry)
    return gs[GS_SPLITS]


@njit(cache=True)
def propagate(pool, gs, roots, maxm, active, g, host_entry):
    """Push the host's new 4 KiB entry for ``g`` into every active view holding ``g``.

    Each view keeps its own suppress-VE bit. Returns splits; gs[GS_SYNCS] counts the views
    whose rewritten entry permitted something.
    """
    splits = 0
    for p in range(1, len(roots)):
        if not active[p]:
            continue
        e, lv = xwalk(pool, roots[p], g)
        if e & 3 == LEAF:
            gs[GS_SYNCS] += permits_any(e, lv)
            splits += write_4k(pool, gs, roots, maxm, p, g, with_sve(host_entry, e_sve(e)))
    return splits


@njit(cache=True)
def host_set(pool, gs, roots, maxm, active, g, access, sve):
    """View-0 ``set_mem_access`` / ``set_suppress_ve``: host 4 KiB write, then propagate.

    ``access`` or ``sve`` of -1 keeps the current value. Returns (done, splits);
    gs[GS_SYNCS] grows by the p2ms (host included) whose rewritten entry permitted something.
    """
    e, lv = xwalk(pool, roots[0], g)
    if e & 3 != LEAF:
        return False, 0
    gs[GS_SYNCS] += permits_any(e, lv)
    new = piece_at(e, lv, g)
    if access >= 0:
        new = with_access(new, access)
    if sve >= 0:
        new = with_sve(new, sve)
    splits = write_4k(pool, gs, roots, maxm, 0, g, new)
    splits += propagate(pool, gs, roots, maxm, active, g, new)
    return True, splits


@njit(cache=True)
def prepopulate(pool, gs, roots, maxm, dflt, dom, p, g):
    """Copy the host leaf covering ``g`` into view p2m ``p`` at the host order (SPEC §4).

    Returns (entry for g, splits) or (-1, 0) when the host does not map ``g``.
    """
    e, lv = xwalk(pool, roots[p], g)
    if e & 3 == LEAF:
        return piece_at(e, lv, g), 0
    h, hl = xwalk(pool, roots[0], g)
    if h & 3 != LEAF:
        return np.int64(-1), 0
    access = dflt[p] if dom[D_PREPOP_DEFAULT] else e_access(h)
    base = g & ~((np.int64(1) << level_order(hl)) - 1)
    copy = with_sve(with_access(h, access), 1)
    gs[GS_SPLITS] = 0
    set_leaf(pool, gs, roots, maxm, p, base, hl, copy)
    return piece_at(copy, hl, g), gs[GS_SPLITS]


@njit(cache=True)
def effective_entry(pool, roots, p, g):
    """The 4 KiB entry for ``g`` Xen's setup ops use: view ``p``'s valid leaf, else the host's
    RAM leaf (no prepopulate), else -1."""
    e, lv = xwalk(pool, roots[p], g)
    if e & 3 == LEAF:
        return piece_at(e, lv, g)
    h, hl = xwalk(pool, roots[0], g)
    if h & 3 == LEAF:
        return piece_at(h, hl, g)
    return np.int64(-1)


@njit(cache=True, nogil=True)
def tree_stats(pool, root):
    """(pages_mapped, leaves_4k, leaves_2m, leaves_1g) of one p2m."""
    pages = 0
    l4k = 0
    l2m = 0
    l1g = 0
    for a in range(512):
        ea = pool[root, a]
        if ea & 3 != TABLE:
            continue
        na = ea >> MFN_SHIFT
        for b in range(512):
            eb = pool[na, b]
            kb = eb & 3
            if kb == LEAF:
                l1g += 1
                pages += 1 << 18
            elif kb == TABLE:
                nb = eb >> MFN_SHIFT
                for c in range(512):
                    ec = pool[nb, c]
                    kc = ec & 3
                    if kc == LEAF:
                        l2m += 1
                        pages += 512
                    elif kc == TABLE:
                        nc = ec >> MFN_SHIFT
                        for d in range(512):
                            if pool[nc, d] & 3 == LEAF:
                                l4k += 1
                                pages += 1
    return pages, l4k, l2m, l1g


# --------------------------------------------------------------------------- setup
@njit(cache=True, nogil=True)
def map_host(pool, gs, roots, maxm, bases, levels, access, start):
    """Map host RAM pieces from index ``start``: ``bases`` int64 (n,) first gfns,
    ``levels`` int64 (n,) entry levels. Returns (status, index reached)."""
    for i in range(start, len(bases)):
        if pool.shape[0] - gs[GS_NFREE] < 8:
            return ST_NEED_NODES, i
        g = bases[i]
        set_leaf(pool, gs, roots, maxm, 0, g, levels[i], make_leaf(g + MFN_OFFSET, access, 1))
    return ST_DONE, len(bases)


@njit(cache=True, nogil=True)
def setup_gfns(op, pool, gs, roots, maxm, active, dflt, dom, p, gfns, arg, start):
    """Apply one setup op to ``gfns`` (int64 (n,)) from index ``start``.

    op 0 set_mem_access (arg = access), 1 set_suppress_ve (arg = bit), 2 add_ram,
    3 change_gfn to "invalid". Returns (status, index reached).
    """
    for i in range(start, len(gfns)):
        if pool.shape[0] - gs[GS_NFREE] < dom[D_HEADROOM]:
            return ST_NEED_NODES, i
        g = gfns[i]
        if op == 2:
            h, _hl = xwalk(pool, roots[0], g)
            if h & 3 != LEAF:
                set_leaf(
                    pool, gs, roots, maxm, 0, g, 1, make_leaf(g + MFN_OFFSET, dom[D_HOST_ACCESS], 1)
                )
            continue
        if p == 0 and op != 3:
            done, splits = host_set(
                pool, gs, roots, maxm, active, g, arg if op == 0 else -1, arg if op == 1 else -1
            )
            gs[GS_SETUP_SPLITS] += splits
            if not done:
                gs[GS_SETUP_SKIPPED] += 1
            continue
        e, lv = xwalk(pool, roots[p], g)
        if op == 0:
            if e & 3 == LEAF:
                new = with_access(piece_at(e, lv, g), arg)
            else:
                cur, splits = prepopulate(pool, gs, roots, maxm, dflt, dom, p, g)
                gs[GS_SETUP_SPLITS] += splits
                if cur < 0:
                    gs[GS_SETUP_SKIPPED] += 1
                    continue
                new = with_access(cur, arg)
            gs[GS_SETUP_SPLITS] += write_4k(pool, gs, roots, maxm, p, g, new)
        elif op == 1:
            src = effective_entry(pool, roots, p, g)
            if src < 0:
                gs[GS_ERR_GFN] = g
                return ST_NO_ENTRY, i
            gs[GS_SETUP_SPLITS] += write_4k(pool, gs, roots, maxm, p, g, with_sve(src, arg))
        elif op == 3 and e & 3 == LEAF:
            removed = (piece_at(e, lv, g) & ~np.int64(3)) | REMOVED
            gs[GS_SETUP_SPLITS] += write_4k(pool, gs, roots, maxm, p, g, removed)
    return ST_DONE, len(gfns)


@njit(cache=True, nogil=True)
def setup_breakpoints(pool, gs, roots, maxm, dflt, dom, p, addrs, keys, start):
    """``write_breakpoints`` into view p2m ``p`` (SPEC §4): keys[i] = mfn << 12 | offset of
    the frame ``p``'s effective entry maps at addrs[i] (int64 (n,) byte addresses), prepopulating
    a view >= 1 as set_mem_access does; -1 where the gfn is not RAM (setup_skipped)."""
    for i in range(start, len(addrs)):
        if pool.shape[0] - gs[GS_NFREE] < dom[D_HEADROOM]:
            return ST_NEED_NODES, i
        g = addrs[i] >> 12
        if p >= 2:
            cur, splits = prepopulate(pool, gs, roots, maxm, dflt, dom, p, g)
            gs[GS_SETUP_SPLITS] += splits
        else:
            cur = effective_entry(pool, roots, p, g)
        if cur < 0:
            gs[GS_SETUP_SKIPPED] += 1
            keys[i] = -1
        else:
            keys[i] = ((cur >> MFN_SHIFT) << 12) | (addrs[i] & 4095)
    return ST_DONE, len(addrs)


@njit(cache=True, nogil=True)
def setup_change_gfn(pool, gs, roots, maxm, dflt, dom, remap, p, olds, news, start):
    """``change_gfn`` pairs ``olds[i] -> news[i]`` (int64 (n,)) in view p2m ``p``."""
    for i in range(start, len(olds)):
        if pool.shape[0] - gs[GS_NFREE] < dom[D_HEADROOM]:
            return ST_NEED_NODES, i
        old = olds[i]
        new = news[i]
        cur, splits = prepopulate(pool, gs, roots, maxm, dflt, dom, p, old)
        gs[GS_SETUP_SPLITS] += splits
        if cur < 0:
            gs[GS_ERR_GFN] = old
            return ST_NOT_RAM, i
        src = effective_entry(pool, roots, p, new)
        if src < 0:
            gs[GS_ERR_GFN] = new
            return ST_NO_ENTRY, i
        gs[GS_SETUP_SPLITS] += write_4k(pool, gs, roots, maxm, p, old, with_sve(src, 1))
        # the remap interval matters once host drops exist (SPEC §15); kept up to date now
        if new < remap[p, 0]:
            remap[p, 0] = new
        if new > remap[p, 1]:
            remap[p, 1] = new
    return ST_DONE, len(olds)


# --------------------------------------------------------------------------- replay
@njit(cache=True, inline="always")
def fast_bits(e, lv, exec_sp):
    """Kinds the fast path completes on walk result (``e``, ``lv``): a valid leaf's permitted
    kinds, less x on a superpage when exec_sp is off (XSA-304 shatters it)."""
    if e & 3 != LEAF:
        return 0
    return PERMITS[(e >> 2) & 15] & (7 if exec_sp or lv == 1 else 3)


@njit(cache=True, inline="always")
def completes(pmap, pool, root, p, g, kb, exec_sp, bpmfn):
    """Whether an access of kind bit ``kb`` to gfn ``g`` completes in p2m ``p`` (tree ``root``)
    without leaving the fast path: (done, e, lv), the walk's entry and level when it walked.

    The cache answers when it knows the kind; otherwise the tree is walked and the cache
    refilled. 0 <= g: a gfn of 2^63 or more is negative here (traces are checked, but a file
    whose statistics lie can slip one past); the cache is never indexed out of bounds.
    A fetch from a frame holding breakpoints (``bpmfn``, int64 sorted mfns) never completes
    here: the slow path checks whether it traps.
    """
    cached = 0 <= g < pmap.shape[1]
    if cached and pmap[p, g] & kb:
        return True, np.int64(0), 0
    e, lv = walk(pool, root, g)
    bits = fast_bits(e, lv, exec_sp)
    if bits & 4 and len(bpmfn) and sorted_has(bpmfn, piece_at(e, lv, g) >> MFN_SHIFT):
        bits &= 3
    if cached:
        pmap[p, g] = bits
    return (bits & kb) != 0, e, lv


@njit(cache=True, inline="always")
def sorted_has(arr, x):
    """Whether sorted int64 ``arr`` holds ``x`` (binary search)."""
    lo = 0
    hi = len(arr)
    while lo < hi:
        mid = (lo + hi) >> 1
        if arr[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo < len(arr) and arr[lo] == x


@njit(cache=True, inline="always")
def forget(pmap, p, first, count):
    """Clear the fast-path cache of p2m ``p`` for gfns ``first .. first + count - 1``."""
    for g in range(max(first, 0), min(first + count, pmap.shape[1])):
        pmap[p, g] = 0


@njit(cache=True, inline="always")
def log_event(elog, gs, view, g, bits, has_ip, ipv):
    """Append an event of (view, gfn ``g``) to the event log; returns its index."""
    j = gs[GS_LOGN]
    gs[GS_LOGN] = j + 1
    elog[j, 0] = (view << 36) + g + 1
    elog[j, 1] = bits | (E_HAS_IP if has_ip else 0)
    elog[j, 2] = ipv
    return j


@njit(cache=True, nogil=True)
def drain_status(gs, htab, itab):
    """ST_DONE if draining the log keeps both tables at most 3/4 full, else which to grow."""
    if (gs[GS_HCOUNT] + gs[GS_LOGN]) * 4 > htab.shape[0] * 3:
        return ST_NEED_HASH
    if (gs[GS_ICOUNT] + gs[GS_LOGN]) * 4 > itab.shape[0] * 3:
        return ST_NEED_IPHASH
    return ST_DONE


@njit(cache=True, _nrt=False, nogil=True)  # no reference counting, as replay_batch
def drain_log(elog, gs, htab, itab):
    """Add the logged events to the per-gfn and per-ip tables and empty the log.

    The caller makes sure both tables stay at most 3/4 full (drain_status). Rows are
    prefetched PREFETCH_AHEAD entries ahead, so the cache misses of a large table overlap.
    """
    n = gs[GS_LOGN]
    hmask = htab.shape[0] - 1
    imask = itab.shape[0] - 1
    for j in range(n):
        a = j + PREFETCH_AHEAD
        if a < n:
            prefetch_row(htab, hash_row(elog[a, 0], hmask))
            if elog[a, 1] & E_HAS_IP:
                prefetch_row(itab, hash_row(elog[a, 2], imask))
        bits = elog[j, 1]
        h = gfn_slot(htab, gs, elog[j, 0])
        for b in range(N_GFN_COUNTERS):
            htab[h, G_EXITS + b] += (bits >> b) & 1
        if bits & E_HAS_IP:
            r = ip_slot(itab, gs, elog[j, 2])
            itab[r, I_EXITS] += bits & E_EXIT
            itab[r, I_VE] += (bits >> 4) & 1
            itab[r, I_INT3] += (bits >> 6) & 1
    gs[GS_LOGN] = 0


@njit(cache=True, inline="always")
def hash_row(key, mask):
    """Home row of int64 ``key`` in a hash table of ``mask + 1`` rows (multiplicative hash)."""
    return ((key * np.int64(-7046029254386353131)) >> 20) & mask


@njit(cache=True, inline="always")
def gfn_slot(htab, gs, key):
    """Row of ``key`` ((view << 36) + gfn + 1) in the open-addressing per-gfn table,
    inserting it if new."""
    mask = htab.shape[0] - 1
    i = hash_row(key, mask)
    while True:
        k = htab[i, 0]
        if k == key:
            return i
        if k == 0:
            htab[i, 0] = key
            gs[GS_HCOUNT] += 1
            return i
        i = (i + 1) & mask


@njit(cache=True, inline="always")
def ip_slot(itab, gs, ip):
    """Row of instruction pointer ``ip`` (any int64 bit pattern) in the per-ip table."""
    mask = itab.shape[0] - 1
    i = hash_row(ip, mask)
    while True:
        if itab[i, I_EXITS] == 0 and itab[i, I_VE] == 0 and itab[i, I_INT3] == 0:
            itab[i, I_IP] = ip
            gs[GS_ICOUNT] += 1
            return i
        if itab[i, I_IP] == ip:
            return i
        i = (i + 1) & mask


@njit(cache=True, inline="always")
def switch_view(vst, vc, pv, s, to, counter):
    if vst[s, S_VIEW] != to:
        vst[s, S_VIEW] = to
        vc[s, counter] += 1
        pv[to, V_SWITCHES_IN] += 1


@njit(cache=True, inline="always")
def end_instruction(vst, vc, pv, s):
    """Close vCPU slot ``s``'s instruction (SPEC §6.3): single-step first, then #VE step."""
    if vst[s, S_SS_ON]:
        vc[s, C_MTF] += 1
        if vst[s, S_SS_FAST]:
            switch_view(vst, vc, pv, s, vst[s, S_SS_RET], C_SW_FAST)
        else:
            vc[s, C_SINGLESTEP] += 1
            switch_view(vst, vc, pv, s, vst[s, S_SS_RET], C_SW_EVENT)
        vst[s, S_SS_ON] = 0
    if vst[s, S_VES_ON]:
        switch_view(vst, vc, pv, s, vst[s, S_VES_RET], C_SW_VMFUNC)
        vst[s, S_VES_ON] = 0
    vst[s, S_VE_BUSY] = 0
    vst[s, S_EMUL] = 0
    vst[s, S_RESTARTS] = 0
    vst[s, S_NSEG] = 0
    vst[s, S_PENDING] = 0


@njit(cache=True, inline="always")
def match_rule(rules, granges, view, kind, g):
    """First rule matching (view, kind, g); rules int64 (n, 8), see simulate.rule_table."""
    for r in range(rules.shape[0]):
        if rules[r, 0] >= 0 and rules[r, 0] != view:
            continue
        if not (rules[r, 1] >> kind) & 1:
            continue
        lo = rules[r, 2]
        hi = rules[r, 3]
        if lo >= 0:
            # binary search in the rule's sorted, merged ranges
            while lo < hi:
                mid = (lo + hi) >> 1
                if granges[mid, 1] < g:
                    lo = mid + 1
                else:
                    hi = mid
            if lo >= rules[r, 3] or granges[lo, 0] > g:
                continue
        return r
    return -1


@njit(cache=True, inline="always")
def rewrite_4k(pool, gs, roots, maxm, vc, pmap, s, p, g, e, lv, access):
    """A replay-time 4 KiB access rewrite of the valid leaf ``e`` (at ``lv``) covering ``g``
    in p2m ``p``, by vCPU slot ``s``: splits, the EPT sync and access_changes counted."""
    vc[s, C_EPT_SYNCS] += permits_any(e, lv)
    vc[s, C_SPLITS] += write_4k(
        pool, gs, roots, maxm, p, g, with_access(piece_at(e, lv, g), access)
    )
    forget(pmap, p, g, 1)
    vc[s, C_ACCESS_CHANGES] += 1


@njit(cache=True, inline="always")
def attempt(
    pool,
    gs,
    roots,
    maxm,
    active,
    dflt,
    dom,
    vst,
    vc,
    pv,
    elog,
    rules,
    granges,
    s,
    g,
    kind,
    row,
    e,
    lv,
    has_ip,
    ipv,
    pmap,
    bpkey,
    first,
    boffv,
):
    """One attempt of SPEC §5 steps 2-8 at a row that the walk (``e``, ``lv``) of the vCPU's
    current view did not complete on the fast path; returns an outcome R_*.

    Exits and #VEs go to the event log ``elog``, with the row's instruction pointer ``ipv``
    when ``has_ip``. Every tree write clears the gfns it covers from the fast-path cache
    ``pmap``. A completion is counted by the caller. ``first``: the row is its instruction's
    first; ``boffv``: its byte offset in the page (-1 unknown), for breakpoints ``bpkey``
    (int64 sorted mfn << 12 | offset).
    """
    kb = np.int64(1) << kind
    view, p, _root = current_view(vst, roots, s, dom[D_ALTP2M])
    k = e & 3
    acc = (e >> 2) & 15
    permitted = k == LEAF and (PERMITS[acc] & kb) != 0
    shatter = permitted and kind == 2 and lv > 1 and not dom[D_EXEC_SP]
    if permitted and not shatter:
        # 2. an instruction's first fetch at a breakpoint of the frame this leaf maps traps
        if (
            kind == 2
            and first
            and boffv >= 0
            and len(bpkey)
            and sorted_has(bpkey, ((piece_at(e, lv, g) >> MFN_SHIFT) << 12) | boffv)
        ):
            return breakpoint_hit(vst, vc, pv, elog, gs, dom, s, view, g, has_ip, ipv)
        return R_DONE
    # 3. #VE: the deciding entry is the leaf the hardware found (valid, removed or
    # invisible: each keeps its bit); an empty slot has sve 1.
    sve = (e >> 6) & 1 if k >= LEAF else 1
    if vst[s, S_VE_EN] and sve == 0:
        if not vst[s, S_VE_BUSY]:
            vc[s, C_VE] += 1
            pv[view, V_VE] += 1
            log_event(elog, gs, view, g, E_VE, has_ip, ipv)
            vst[s, S_VE_BUSY] = 1
            vst[s, S_PENDING] = 1
            act = dom[D_VE_ACTION]
            if act == 2:
                vc[s, C_VE_EMUL] += 1
                return R_EMULATED
            if act == 0:
                vst[s, S_VES_ON] = 1
                vst[s, S_VES_RET] = view
            if act >= 0:
                switch_view(vst, vc, pv, s, dom[D_VE_TO], C_SW_VMFUNC)
            return R_RESTART
        vc[s, C_VE_BLOCKED] += 1
    # 4. VM exit
    vc[s, C_EPT_EXITS] += 1
    pv[view, V_EXITS] += 1
    ev = log_event(elog, gs, view, g, E_EXIT, has_ip, ipv)
    if not visible(e, lv):
        # no leaf Xen sees: an empty slot, a removed leaf or an invisible superpage
        h, hl = xwalk(pool, roots[0], g) if p != 0 else (np.int64(0), 4)
        if h & 3 != LEAF:
            # 6. hole: emulated MMIO
            vc[s, C_MMIO] += 1
            return R_DONE
        # 5. lazy copy at min(host order, hole order)
        host_order = level_order(hl)
        if g > maxm[p]:
            if (g & ~np.int64((1 << 18) - 1)) > maxm[p]:
                hole = 18
            elif (g & ~np.int64(511)) > maxm[p]:
                hole = 9
            else:
                hole = 0
        else:
            hole = 18 if lv >= 3 else level_order(lv)
        order = min(host_order, hole) if dom[D_LAZY_MIN] else host_order
        level = order // 9 + 1
        base = g & ~((np.int64(1) << order) - 1)
        if not dom[D_LAZY_MIN] and slot_holds_table(pool, roots[p], base, level):
            vc[s, C_EPT_SYNCS] += 1  # the copy replaces a table: present entries go
            gs[GS_POP_DIRTY] = 1
        if e & 3 == LEAF:  # over an invisible superpage: its pages are not added again
            gs[GS_POP_DIRTY] = 1
        access = dflt[p] if dom[D_LAZY_DEFAULT] else e_access(h)
        src = piece_at(h, hl, base)
        set_leaf(pool, gs, roots, maxm, p, base, level, with_sve(with_access(src, access), 1))
        pages = np.int64(1) << order
        forget(pmap, p, base, pages)
        vc[s, C_LAZY] += 1
        vc[s, C_LAZY_4K + level - 1] += 1
        vc[s, C_LAZY_PAGES] += pages
        pv[view, V_LAZY] += 1
        pv[view, V_LAZY_PAGES] += pages
        elog[ev, 1] |= E_LAZY
        return R_RESTART
    if not permitted:
        # 7. access violation
        vc[s, C_VIOLATIONS] += 1
        pv[view, V_VIOLATIONS] += 1
        elog[ev, 1] |= E_VIOL_R << kind
        if acc == 8 and kind == 1:
            rewrite_4k(pool, gs, roots, maxm, vc, pmap, s, p, g, e, lv, 3)
            return R_RESTART
        n2 = acc == 9
        if n2:
            rewrite_4k(pool, gs, roots, maxm, vc, pmap, s, p, g, e, lv, 7)
        if not dom[D_MONITOR]:
            if dom[D_ACCESS_REQUIRED]:
                gs[GS_CRASHED] = 1
                gs[GS_CRASH_ROW] = row
                return R_CRASH
            if not n2:
                rewrite_4k(pool, gs, roots, maxm, vc, pmap, s, p, g, e, lv, 7)
            return R_RESTART
        if n2:
            vc[s, C_ASYNC] += 1
            return R_RESTART
        vc[s, C_MEM_ACCESS] += 1
        r = match_rule(rules, granges, view, kind, g)
        if r < 0:
            gs[GS_ERR_ROW] = row
            gs[GS_ERR_GFN] = g
            gs[GS_ERR_VIEW] = view
            return R_UNMATCHED
        action = rules[r, 4]
        if action == A_STEP:
            single_step(vst, vc, pv, s, view, rules[r, 5], rules[r, 6])
        elif action == A_EMULATE:
            vc[s, C_EMULATIONS] += 1
            return R_EMULATED
        elif action == A_SWITCH:
            switch_view(vst, vc, pv, s, rules[r, 5], C_SW_EVENT)
        elif p <= 1:
            # view 0 (or the host itself): Xen's set_mem_access on the host, propagated
            gs[GS_SYNCS] = 0
            _, splits = host_set(pool, gs, roots, maxm, active, g, rules[r, 7], -1)
            vc[s, C_SPLITS] += splits
            vc[s, C_EPT_SYNCS] += gs[GS_SYNCS]
            vc[s, C_ACCESS_CHANGES] += 1
            for q in range(pmap.shape[0]):  # the host and every view it propagated to
                forget(pmap, q, g, 1)
        else:
            rewrite_4k(pool, gs, roots, maxm, vc, pmap, s, p, g, e, lv, rules[r, 7])
        return R_RESTART
    # 8. XSA-304: execute on a superpage with exec_sp = false shatters it
    vc[s, C_EPT_SYNCS] += 1
    write_4k(pool, gs, roots, maxm, p, g, piece_at(e, lv, g))
    forget(pmap, p, g, 1)
    vc[s, C_SHATTERS] += 1
    return R_RESTART


@njit(cache=True, inline="always")
def single_step(vst, vc, pv, s, view, to, fast):
    """A monitor's step response (SPEC §6.1): switch to ``to``; single-step on with return
    view ``view``, unless already on: then Xen's flags decide (not fast toggles it off, fast
    keeps it on with the new return view)."""
    if not vst[s, S_SS_ON]:
        vst[s, S_SS_ON] = 1
        vst[s, S_SS_RET] = view
        vst[s, S_SS_FAST] = fast
    elif not fast:
        vst[s, S_SS_ON] = 0
    else:
        vst[s, S_SS_RET] = view
        vst[s, S_SS_FAST] = 1
    vst[s, S_PENDING] = 1
    switch_view(vst, vc, pv, s, to, C_SW_EVENT)


@njit(cache=True, inline="always")
def breakpoint_hit(vst, vc, pv, elog, gs, dom, s, view, g, has_ip, ipv):
    """SPEC §6.4: the #BP exit, the breakpoint event and its response; an R_* outcome."""
    vc[s, C_INT3] += 1
    pv[view, V_INT3] += 1
    log_event(elog, gs, view, g, E_INT3, has_ip, ipv)
    vc[s, C_BP_EVENTS] += 1
    if dom[D_BP_ACTION] == 1:
        vc[s, C_EMULATIONS] += 1
        return R_EMULATED
    single_step(vst, vc, pv, s, view, dom[D_BP_TO], dom[D_BP_FAST])
    return R_RESTART


@njit(cache=True, inline="always")
def slot_holds_table(pool, root, g, level):
    """Whether the entry of ``level`` covering ``g`` is a table (walking only through tables)."""
    node = root
    for lv in range(4, level - 1, -1):
        e = pool[node, (g >> level_order(lv)) & 511]
        if e & 3 != TABLE:
            return False
        if lv == level:
            return True
        node = e >> MFN_SHIFT
    return False


# Not inlined: inlined into the replay loop it tripled the kernels' compile time for no
# measurable gain. Both calls pass the same types (np.int64, never a bare literal such as -1, 0
# or True): Numba compiles a separate copy per literal value, 17 s each. Compiled without
# reference counting, as replay_batch. Its arrays come through ``xtab`` (see X_POOL): the
# state as replay_batch names it, the batch (gfn int64, access uint8, vcpu uint16, ip int64,
# op uint8, arg int64, boff int64, each (n,)) and the run's lookup tables (bpmfn, bpkey, cr3r,
# vis, pseg, lut).
@njit(cache=True, _nrt=False)
def execute(xtab, has_ip, has_op, start_row, s, j, k, e, lv, has_walk):
    """Execute vCPU slot ``s``'s instruction from its row ``j`` to its newest row (SPEC §5):
    one attempt per access row (control rows op 1 and 2 take effect again), and from the first
    row again after each restart, until the newest row completes. Returns an ST_* status.

    Row ``j`` is ibuf[s, j] while j < the spilled rows, else the next row of slot ``s`` at
    batch index ``k`` or later; ``j`` < 0 names the newest row, at ``k``. (``e``, ``lv``) is
    the fast path's walk for row ``j`` when ``has_walk``. Before each attempt there must be
    room for its tree writes and its log entry; without it the place is saved (S_EXEC_J,
    S_EXEC_K, GS_RESUME) and the driver calls again after growing.
    """
    i64, u8 = np.int64(0), np.uint8(0)
    pool, gs, roots = array2(xtab, X_POOL, i64), array1(xtab, X_GS, i64), array1(xtab, X_ROOTS, i64)
    maxm, dflt, dom = array1(xtab, X_MAXM, i64), array1(xtab, X_DFLT, i64), array1(xtab, X_DOM, i64)
    active = array1(xtab, X_ACTIVE, u8)  # numpy bool_: one byte, 0 or 1
    vst, vc, pv = array2(xtab, X_VST, i64), array2(xtab, X_VC, i64), array2(xtab, X_PV, i64)
    elog, htab, itab = (
        array2(xtab, X_ELOG, i64),
        array2(xtab, X_HTAB, i64),
        array2(xtab, X_ITAB, i64),
    )
    rules, granges = array2(xtab, X_RULES, i64), array2(xtab, X_GRANGES, i64)
    ibuf, pmap, lut = array3(xtab, X_IBUF, i64), array2(xtab, X_PMAP, u8), array1(xtab, X_LUT, i64)
    vcpu, op = array1(xtab, X_VCPU, np.uint16(0)), array1(xtab, X_OP, u8)
    bt = (
        array1(xtab, X_GFN, i64),
        array1(xtab, X_ACCESS, u8),
        vcpu,
        array1(xtab, X_IP, i64),
        op,
        array1(xtab, X_ARG, i64),
        array1(xtab, X_BOFF, i64),
    )
    bpmfn, bpkey, vis = (
        array1(xtab, X_BPMFN, i64),
        array1(xtab, X_BPKEY, i64),
        array1(xtab, X_VIS, i64),
    )
    cr3r, pseg = array2(xtab, X_CR3R, i64), array3(xtab, X_PSEG, i64)
    nsp, first = first_rows(vst, s)
    if j < 0:
        # the instruction's rows: the spilled ones, then the slot's rows from ``first`` to k
        n = nsp
        for t in range(first, k + 1):
            n += slot_row(lut, vcpu, op, has_op, s, t)
        if n > MAX_INSN_ROWS:
            gs[GS_ERR_ROW] = start_row + k
            return ST_LONG_INSN
        vst[s, S_NROWS] = n
        j = n - 1
    last = vst[s, S_NROWS] - 1
    altp2m = dom[D_ALTP2M]
    exec_sp = dom[D_EXEC_SP]
    while True:
        if pool.shape[0] - gs[GS_NFREE] < dom[D_HEADROOM] or gs[GS_LOGN] + 1 > elog.shape[0]:
            if pool.shape[0] - gs[GS_NFREE] >= dom[D_HEADROOM]:
                st = drain_status(gs, htab, itab)
                if st == ST_DONE:
                    drain_log(elog, gs, htab, itab)
                    continue
            else:
                st = ST_NEED_NODES
            vst[s, S_EXEC_J] = j
            vst[s, S_EXEC_K] = k
            gs[GS_RESUME] = s + 1
            return st
        kb, g, row, ipv, argv, boffv, k = insn_row(
            ibuf, bt, has_ip, has_op, len(bpkey) > 0, lut, start_row, s, j, nsp, k
        )
        if kb == 0:
            # a control row of the instruction: it takes effect again on every pass
            control(vst, vc, pv, dom, cr3r, vis, pseg, s, g, argv)
            if j == last:
                return ST_DONE
            if j >= nsp:
                k += 1
            j += 1
            continue
        view, p, root = current_view(vst, roots, s, altp2m)
        if has_walk:
            has_walk = 0
            done = False
        else:
            done, e, lv = completes(pmap, pool, root, p, g, kb, exec_sp, bpmfn)
        if done:
            out = R_DONE
        else:
            out = attempt(
                pool,
                gs,
                roots,
                maxm,
                active,
                dflt,
                dom,
                vst,
                vc,
                pv,
                elog,
                rules,
                granges,
                s,
                g,
                KIND_OF_BIT[kb],
                row,
                e,
                lv,
                has_ip,
                ipv,
                pmap,
                bpkey,
                j == 0,
                boffv,
            )
        if out == R_DONE:
            if done or visible(e, lv):  # MMIO rows are not completions
                pv[view, V_COMPLETED] += 1
                vst[s, S_PCOUNT] += 1
            if j == last:
                return ST_DONE
            if j >= nsp:
                k += 1
            j += 1
        elif out == R_RESTART:
            if vst[s, S_RESTARTS] == MAX_RESTARTS:
                gs[GS_LIVELOCKED] = 1
                gs[GS_LIVELOCK_ROW] = row
                return ST_LIVELOCK
            vst[s, S_RESTARTS] += 1
            vst[s, S_PENDING] = 1  # the instruction end clears the restart count
            vc[s, C_RESTARTS] += 1
            # completions of the abandoned pass do not count (SPEC §5: final pass only); those
            # before the attempt's switch are in the view the attempt ran in
            retract_pass(vst, pv, pseg, s, view)
            j = 0
            k = first
        elif out == R_EMULATED:
            # this row and the rest of the instruction complete without checks: its access
            # rows, whose control rows take effect (Xen emulates VMFUNC and mov cr3)
            vc[s, C_REC_EMUL] += 1
            kk = k + 1 if j >= nsp else first
            for t in range(j + 1, last + 1):
                kbt, o, _, _, argt, _, kk = insn_row(
                    ibuf, bt, has_ip, has_op, False, lut, start_row, s, t, nsp, kk
                )
                if t >= nsp:
                    kk += 1
                if kbt == 0:
                    control(vst, vc, pv, dom, cr3r, vis, pseg, s, o, argt)
                else:
                    vc[s, C_REC_EMUL] += 1
            vst[s, S_EMUL] = 1
            vst[s, S_PENDING] = 1
            return ST_DONE
        elif out == R_CRASH:
            return ST_CRASH
        else:
            return ST_UNMATCHED


@njit(cache=True, inline="always")
def slot_row(lut, vcpu, op, has_op, s, k):
    """Whether batch row ``k`` belongs to vCPU slot ``s`` (host drops and maps, op 3 and 4,
    belong to no vCPU)."""
    return lut[vcpu[k]] == s and not (has_op and op[k] >= 3)


@njit(cache=True, inline="always")
def insn_row(ibuf, bt, has_ip, has_op, has_bp, lut, start_row, s, j, nsp, k):
    """Row ``j`` of slot ``s``'s instruction: ibuf[s, j] while j < ``nsp`` (spilled), else the
    slot's next row at batch index ``k`` or later. Returns (kind bit, 0 for a control row;
    gfn, or a control row's op; global row; ip; arg; byte offset, -1 unless ``has_bp``;
    batch index of the row, or ``k`` for a spilled one)."""
    if j < nsp:
        key = ibuf[s, j, B_KEY]
        return (
            key & 7,
            key >> 3,
            ibuf[s, j, B_ROW],
            ibuf[s, j, B_IP],
            ibuf[s, j, B_ARG],
            ibuf[s, j, B_BOFF],
            k,
        )
    gfn, access, vcpu, ip, op, arg, boff = bt
    while not slot_row(lut, vcpu, op, has_op, s, k):
        k += 1
    ctl = has_op and op[k] != 0
    return (
        np.int64(0) if ctl else KIND_BIT[access[k]],
        np.int64(op[k]) if ctl else gfn[k],
        np.int64(start_row + k),
        ip[k] if has_ip else np.int64(0),
        arg[k] if has_op else np.int64(0),
        boff[k] if has_bp else np.int64(-1),
        k,
    )


@njit(cache=True, inline="always")
def retract_pass(vst, pv, pseg, s, view):
    """Take back the completions of slot ``s``'s current pass: S_PCOUNT in ``view`` and the
    segments control rows left in other views."""
    pv[view, V_COMPLETED] -= vst[s, S_PCOUNT]
    vst[s, S_PCOUNT] = 0
    for t in range(vst[s, S_NSEG]):
        pv[pseg[s, t, 0], V_COMPLETED] -= pseg[s, t, 1]
    vst[s, S_NSEG] = 0


@njit(cache=True, inline="always")
def control_switch(vst, vc, pv, pseg, s, to, counter):
    """A view switch by a control row inside an instruction: the pass's completions so far
    stay attributed to the view they happened in (a segment per view)."""
    old = vst[s, S_VIEW]
    if old == to:
        return
    c = vst[s, S_PCOUNT]
    if c:
        n = vst[s, S_NSEG]
        t = 0
        while t < n and pseg[s, t, 0] != old:
            t += 1
        if t == n:
            pseg[s, t, 0] = old
            pseg[s, t, 1] = 0
            vst[s, S_NSEG] = n + 1
        pseg[s, t, 1] += c
        vst[s, S_PCOUNT] = 0
        vst[s, S_PENDING] = 1  # the instruction end clears the segments
    switch_view(vst, vc, pv, s, to, counter)


@njit(cache=True, inline="always")
def control(vst, vc, pv, dom, cr3r, vis, pseg, s, o, argv):
    """SPEC §6.5: a guest VMFUNC (op 1) or CR3 write (op 2) of vCPU slot ``s`` takes effect.

    ``cr3r`` int64 (m, 3): [[on_cr3.switch]] rules (value, matches any, view); ``vis`` int64
    (views,): 1 for views a guest VMFUNC may reach (active and visible after setup)."""
    if o == 1:
        if vst[s, S_VE_EN] and 0 <= argv < len(vis) and vis[argv]:
            vc[s, C_GUEST_VMFUNCS] += 1
            control_switch(vst, vc, pv, pseg, s, argv, C_SW_VMFUNC)
        else:
            vc[s, C_VMFUNC_EXITS] += 1  # the CPU exits and Xen injects #UD
        return
    vc[s, C_CR3_WRITES] += 1
    if dom[D_CR3_ON]:
        vc[s, C_CR3_EXITS] += 1
        if not dom[D_CR3_ONCHANGE] or not vst[s, S_CR3_SEEN] or vst[s, S_CR3] != argv:
            if dom[D_CR3_SYNC]:
                vc[s, C_CR3_EVENTS] += 1
                for r in range(cr3r.shape[0]):
                    if cr3r[r, 1] or cr3r[r, 0] == argv:
                        control_switch(vst, vc, pv, pseg, s, cr3r[r, 2], C_SW_EVENT)
                        break
            else:
                vc[s, C_ASYNC] += 1
    vst[s, S_CR3] = argv
    vst[s, S_CR3_SEEN] = 1


@njit(cache=True, inline="always")
def reset_view(pool, gs, roots, remap, pmap, vc, pv, d, p):
    """Reset view p2m ``p`` (SPEC §6.5): every entry gone, remap interval cleared, max_mapped
    kept; its vCPUs stay and refill it lazily."""
    roots[p] = alloc_node(pool, gs)
    gs[GS_POP_DIRTY] = 1
    remap[p, 0] = np.int64(1) << 62
    remap[p, 1] = -1
    pmap[p, :] = 0
    vc[d, C_VIEW_RESETS] += 1
    pv[p - 1, V_RESETS] += 1


@njit(cache=True)
def host_change(pool, gs, roots, maxm, active, dom, remap, pmap, vc, pv, o, g):
    """SPEC §6.5 host drop (op 3) or map (op 4) of gfn ``g``, counted in the domain row of
    ``vc`` (its last)."""
    d = vc.shape[0] - 1
    gs[GS_POP_DIRTY] = 1
    e, lv = xwalk(pool, roots[0], g)
    vc[d, C_EPT_SYNCS] += permits_any(e, lv)
    for q in range(pmap.shape[0]):
        forget(pmap, q, g, 1)
    if o == 4:
        sve = e_sve(e) if e & 3 == LEAF else 1
        new = make_leaf(g + MFN_OFFSET, dom[D_HOST_ACCESS], sve)
        vc[d, C_SPLITS] += write_4k(pool, gs, roots, maxm, 0, g, new)
        gs[GS_SYNCS] = 0
        vc[d, C_SPLITS] += propagate(pool, gs, roots, maxm, active, g, new)
        vc[d, C_EPT_SYNCS] += gs[GS_SYNCS]
        vc[d, C_HOST_MAPS] += 1
        return
    # the host entry becomes a hole (written even when it is one already)
    vc[d, C_SPLITS] += write_4k(
        pool, gs, roots, maxm, 0, g, (e & ~np.int64(3)) | REMOVED if e & 3 == LEAF else np.int64(0)
    )
    vc[d, C_HOST_DROPS] += 1
    hit = -1
    for p in range(1, len(roots)):
        if not active[p]:
            continue
        if remap[p, 0] <= g <= remap[p, 1]:
            if hit < 0:
                hit = p
                reset_view(pool, gs, roots, remap, pmap, vc, pv, d, p)
                continue
            # a second view remaps g: every other active view is reset, each once
            for q in range(1, len(roots)):
                if active[q] and q != hit:
                    reset_view(pool, gs, roots, remap, pmap, vc, pv, d, q)
            return
        ev, lvv = xwalk(pool, roots[p], g)
        if ev & 3 == LEAF:
            vc[d, C_EPT_SYNCS] += permits_any(ev, lvv)
            removed = (piece_at(ev, lvv, g) & ~np.int64(3)) | REMOVED
            vc[d, C_SPLITS] += write_4k(pool, gs, roots, maxm, p, g, removed)


@njit(cache=True, inline="always")
def first_rows(vst, s):
    """(rows of slot ``s``'s instruction spilled in ibuf, batch index its rows here start at)."""
    f = vst[s, S_FIRST]
    if f >= 0:
        return 0, f
    return vst[s, S_NSPILL], -(f + 1)


@njit(cache=True, _nrt=False)
def spill_open(vst, ibuf, gs, bt, has_ip, has_op, lut, start_row, n):
    """At the end of a batch of ``n`` rows, copy the rows this batch holds of every open
    instruction that may still restart (not emulated) into ibuf, after its earlier spills.
    Returns ST_LONG_INSN (GS_ERR_ROW) for an instruction past MAX_INSN_ROWS, else ST_DONE."""
    gfn, access, vcpu, ip, op, arg, boff = bt
    lo = n
    for s in range(vst.shape[0]):
        if not vst[s, S_STARTED] or vst[s, S_EMUL] or vst[s, S_FIRST] == CONT:
            vst[s, S_FIRST] = CONT
            continue
        nsp, first = first_rows(vst, s)
        vst[s, S_NSPILL] = nsp
        lo = min(lo, first)
    for k in range(lo, n):
        if has_op and op[k] >= 3:
            continue
        s = lut[vcpu[k]]
        f = vst[s, S_FIRST]
        if f == CONT or k < (f if f >= 0 else -(f + 1)):
            continue
        j = vst[s, S_NSPILL]
        if j == MAX_INSN_ROWS:
            gs[GS_ERR_ROW] = start_row + k
            return ST_LONG_INSN
        if has_op and op[k]:
            ibuf[s, j, B_KEY] = np.int64(op[k]) << 3
            ibuf[s, j, B_ARG] = arg[k]
        else:
            ibuf[s, j, B_KEY] = (gfn[k] << 3) | KIND_BIT[access[k]]
        ibuf[s, j, B_ROW] = start_row + k
        ibuf[s, j, B_IP] = ip[k] if has_ip else 0
        ibuf[s, j, B_BOFF] = boff[k] if len(boff) == n else -1
        vst[s, S_NSPILL] = j + 1
    for s in range(vst.shape[0]):
        vst[s, S_FIRST] = CONT
    return ST_DONE


@njit(cache=True, nogil=True)
def snapshot(vc, pv, snaps, w, nslots, pool, roots, gs, altp2m):
    """Row ``w`` of ``snaps``: run totals of every counter, then each view's lazy-copy pages,
    then the domain row's EPT syncs, then each view's pages mapped, counted in its tree when
    GS_POP_DIRTY says lazy copies alone no longer tell it (else -1)."""
    nc = vc.shape[1]
    nv = pv.shape[0]
    for c in range(nc):
        t = 0
        for s in range(nslots):
            t += vc[s, c]
        snaps[w, c] = t
    for v in range(nv):
        snaps[w, nc + v] = pv[v, V_LAZY_PAGES]
    snaps[w, nc + nv] = vc[nslots - 1, C_EPT_SYNCS]  # the domain's own syncs
    for v in range(nv):
        snaps[w, nc + nv + 1 + v] = -1
        root = roots[v + 1 if altp2m else 0]
        if gs[GS_POP_DIRTY] and root >= 0:  # -1: a view the policy does not use
            snaps[w, nc + nv + 1 + v] = tree_stats(pool, root)[0]
    gs[GS_POP_DIRTY] = 0


@njit(cache=True, inline="always")
def current_view(vst, roots, s, altp2m):
    """(view, p2m index, root node) vCPU slot ``s`` runs in."""
    view = vst[s, S_VIEW] if altp2m else 0
    p = view + 1 if altp2m else 0
    return view, p, roots[p]


@njit(cache=True, inline="always")
def has_room(pool, gs, elog, headroom):
    """Whether the next access can run: nodes for its tree writes, log entries for its events."""
    return pool.shape[0] - gs[GS_NFREE] >= headroom and gs[GS_LOGN] + LOG_SLACK <= elog.shape[0]


@njit(cache=True, inline="always")
def flush_counts(vc, pv, vst, s, view, recs, insns, cur_ins, comp, fi, pc):
    """Store what the replay loop keeps in locals for vCPU slot ``s``: records and
    instructions counted, completions in ``view``, and the current instruction: its id, where
    its rows are (S_FIRST), its pass's completions."""
    if s >= 0:
        vc[s, C_RECORDS] += recs
        vc[s, C_INSTRUCTIONS] += insns
        vst[s, S_INSN] = cur_ins
        vst[s, S_FIRST] = fi
        vst[s, S_PCOUNT] = pc
        pv[view, V_COMPLETED] += comp


# _nrt=False compiles without Numba's runtime: no reference counting. With it, every array
# handed to an inlined helper was incref'd and decref'd (atomic operations, about 70 of the
# 114 ns an exit took). The kernel allocates nothing, so it needs no runtime.
@njit(cache=True, nogil=True, _nrt=False)
def replay_batch(
    gfn,
    access,
    vcpu,
    insn,
    has_insn,
    ip,
    has_ip,
    op,
    arg,
    has_op,
    boff,
    start_row,
    begin,
    pool,
    gs,
    roots,
    maxm,
    active,
    dflt,
    dom,
    vst,
    vc,
    pv,
    elog,
    htab,
    itab,
    rules,
    granges,
    lut,
    snaps,
    pmap,
    ibuf,
    remap,
    bpmfn,
    bpkey,
    cr3r,
    vis,
    pseg,
    xtab,
):
    """Replay rows ``begin..`` of one batch; returns (status, index of the next row to do).

    gfn int64 (n,), access uint8 (n,), vcpu uint16 (n,), insn int64 (n,) (ignored unless
    ``has_insn``), ip int64 (n,) (ignored unless ``has_ip``), op uint8 and arg int64 (n,)
    (control rows, ignored unless ``has_op``), boff int64 (n,) (byte offset of each row's
    address in its page, -1 unknown; read only when there are breakpoints); ``start_row`` is
    the global index of the batch's row 0; ``lut`` int64 (4096,) maps a vCPU number to its
    counter slot (the last row of ``vc`` is the domain's). Breakpoints: ``bpmfn`` int64 sorted
    frames holding one, ``bpkey`` int64 sorted mfn << 12 | offset; ``cr3r`` int64 (m, 3)
    CR3 rules; ``vis`` int64 (views,) guest VMFUNC targets; ``pseg`` int64 (slots, 513, 2)
    pass segments; ``remap`` int64 (p2ms, 2) remap intervals; ``xtab`` int64 (N_X, 4) scratch
    for execute's arrays.
    A restart executes an instruction again from its rows in the batch and, for one that
    began in an earlier batch, from ``ibuf`` (int64 (slots, MAX_INSN_ROWS, B_WIDTH)). Exits and #VEs are logged in ``elog`` (int64
    (m, 3), m > LOG_SLACK) and drained into the per-gfn and per-ip tables when the log fills;
    the driver drains what is left at the end. ``pmap`` uint8 (p2ms, m) caches fast-path
    results for gfns below m (see fast_bits). When a status asks for room in the middle of
    an instruction (GS_RESUME), the call after growing carries on where it stopped.
    """
    altp2m = dom[D_ALTP2M]
    exec_sp = dom[D_EXEC_SP]
    window = dom[D_WINDOW]
    headroom = dom[D_HEADROOM]
    nslots = vc.shape[0]
    n = len(gfn)
    bt = (gfn, access, vcpu, ip, op, arg, boff)
    # execute's arrays, by address (see X_POOL)
    note_array(xtab, X_POOL, pool)
    note_array(xtab, X_GS, gs)
    note_array(xtab, X_ROOTS, roots)
    note_array(xtab, X_MAXM, maxm)
    note_array(xtab, X_ACTIVE, active)
    note_array(xtab, X_DFLT, dflt)
    note_array(xtab, X_DOM, dom)
    note_array(xtab, X_VST, vst)
    note_array(xtab, X_VC, vc)
    note_array(xtab, X_PV, pv)
    note_array(xtab, X_ELOG, elog)
    note_array(xtab, X_HTAB, htab)
    note_array(xtab, X_ITAB, itab)
    note_array(xtab, X_RULES, rules)
    note_array(xtab, X_GRANGES, granges)
    note_array(xtab, X_IBUF, ibuf)
    note_array(xtab, X_PMAP, pmap)
    note_array(xtab, X_GFN, gfn)
    note_array(xtab, X_ACCESS, access)
    note_array(xtab, X_VCPU, vcpu)
    note_array(xtab, X_IP, ip)
    note_array(xtab, X_OP, op)
    note_array(xtab, X_ARG, arg)
    note_array(xtab, X_BOFF, boff)
    note_array(xtab, X_BPMFN, bpmfn)
    note_array(xtab, X_BPKEY, bpkey)
    note_array(xtab, X_CR3R, cr3r)
    note_array(xtab, X_VIS, vis)
    note_array(xtab, X_PSEG, pseg)
    note_array(xtab, X_LUT, lut)
    if gs[GS_RESUME]:
        s = gs[GS_RESUME] - 1
        gs[GS_RESUME] = 0
        st = execute(
            xtab,
            has_ip,
            has_op,
            start_row,
            s,
            vst[s, S_EXEC_J],
            vst[s, S_EXEC_K],
            np.int64(0),
            np.int64(0),
            np.int64(0),
        )
        if st != ST_DONE:
            return st, begin + (st in (ST_CRASH, ST_LIVELOCK, ST_UNMATCHED, ST_LONG_INSN))
        begin += 1
    # Room checks and the next window boundary live in locals: only the slow path and a
    # snapshot change them, and locals stay in registers across the counter stores.
    room = has_room(pool, gs, elog, headroom)
    next_snap = gs[GS_NEXT_WIN] * window
    # The current vCPU slot's state lives in locals while its rows follow each other, and its
    # records / completions are counted locally, flushed (flush_counts) before anything that
    # reads or changes them: another slot, a window snapshot, an instruction end, the slow path.
    last_s = -1
    view = 0
    pq = 0
    root = roots[0]
    cur_ins = np.int64(0)
    pend = 0
    recs = 0
    insns = 0
    comp = 0
    fi = 0  # the slot's instruction: where its rows are (S_FIRST) ...
    pc = 0  # ... and the completions of its current pass
    for i in range(begin, n):
        if not room:
            flush_counts(vc, pv, vst, last_s, view, recs, insns, cur_ins, comp, fi, pc)
            if pool.shape[0] - gs[GS_NFREE] < headroom:
                return ST_NEED_NODES, i
            st = drain_status(gs, htab, itab)
            if st != ST_DONE:
                return st, i
            drain_log(elog, gs, htab, itab)
            room = True
            recs = 0
            insns = 0
            comp = 0
        row = start_row + i
        if row >= next_snap:
            flush_counts(vc, pv, vst, last_s, view, recs, insns, cur_ins, comp, fi, pc)
            recs = 0
            insns = 0
            comp = 0
            snapshot(vc, pv, snaps, gs[GS_NEXT_WIN], nslots, pool, roots, gs, altp2m)
            gs[GS_NEXT_WIN] += 1
            next_snap = gs[GS_NEXT_WIN] * window
        if has_op and op[i] >= 3:
            # a host drop or map: the domain's, no vCPU's (SPEC §6.5)
            if pool.shape[0] - gs[GS_NFREE] < headroom + len(roots):
                flush_counts(vc, pv, vst, last_s, view, recs, insns, cur_ins, comp, fi, pc)
                return ST_NEED_NODES, i
            flush_counts(vc, pv, vst, last_s, view, recs, insns, cur_ins, comp, fi, pc)
            recs = 0
            insns = 0
            comp = 0
            vc[nslots - 1, C_CONTROL] += 1
            host_change(pool, gs, roots, maxm, active, dom, remap, pmap, vc, pv, op[i], gfn[i])
            if last_s >= 0:  # a reset view has a new root
                view, pq, root = current_view(vst, roots, last_s, altp2m)
            room = has_room(pool, gs, elog, headroom)
            continue
        s = lut[vcpu[i]]
        ins = insn[i] if has_insn else row
        if s != last_s:
            flush_counts(vc, pv, vst, last_s, view, recs, insns, cur_ins, comp, fi, pc)
            recs = 0
            insns = 0
            comp = 0
            last_s = s
            view, pq, root = current_view(vst, roots, s, altp2m)
            pend = vst[s, S_PENDING]
            cur_ins = vst[s, S_INSN]
            fi = vst[s, S_FIRST]
            fi = -(i + 1) if fi == CONT else fi
            pc = vst[s, S_PCOUNT]
            new_insn = cur_ins != ins or not vst[s, S_STARTED]
            vst[s, S_STARTED] = 1
        else:
            new_insn = cur_ins != ins
        # ``pend`` is tested first: it is rarely set, while ``new_insn`` follows the data and
        # as the first test it mispredicted often enough to cost a third of the fast path.
        if pend and new_insn:
            flush_counts(vc, pv, vst, s, view, recs, insns, cur_ins, comp, fi, pc)
            recs = 0
            insns = 0
            comp = 0
            end_instruction(vst, vc, pv, s)
            pend = 0
            view, pq, root = current_view(vst, roots, s, altp2m)
        insns += new_insn
        cur_ins = ins
        # A new instruction starts here. Masks, not branches: new_insn follows the data, and a
        # branch on it mispredicts often (see pend above).
        keep = np.int64(new_insn) - 1  # 0 on a new instruction, else all ones
        pc &= keep
        fi = (fi & keep) | (i & ~keep)
        if has_op and op[i]:
            # a guest VMFUNC or CR3 write of this vCPU's instruction takes effect (also in an
            # emulated instruction); never a restart
            flush_counts(vc, pv, vst, s, view, recs, insns, cur_ins, comp, fi, pc)
            recs = 0
            insns = 0
            comp = 0
            vc[s, C_CONTROL] += 1
            control(vst, vc, pv, dom, cr3r, vis, pseg, s, op[i], arg[i])
            view, pq, root = current_view(vst, roots, s, altp2m)
            pend = vst[s, S_PENDING]
            pc = vst[s, S_PCOUNT]
            continue
        recs += 1
        if pend and vst[s, S_EMUL]:
            vc[s, C_REC_EMUL] += 1
            continue
        g = gfn[i]
        kb = KIND_BIT[access[i]]
        # Fast path: a valid leaf of the current view that permits the access.
        done, e, lv = completes(pmap, pool, root, pq, g, kb, exec_sp, bpmfn)
        if done:
            comp += 1
            pc += 1
            continue
        flush_counts(vc, pv, vst, s, view, recs, insns, cur_ins, comp, fi, pc)
        recs = 0
        insns = 0
        comp = 0
        st = execute(xtab, has_ip, has_op, start_row, s, np.int64(-1), i, e, lv, np.int64(1))
        if st != ST_DONE:
            if st in (ST_CRASH, ST_LIVELOCK, ST_UNMATCHED, ST_LONG_INSN):
                return st, i + 1
            return st, i  # room: the next call resumes this row's execution (GS_RESUME)
        view, pq, root = current_view(vst, roots, s, altp2m)
        pend = vst[s, S_PENDING]
        pc = vst[s, S_PCOUNT]
        room = has_room(pool, gs, elog, headroom)
    flush_counts(vc, pv, vst, last_s, view, recs, insns, cur_ins, comp, fi, pc)
    return spill_open(vst, ibuf, gs, bt, has_ip, has_op, lut, start_row, n), n


@njit(cache=True, nogil=True)
def track_tsc(tsc, vcpu, lut, seen, first, last, n, op, has_op):
    """First and last ``tsc`` (uint64 (m,)) per vCPU slot over rows ``0..n`` of a batch
    (host drops and maps, op 3 and 4, have no vCPU); ``seen`` (int64 (m,)) marks slots that
    have a first value."""
    for i in range(n):
        if has_op and op[i] >= 3:
            continue
        s = lut[vcpu[i]]
        if not seen[s]:
            seen[s] = 1
            first[s] = tsc[i]
        last[s] = tsc[i]


@njit(cache=True, nogil=True)
def finish(vst, vc, pv):
    """End every open instruction at the end of the trace."""
    for s in range(vst.shape[0]):
        if vst[s, S_STARTED]:
            end_instruction(vst, vc, pv, s)


@njit(cache=True, _nrt=False, nogil=True)  # no reference counting, as replay_batch
def rehash(old, new, ip_table, gs):
    """Insert every used row of hash table ``old`` into the empty, larger table ``new``
    (int64, rows a power of two): the per-ip table if ``ip_table``, else the per-gfn one.
    ``gs`` (int64 (N_GS,)) is scratch: insertion counts land in it."""
    for i in range(old.shape[0]):
        if ip_table and (old[i, I_EXITS] or old[i, I_VE] or old[i, I_INT3]):
            j = ip_slot(new, gs, old[i, I_IP])
        elif not ip_table and old[i, 0]:
            j = gfn_slot(new, gs, old[i, 0])
        else:
            continue
        for c in range(old.shape[1]):
            new[j, c] = old[i, c]
