"""Check a trace's values and gather its statistics.

This module's one job is validation: ``validate`` makes one streaming pass that checks every
value against the bounds of ``layout`` and SPEC §2's rules (instruction rows, tsc order,
control rows) and returns ``TraceStats``; ``quick_stats`` gets the same sizes from Parquet
statistics when they prove them; ``Validator`` checks batches a replay decodes anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numba import njit

from altp2m_replay import budget
from altp2m_replay.errors import TraceError
from altp2m_replay.schema import VCPU_LIMIT
from altp2m_replay.traces.layout import _BOUNDS, _U64_BOUNDS, INSN_ROW_LIMIT, TRACE_SCHEMA
from altp2m_replay.traces.reader import Trace, open_trace


@dataclass
class TraceStats:
    """Result of :func:`validate`.

    ``vcpus`` sorted unique uint16 (of rows of op 0-2); ``access_counts`` int64 shape (8,) rows
    per access value (control rows are access 0); ``op_counts`` int64 shape (5,) rows per op;
    ``max_gfn``/``min_gfn`` over access rows and op 3/4 rows (0 when there are none);
    ``page_counts`` (only with ``page_counts=True``) maps "read"/"written"/"executed"/"touched"
    to (sorted uint64 gfns, int64 row counts) over access rows. With ``insn_stats=True``:
    ``insn_starts`` = (sorted uint64 byte addresses, int64 instructions starting there) and
    ``ip_first`` = (sorted uint64 ips, uint64 byte address of the first instruction whose first
    row is a fetch with that ip); both empty when the trace has no byte addresses (and
    ``ip_first`` when it has no ip column).
    """

    rows: int
    vcpus: np.ndarray
    max_gfn: int
    access_counts: np.ndarray
    distinct_gfns: int | None = None
    page_counts: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
    min_gfn: int = 0
    op_counts: np.ndarray = field(default_factory=lambda: np.zeros(5, dtype=np.int64))
    insn_starts: tuple[np.ndarray, np.ndarray] | None = None
    ip_first: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def control_records(self) -> int:
        """Rows of op 1-4."""
        return int(self.op_counts[1:].sum())


# First capacity of a _Tally (keys); tests shrink it so tables grow many times.
_TALLY_START = 1 << 11


class _Tally:
    """Per distinct uint64 key over every batch fed (in order): ``cols`` int64 counts, or the
    first value seen (``first``). Memory ~ distinct keys, not rows.

    An open-addressing hash table (Numba kernels below) that doubles at half full, asking the
    budget first; a batch's rows go straight into it, so nothing is sorted until ``result()``
    sorts the keys once (sorting every batch and merging sorted runs, as before, cost 2-3x the
    whole validation pass on the bench trace).
    """

    def __init__(self, cols: int, first: bool, what: str, unit: str):
        self.what, self.unit = what, unit
        self.keys = np.empty(_TALLY_START, np.uint64)
        self.vals = np.zeros((_TALLY_START, cols), np.uint64 if first else np.int64)
        self.slots = np.full(2 * _TALLY_START, -1, np.int64)  # index into keys, -1: empty
        self.m = 0

    def feed(self, kernel, *args) -> None:
        """Run ``kernel(slots, keys, vals, m, *args, i)`` from row 0, growing the table each
        time it stops for room, until it has taken every row."""
        i, n = 0, len(args[0])
        while True:
            i, self.m = kernel(self.slots, self.keys, self.vals, self.m, *args, i)
            if i == n:
                return
            self._grow()

    def _grow(self) -> None:
        cap = 2 * len(self.keys)
        # the new keys, values and slots, while the old ones are still held
        need = cap * (self.keys.itemsize + self.vals.itemsize * self.vals.shape[1] + 16)
        budget.ensure(need, f"{self.what} ({cap:,} {self.unit})")
        keys = np.empty(cap, np.uint64)
        keys[: self.m] = self.keys[: self.m]
        vals = np.zeros((cap, self.vals.shape[1]), self.vals.dtype)
        vals[: self.m] = self.vals[: self.m]
        self.keys, self.vals = keys, vals
        self.slots = np.full(2 * cap, -1, np.int64)
        _tally_rehash(self.slots, self.keys, self.m)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys uint64 sorted, their values: (m, cols), or (m,) for one column)."""
        order = np.argsort(self.keys[: self.m], kind="stable")
        vals = self.vals[: self.m][order]
        return self.keys[: self.m][order], vals[:, 0] if vals.shape[1] == 1 else vals


def _first_true(mask: np.ndarray) -> int | None:
    if len(mask) == 0:
        return None
    i = int(np.argmax(mask))
    return i if mask[i] else None


def _bound_mask(arr: np.ndarray, lo: int, hi: int) -> np.ndarray | None:
    """Mask of values outside [lo, hi]; None when the dtype cannot hold such values."""
    info = np.iinfo(arr.dtype)
    mask = None
    if info.min < lo:
        mask = arr < np.array(lo, dtype=arr.dtype)
    if info.max > hi:
        above = arr > np.array(hi, dtype=arr.dtype)
        mask = above if mask is None else mask | above
    return mask


class _FirstError:
    """Tracks the earliest offending row of a batch: later checks only look before it."""

    def __init__(self, label: str, start: int, n: int):
        self.label, self.start, self.limit = label, start, n
        self.message: str | None = None

    def found(self, i: int, col: str | None, text: str) -> None:
        if i < self.limit:
            self.limit = i
            where = "" if col is None else f', column "{col}"'
            self.message = f"{self.label}: row {self.start + i}{where}: {text}"


def _proven_clean(col: str, stat) -> tuple[int, int] | None:
    """(min, max) of a column chunk when its Parquet statistics prove that every value is
    present and within the column's bounds, so the chunk need not be read; else None."""
    if stat is None or not stat.has_min_max or not stat.has_null_count or stat.null_count:
        return None
    lo, hi, _ = _BOUNDS.get(col, _U64_BOUNDS)
    mn, mx = stat.min, stat.max
    if not isinstance(mn, int) or not isinstance(mx, int) or mn < lo or mx > hi:
        return None
    return mn, mx


# Always read: access (access mix), vcpu (vCPU set, tsc order), tsc (order check), the
# address column (gfns index the engine's tables, so their range is taken from the values,
# never from statistics a writer may have got wrong), and insn and ip: replay reads them and
# checks what it reads, so validate must not take a footer's word for them either.
_ALWAYS_READ = ("gpa", "gfn", "access", "vcpu", "tsc", "insn", "ip")
_NO_VCPU = np.zeros(1, dtype=np.uint16)  # stands in for a missing vcpu column (_tsc_order)


def validate(trace_or_path, page_counts: bool = False, insn_stats: bool = False) -> TraceStats:
    """Check every value of a trace in one streaming pass (SPEC §2); return its TraceStats
    (with ``insn_stats``, also what breakpoint selectors need: see TraceStats).

    Raises TraceError naming the file, the 0-based row of the first offending row, the
    column, what was expected and what was found. Chunks of the optional columns ``insn``,
    ``ip`` and ``gla`` whose Parquet statistics prove them clean (no nulls, in bounds) are
    not read.
    """
    tr = open_trace(trace_or_path)
    label = str(trace_or_path.path if isinstance(trace_or_path, Trace) else trace_or_path)
    v = Validator(tr, page_counts=page_counts, label=label, insn_stats=insn_stats)
    for start, raw in tr._raw(v.order, None, plan=v.plan):
        v.check(start, raw)
    return v.result()


def _group_stats(pf: pq.ParquetFile, g: int) -> dict:
    """{file column: Parquet statistics (or None)} of row group ``g``."""
    rg = pf.metadata.row_group(g)
    return {rg.column(j).path_in_schema: rg.column(j).statistics for j in range(rg.num_columns)}


def quick_stats(trace_or_path) -> TraceStats | None:
    """Rows, gfn range and a superset of the vCPUs, from Parquet metadata (and the vcpu
    column when its statistics are missing).

    For a replay that checks every value on the batches it decodes (``Validator``), which
    then learns the exact vCPU set: ``vcpus`` here is every number between the smallest and
    largest vcpu the statistics prove, and ``access_counts`` stay zero. None when statistics
    do not prove the address range, or that every op is 0 (control rows leave rows out of
    max_gfn and the vCPU set), or a vcpu value is null or out of range; validate() then
    reports what is wrong.
    """
    tr = open_trace(trace_or_path)
    if tr.rows == 0:
        return None
    lo, hi = [], []
    vcpu_stats = []
    with tr._parquet() as pf:
        for g in range(tr.row_groups):
            stats = _group_stats(pf, g)
            proven = _proven_clean(tr.address_column, stats.get(tr.address_column))
            if proven is None:
                return None
            if "op" in tr.columns and (_proven_clean("op", stats.get("op")) or (0, 1))[1] != 0:
                return None  # control rows: max_gfn and the vCPU set leave some rows out
            lo.append(proven[0])
            hi.append(proven[1])
            vcpu_stats.append(_proven_clean("vcpu", stats.get("vcpu")))
    seen = np.zeros(VCPU_LIMIT, dtype=bool)
    if "vcpu" not in tr.columns:
        seen[0] = True
    elif all(v is not None for v in vcpu_stats):
        seen[min(v[0] for v in vcpu_stats) : max(v[1] for v in vcpu_stats) + 1] = True
    else:
        for _, raw in tr._raw(["vcpu"], None):
            if raw["vcpu"].null_count:
                return None
            v = raw["vcpu"].to_numpy(zero_copy_only=False)
            if v.min() < 0 or v.max() >= VCPU_LIMIT:
                return None
            seen |= np.bincount(v.astype(np.intp), minlength=VCPU_LIMIT) > 0
    shift = 12 if tr.address_column == "gpa" else 0
    return TraceStats(
        rows=tr.rows,
        vcpus=np.flatnonzero(seen).astype(np.uint16),
        max_gfn=max(hi) >> shift,
        access_counts=np.zeros(8, dtype=np.int64),
        min_gfn=min(lo) >> shift,
    )


class Validator:
    """The value checks of :func:`validate`, fed one decoded batch at a time.

    ``validate`` drives it over a whole file; ``Trace.batches(validator=...)`` runs it on the
    batches a replay decodes anyway, before handing them out. Batches must come in order.
    """

    def __init__(
        self,
        tr: Trace,
        page_counts: bool = False,
        label: str | None = None,
        insn_stats: bool = False,
    ):
        #: how messages name the file (the path as the user gave it)
        self.label = str(tr.path) if label is None else label
        if tr.rows == 0:
            raise TraceError(f"{self.label}: empty trace (0 rows), expected at least one access")
        self.addr = tr.address_column
        #: file columns to check, in schema order
        self.order = [c for c in TRACE_SCHEMA if c in tr.columns]
        self.page_counts = page_counts
        self.rows = 0
        self.vcpu_seen = np.zeros(VCPU_LIMIT, dtype=bool)
        self.access_counts = np.zeros(8, dtype=np.int64)
        self.last_tsc = np.zeros(VCPU_LIMIT, dtype=np.uint64)
        self.last_row = np.full(VCPU_LIMIT, -1, dtype=np.int64)
        self.gfn_lo: list[int] = []
        self.gfn_hi: list[int] = []
        what = f"{self.label}: counting rows per page"
        self.pages = _Tally(4, False, what, "gfn counts") if page_counts else None
        self.shift = 12 if self.addr == "gpa" else 0
        # control rows and instructions: op decides what access may be; insn the 1024-row limit
        self.has_op = "op" in tr.columns
        self.access_bound = (0, 7, "an access mask in 0..7") if self.has_op else _BOUNDS["access"]
        self.op_counts = np.zeros(5, dtype=np.int64)
        self.run_insn = np.zeros(VCPU_LIMIT, dtype=np.uint64)  # per vCPU: current insn id,
        self.run_len = np.zeros(VCPU_LIMIT, dtype=np.int64)  # its rows so far (0: none yet)
        self.insn_stats = insn_stats
        self.byte_addresses = tr.byte_addresses
        what = f"{self.label}: counting instruction starts"
        self.starts = _Tally(1, False, what, "byte addresses") if insn_stats else None
        self.ip_first = _Tally(1, True, what, "ips") if insn_stats else None
        self.always = set(_ALWAYS_READ) | {"op", "insn"} | ({"ip"} if insn_stats else set())

    def plan(self, pf, g) -> list[str]:
        """File columns row group ``g`` must be read for: _ALWAYS_READ, op, insn (and ip for
        insn_stats), and the others unless their statistics prove them clean (no nulls, in
        bounds)."""
        stats = _group_stats(pf, g)
        return [
            col
            for col in self.order
            if col in self.always or _proven_clean(col, stats.get(col)) is None
        ]

    def check(self, start: int, raw: dict[str, pa.Array]) -> None:
        """Check the rows from global row ``start`` ({file column: arrow array}); raises
        TraceError at the first offending row."""
        n = len(raw["access"])
        cols = [c for c in self.order if c in raw]
        first = _FirstError(self.label, start, n)
        for col in cols:  # nulls first: values behind a null are meaningless
            arr = raw[col]
            if arr.null_count:
                i = _first_true(arr.is_null().to_numpy(zero_copy_only=False)[: first.limit])
                if i is not None:
                    first.found(i, col, "expected a value (nulls are not allowed), found null")
        values = {}
        for col in cols:
            arr = raw[col].slice(0, first.limit).to_numpy(zero_copy_only=False)
            lo, hi, text = self.access_bound if col == "access" else _BOUNDS.get(col, _U64_BOUNDS)
            mask = _bound_mask(arr[: first.limit], lo, hi)
            i = None if mask is None else _first_true(mask)
            if i is not None:
                first.found(i, col, f"expected {text}, found {arr[i]}")
            values[col] = arr
        vcpu = op = starts = None
        if first.limit:
            k = first.limit
            if "vcpu" in values:
                vcpu = np.ascontiguousarray(values["vcpu"][:k], dtype=np.uint16)
            if self.has_op:
                op = np.ascontiguousarray(values["op"][:k], dtype=np.uint8)
                acc = values["access"][:k]
                # an access row (op 0) needs access 1..7, a control row access 0
                i = _first_true((op == 0) == (acc == 0))
                if i is not None:
                    text = (
                        "expected an access mask in 1..7 on an access row (op 0), found 0"
                        if op[i] == 0
                        else f"expected 0 on a control row (op {op[i]}), found {acc[i]}"
                    )
                    first.found(i, "access", text)
            has_vcpu = vcpu is not None
            if "tsc" in values and first.limit:
                k = first.limit
                tsc = np.ascontiguousarray(values["tsc"][:k], dtype=np.uint64)
                i = _tsc_order(
                    tsc,
                    vcpu if has_vcpu else _NO_VCPU,
                    has_vcpu,
                    op,
                    start,
                    self.last_tsc,
                    self.last_row,
                )
                if i >= 0:
                    v = int(vcpu[i]) if has_vcpu else 0
                    first.found(
                        i,
                        "tsc",
                        f"expected non-decreasing tsc per vCPU (vCPU {v} was at "
                        f"{int(self.last_tsc[v])} in row {int(self.last_row[v])}), "
                        f"found {int(tsc[i])}",
                    )
            if first.limit:
                k = first.limit
                insn = (
                    np.ascontiguousarray(values["insn"][:k], dtype=np.uint64)
                    if "insn" in values
                    else None
                )
                if self.insn_stats:
                    starts = np.zeros(k, dtype=np.bool_)
                access = np.ascontiguousarray(values["access"][:k], dtype=np.uint8)
                before = (self.run_insn.copy(), self.run_len.copy()) if insn is not None else None
                longest = _scan_rows(
                    access,
                    vcpu,
                    op,
                    insn,
                    starts,
                    self.access_counts,
                    self.op_counts,
                    self.vcpu_seen,
                    self.run_insn,
                    self.run_len,
                )
                if longest > INSN_ROW_LIMIT:
                    i = _insn_overflow(vcpu, op, insn, *before)
                    v = int(vcpu[i]) if has_vcpu else 0
                    first.found(
                        i,
                        None,
                        f"instruction has more than {INSN_ROW_LIMIT} rows (insn ids must "
                        f"change per instruction): vCPU {v}, insn {int(insn[i])}",
                    )
        if first.message is not None:
            raise TraceError(first.message)

        access = np.ascontiguousarray(values["access"], dtype=np.uint8)
        if self.addr in values:
            gfn = values[self.addr].astype(np.uint64, copy=False) >> np.uint64(self.shift)
            g_all, g_acc, a_acc = gfn, gfn, access
            if op is not None and op.any():
                # max_gfn: access rows and op 3/4 rows; page counts: access rows
                g_all = gfn[(op == 0) | (op >= 3)]
                g_acc, a_acc = gfn[op == 0], access[op == 0]
            if len(g_all):
                self.gfn_lo.append(int(g_all.min()))
                self.gfn_hi.append(int(g_all.max()))
            if self.pages is not None and len(g_acc):
                self.pages.feed(_tally_pages, g_acc, np.ascontiguousarray(a_acc))
            if self.insn_stats and self.byte_addresses:
                self._insn_stats(values, starts, access, gfn)
        self.rows += n

    def _insn_stats(self, values, starts, access, gfn) -> None:
        """Add the byte addresses of the instructions that start in this batch with a fetch."""
        # a fetch has access bit 4, so it is an access row (control rows are access 0)
        idx = np.flatnonzero(starts & ((access & 4) != 0))
        ip = values["ip"][idx].astype(np.uint64, copy=False) if "ip" in values else None
        if self.addr == "gpa":
            addr = values["gpa"][idx].astype(np.uint64, copy=False)
        else:
            addr = (gfn[idx] << np.uint64(12)) | (ip & np.uint64(0xFFF))
        self.starts.feed(_tally_rows, np.ascontiguousarray(addr))
        if ip is not None:
            self.ip_first.feed(_tally_first, np.ascontiguousarray(ip), addr)

    def result(self) -> TraceStats:
        """TraceStats of every row checked so far (the whole trace once it has been fed)."""
        counts = None
        distinct = None
        if self.pages is not None:
            gfns, per = self.pages.result()
            counts = {}
            for j, key in enumerate(("touched", "read", "written", "executed")):
                seen = per[:, j] > 0
                counts[key] = (gfns[seen], per[seen, j])
            distinct = len(gfns)
        insn_starts = ip_first = None
        if self.insn_stats:
            insn_starts = self.starts.result()
            ip_first = self.ip_first.result()
        return TraceStats(
            rows=self.rows,
            vcpus=np.flatnonzero(self.vcpu_seen).astype(np.uint16),
            max_gfn=max(self.gfn_hi, default=0),
            access_counts=self.access_counts,
            distinct_gfns=distinct,
            page_counts=counts,
            min_gfn=min(self.gfn_lo, default=0),
            op_counts=self.op_counts,
            insn_starts=insn_starts,
            ip_first=ip_first,
        )


@njit(cache=True, nogil=True)
def _scan_rows(
    access, vcpu, op, insn, starts, access_counts, op_counts, vcpu_seen, run_insn, run_len
):
    """Count rows and follow instructions (SPEC §2); values are in range already.

    Adds rows per access value to ``access_counts`` (int64 (8,)) and per op to ``op_counts``
    (int64 (5,)), marks ``vcpu_seen`` (bool (VCPU_LIMIT,)) for rows of op 0-2. access uint8
    (n,); vcpu uint16 (n,), op uint8 (n,), insn uint64 (n,) or None when the trace lacks the
    column (vCPU 0, op 0, each row its own instruction: Numba compiles the None branches
    away, which keeps the common path as fast as counting alone). ``run_insn`` uint64 /
    ``run_len`` int64 (VCPU_LIMIT,) carry each vCPU's current instruction id and its rows so
    far across batches; op 3/4 rows belong to no instruction. ``starts`` (bool (n,) or None)
    is set on every row that starts an instruction. Returns the most rows any instruction
    reached (the caller finds the row past INSN_ROW_LIMIT with :func:`_insn_overflow`: an exit
    from this loop keeps Numba from compiling it into the fast form).
    """
    cur = -1  # the vCPU whose instruction state is in cur_insn / cur_len (registers)
    cur_insn = np.uint64(0)
    cur_len = 0
    longest = 0
    for i in range(len(access)):
        access_counts[access[i]] += 1
        if op is not None:
            o = op[i]
            op_counts[o] += 1
            if o >= 3:
                continue
        v = 0
        if vcpu is not None:
            v = np.int64(vcpu[i])
        if v != cur:
            vcpu_seen[v] = True
            if cur >= 0:
                run_insn[cur], run_len[cur] = cur_insn, cur_len
            cur, cur_insn, cur_len = v, run_insn[v], run_len[v]
        if insn is not None:
            x = insn[i]
            # branch-free: a new instruction every second row or so defeats branch prediction
            same = np.int64((cur_len > 0) & (x == cur_insn))
            cur_len = cur_len * same + 1
            cur_insn = x
            longest = max(longest, cur_len)
            if starts is not None:
                starts[i] = same == 0
        else:
            longest = 1
            if starts is not None:
                starts[i] = True
    if cur >= 0:
        run_insn[cur], run_len[cur] = cur_insn, cur_len
    if op is None:
        op_counts[0] += len(access)
    return longest


@njit(cache=True, nogil=True, inline="always")
def _tally_slot(slots, keys, key):
    """Slot of ``key`` in a _Tally's table (``slots`` int64, a power of two, -1 empty; an
    entry is an index into ``keys`` uint64), or the empty slot where it goes."""
    mask = len(slots) - 1
    j = np.int64((key * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(20)) & mask  # Fibonacci hash
    while slots[j] >= 0 and keys[slots[j]] != key:
        j = (j + 1) & mask
    return j


@njit(cache=True, nogil=True, inline="always")
def _tally_entry(slots, keys, m, key):
    """(entry of ``key``, entries after it): the entry is new when it equals ``m``, or -1
    when the table is half full and must grow first."""
    j = _tally_slot(slots, keys, key)
    k = slots[j]
    if k >= 0:
        return k, m
    if m == len(keys):  # as many keys as half the slots: grow, so probes stay short
        return np.int64(-1), m
    slots[j] = m
    keys[m] = key
    return m, m + 1


@njit(cache=True, nogil=True)
def _tally_rehash(slots, keys, m):
    """Put entries ``0..m`` of ``keys`` into the empty ``slots``."""
    for k in range(m):
        slots[_tally_slot(slots, keys, keys[k])] = k


@njit(cache=True, nogil=True)
def _tally_pages(slots, keys, vals, m, gfn, access, i):
    """Count rows ``i..`` per gfn (uint64 (n,)) into ``vals`` int64 (cap, 4): rows, then rows
    reading, writing, executing (``access`` uint8 (n,)). Returns (row it stopped at, n when
    done; entries): it stops where the table must grow."""
    while i < len(gfn):
        k, m = _tally_entry(slots, keys, m, gfn[i])
        if k < 0:
            break
        a = access[i]
        vals[k, 0] += 1
        vals[k, 1] += a & 1
        vals[k, 2] += (a >> 1) & 1
        vals[k, 3] += (a >> 2) & 1
        i += 1
    return i, m


@njit(cache=True, nogil=True)
def _tally_rows(slots, keys, vals, m, key, i):
    """Count rows ``i..`` per ``key`` (uint64 (n,)) into ``vals`` int64 (cap, 1); as
    :func:`_tally_pages`."""
    while i < len(key):
        k, m = _tally_entry(slots, keys, m, key[i])
        if k < 0:
            break
        vals[k, 0] += 1
        i += 1
    return i, m


@njit(cache=True, nogil=True)
def _tally_first(slots, keys, vals, m, key, value, i):
    """Keep, per ``key`` (uint64 (n,)), the ``value`` (uint64 (n,)) of its first row in
    ``vals`` uint64 (cap, 1); as :func:`_tally_pages`."""
    while i < len(key):
        k, m2 = _tally_entry(slots, keys, m, key[i])
        if k < 0:
            break
        if m2 > m:
            vals[k, 0] = value[i]
        m = m2
        i += 1
    return i, m


@njit(cache=True, nogil=True)
def _insn_overflow(vcpu, op, insn, run_insn, run_len):
    """Index of the first row past INSN_ROW_LIMIT rows of its instruction, or -1; arrays as
    in :func:`_scan_rows`, ``run_insn``/``run_len`` as they were before the batch (changed)."""
    for i in range(len(insn)):
        if op is not None and op[i] >= 3:
            continue
        v = 0
        if vcpu is not None:
            v = np.int64(vcpu[i])
        if run_len[v] > 0 and insn[i] == run_insn[v]:
            run_len[v] += 1
            if run_len[v] > INSN_ROW_LIMIT:
                return i
        else:
            run_insn[v] = insn[i]
            run_len[v] = 1
    return -1


@njit(cache=True, nogil=True)
def _tsc_order(tsc, vcpu, has_vcpu, op, start, last_tsc, last_row):
    """Index of the first row whose tsc is below the previous tsc of its vCPU, or -1.

    ``tsc`` uint64 (n,), ``vcpu`` uint16 (n,) (vCPU 0 for every row unless ``has_vcpu``),
    ``op`` uint8 (n,) or None (all op 0; rows of op 3/4 have no tsc rule);
    ``last_tsc`` uint64 / ``last_row`` int64 (VCPU_LIMIT,) carry each vCPU's previous tsc and
    global row (-1: none yet) across batches and are updated up to the offending row.
    """
    for i in range(len(tsc)):
        if op is not None and op[i] >= 3:
            continue
        v = vcpu[i] if has_vcpu else 0
        if last_row[v] >= 0 and tsc[i] < last_tsc[v]:
            return i
        last_tsc[v] = tsc[i]
        last_row[v] = start + i
    return -1
