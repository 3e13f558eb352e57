"""Trace files (SPEC §2): open, stream, validate, describe and write Parquet traces.

This module and the report/table writers are the only places that touch pyarrow for traces;
everything else sees numpy arrays through :class:`Batch`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numba import njit

from altp2m_replay import budget
from altp2m_replay.errors import TraceError, escape, first_line
from altp2m_replay.policy import TraceFacts
from altp2m_replay.schema import GFN_LIMIT, GPA_LIMIT, PAGE_BYTES, VCPU_LIMIT

META_KEY = "altp2m_replay"
FORMAT_VERSION = 1
DEFAULT_ROW_GROUP = 1_048_576

#: Canonical type of every known column, in the order files are written.
TRACE_SCHEMA: dict[str, pa.DataType] = {
    "gpa": pa.uint64(),
    "gfn": pa.uint64(),
    "access": pa.uint8(),
    "vcpu": pa.uint16(),
    "insn": pa.uint64(),
    "gla": pa.uint64(),
    "ip": pa.uint64(),
    "tsc": pa.uint64(),
    "op": pa.uint8(),
    "arg": pa.uint64(),
}
_NP_DTYPE = {name: np.dtype(t.to_pandas_dtype()) for name, t in TRACE_SCHEMA.items()}

ACCESS_NAMES = {1: "r", 2: "w", 3: "rw", 4: "x", 5: "rx", 6: "wx", 7: "rwx"}
#: control rows (SPEC §2): op -> what ``trace info`` calls their count
OP_NAMES = {1: "guest vmfuncs", 2: "cr3 writes", 3: "host drops", 4: "host maps"}
INSN_ROW_LIMIT = 1024  # rows of one instruction

# Inclusive value bounds per column and how to say them in an error message.
_BOUNDS: dict[str, tuple[int, int, str]] = {
    "gpa": (0, GPA_LIMIT - 1, "a guest-physical address below 2^48"),
    "gfn": (0, GFN_LIMIT - 1, "a gfn below 2^36"),
    "access": (1, 7, "an access mask in 1..7 (1 = read, 2 = write, 4 = execute)"),
    "vcpu": (0, VCPU_LIMIT - 1, "a vCPU number in 0..4095"),
    "op": (
        0,
        4,
        (
            "an op in 0..4 (0 = access; control rows: 1 = guest VMFUNC, 2 = CR3 write, "
            "3 = host drop, 4 = host map)"
        ),
    ),
}
_U64_BOUNDS = (0, (1 << 64) - 1, "a non-negative integer below 2^64")

# Monotonic-ish columns (ip runs along straight-line code) compress and decode far better with delta encoding than with a
# dictionary that overflows; everything else gets a dictionary (few distinct values).
_DELTA_COLUMNS = ("insn", "tsc", "ip")
COMPRESSION = ("lz4", None)  # decoding is replay's bottleneck: lz4 over zstd's smaller files
_BATCH_FIELDS = ("gfn", "access", "vcpu", "insn", "tsc", "ip", "gla", "op", "arg", "gpa")
_MAX_GROUP_READ = 4 * DEFAULT_ROW_GROUP  # bigger row groups are read in slices


# --------------------------------------------------------------------------- metadata
@dataclass(frozen=True)
class TraceMeta:
    """Parsed trace metadata (the JSON under ``META_KEY``); all fields optional in the file."""

    format: int = FORMAT_VERSION
    source: str | None = None
    vcpus: int | None = None
    ram: list[tuple[int, int]] | None = None
    gfn_sets: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    #: function name -> virtual address (breakpoint selectors)
    symbols: dict[str, int] = field(default_factory=dict)
    #: process name -> CR3 value (CR3 rules)
    processes: dict[str, int] = field(default_factory=dict)


def _named_u64(value, key: str, what: str) -> dict[str, int]:
    """Check a {"NAME": integer} object of metadata; raise ValueError naming ``key``."""
    if not isinstance(value, dict):
        raise ValueError(f'"{key}" must be an object of NAME: {what}, found {_short_json(value)}')
    out = {}
    for name, v in value.items():
        if not isinstance(name, str):
            raise ValueError(f'"{key}" names must be strings, found {_short_json(name)}')
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 64:
            raise ValueError(
                f'"{key}.{name}" must be {what}, an integer in 0..2^64-1, found {_short_json(v)}'
            )
        out[name] = v
    return out


def _short_json(value) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _ranges(value, where: str) -> list[tuple[int, int]]:
    """Check a list of [first, last] gfn pairs; raise ValueError naming ``where``."""
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list of [first_gfn, last_gfn] pairs")
    out = []
    for item in value:
        ok = (
            isinstance(item, list | tuple)
            and len(item) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in item)
            and 0 <= item[0] <= item[1] < GFN_LIMIT
        )
        if not ok:
            raise ValueError(
                f"{where} must hold [first_gfn, last_gfn] pairs with "
                f"0 <= first <= last < 2^36, found {json.dumps(item)}"
            )
        out.append((int(item[0]), int(item[1])))
    return out


def parse_meta(obj) -> TraceMeta:
    """Build a TraceMeta from decoded JSON; raise ValueError describing the first problem."""
    if not isinstance(obj, dict):
        raise ValueError("must be a JSON object")
    fmt = obj.get("format", FORMAT_VERSION)
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt != FORMAT_VERSION:
        raise ValueError(f'"format" must be {FORMAT_VERSION}, found {json.dumps(fmt)}')
    source = obj.get("source")
    if source is not None and not isinstance(source, str):
        raise ValueError(f'"source" must be a string, found {json.dumps(source)}')
    vcpus = obj.get("vcpus")
    if vcpus is not None and (
        not isinstance(vcpus, int) or isinstance(vcpus, bool) or not 1 <= vcpus <= VCPU_LIMIT
    ):
        raise ValueError(f'"vcpus" must be an integer in 1..4096, found {json.dumps(vcpus)}')
    ram = obj.get("ram")
    ram = None if ram is None else _ranges(ram, '"ram"')
    sets = obj.get("gfn_sets", {})
    if not isinstance(sets, dict):
        raise ValueError('"gfn_sets" must be an object of NAME: [[first, last], ...]')
    gfn_sets = {str(k): _ranges(v, f'"gfn_sets.{k}"') for k, v in sets.items()}
    symbols = _named_u64(obj.get("symbols", {}), "symbols", "a virtual address")
    processes = _named_u64(obj.get("processes", {}), "processes", "a CR3 value")
    return TraceMeta(
        format=fmt,
        source=source,
        vcpus=vcpus,
        ram=ram,
        gfn_sets=gfn_sets,
        symbols=symbols,
        processes=processes,
    )


def _read_meta(path, kv: dict | None) -> TraceMeta:
    raw = (kv or {}).get(META_KEY.encode())
    if raw is None:
        return TraceMeta()
    try:
        return parse_meta(json.loads(raw))
    except (ValueError, UnicodeDecodeError) as exc:
        # json.JSONDecodeError is a ValueError too.
        raise TraceError(f'{path}: metadata key "{META_KEY}": {first_line(exc)}') from None
    except RecursionError:
        raise TraceError(
            f'{path}: metadata key "{META_KEY}": arrays or objects nested too deeply'
        ) from None


def trace_name(path: Path) -> str:
    """A trace's name in every output table (SPEC §10): its file name without ``.parquet``."""
    return path.name[: -len(".parquet")] if path.name.endswith(".parquet") else path.name


# --------------------------------------------------------------------------- open
@dataclass(slots=True)
class Batch:
    """A slice of a trace as contiguous numpy arrays of canonical dtype, all of one length.

    ``start`` is the global index of the first row. ``gfn`` uint64 (``gpa >> 12`` when the
    file stores gpa), ``access`` uint8, ``vcpu`` uint16 (zeros when the file has no vcpu
    column), ``insn``/``tsc``/``ip``/``gla`` uint64, ``op`` uint8 and ``arg`` uint64, each None
    when absent from the file (an absent ``op`` means every row is an access, op 0); ``gpa``
    uint64, the file's full addresses (byte addresses, SPEC §2), None when it stores gfn.
    Columns not requested from :meth:`Trace.batches` are None.
    """

    start: int
    gfn: np.ndarray | None = None
    access: np.ndarray | None = None
    vcpu: np.ndarray | None = None
    insn: np.ndarray | None = None
    tsc: np.ndarray | None = None
    ip: np.ndarray | None = None
    gla: np.ndarray | None = None
    op: np.ndarray | None = None
    arg: np.ndarray | None = None
    gpa: np.ndarray | None = None

    def __len__(self) -> int:
        for name in _BATCH_FIELDS:
            arr = getattr(self, name)
            if arr is not None:
                return len(arr)
        return 0


class Trace:
    """An opened, schema-checked trace file. Holds no open file handle (safe to pickle)."""

    def __init__(self, path: Path, pf: pq.ParquetFile, meta: TraceMeta):
        md = pf.metadata
        self.path: Path = path
        self.name: str = trace_name(path)
        self.rows: int = md.num_rows
        self.row_groups: int = md.num_row_groups
        self.group_rows: tuple[int, ...] = tuple(
            md.row_group(i).num_rows for i in range(md.num_row_groups)
        )
        schema = pf.schema_arrow
        self.columns: frozenset[str] = frozenset(n for n in schema.names if n in TRACE_SCHEMA)
        self.types: dict[str, pa.DataType] = {n: schema.field(n).type for n in self.columns}
        #: "gpa" or "gfn": which address column the file stores.
        self.address_column: str = "gpa" if "gpa" in self.columns else "gfn"
        self.meta: TraceMeta = meta
        self.size: int = path.stat().st_size
        #: whether instructions have byte addresses (SPEC §2): a gpa column, or gfn and ip
        self.byte_addresses: bool = "gpa" in self.columns or "ip" in self.columns

    def __repr__(self) -> str:
        return f"Trace({str(self.path)!r}, rows={self.rows}, columns={sorted(self.columns)})"

    def _parquet(self) -> pq.ParquetFile:
        try:
            # pre_buffer: coalesced reads of a row group's column chunks decode faster
            return pq.ParquetFile(self.path, pre_buffer=True)
        except (OSError, pa.ArrowException) as exc:
            raise TraceError(f"{self.path}: cannot read: {first_line(exc)}") from None

    def _raw(
        self, names: list[str], batch_rows: int | None, plan=None
    ) -> Iterator[tuple[int, dict[str, pa.Array]]]:
        """Yield (global start row, {file column: arrow array}) for the given file columns.

        ``plan(pf, group) -> names`` may pick the columns per row group (batch_rows=None).
        """
        start = 0
        try:
            with self._parquet() as pf:
                if batch_rows is not None:
                    if batch_rows < 1:
                        raise ValueError("batch_rows must be >= 1")
                    groups = [(names, pf.iter_batches(batch_size=batch_rows, columns=names))]
                else:
                    groups = (
                        self._group_parts(pf, i, n, plan(pf, i) if plan else names)
                        for i, n in enumerate(self.group_rows)
                    )
                for cols, parts in groups:
                    for part in parts:
                        n = part.num_rows
                        if n == 0:
                            continue
                        yield start, {name: _combine(part.column(name)) for name in cols}
                        start += n
        except (OSError, pa.ArrowException) as exc:
            raise TraceError(
                f"{self.path}: cannot read row {start} onwards: {first_line(exc)}"
            ) from None

    @staticmethod
    def _group_parts(pf, i: int, n: int, cols: list[str]):
        if n <= _MAX_GROUP_READ:
            return cols, [pf.read_row_group(i, columns=cols)]
        return cols, pf.iter_batches(batch_size=DEFAULT_ROW_GROUP, row_groups=[i], columns=cols)

    def batches(
        self,
        batch_rows: int | None = None,
        columns=("gfn", "access", "vcpu", "insn", "tsc"),
        validator: Validator | None = None,
    ) -> Iterator[Batch]:
        """Stream the trace as :class:`Batch` objects; one per row group unless ``batch_rows``.

        ``columns`` picks Batch fields ("gfn" means gpa-or-gfn). Without a ``validator`` there
        are no value checks (values that do not fit are silently wrapped); with one, each
        batch is checked by it before it is handed out, reading what it needs too.
        """
        wanted = tuple(columns)
        unknown = set(wanted) - set(_BATCH_FIELDS)
        if unknown:
            raise ValueError(
                f"unknown batch columns {sorted(unknown)}; choose from {_BATCH_FIELDS}"
            )
        names = []
        for col in wanted:
            src = self.address_column if col == "gfn" else col
            if src in self.columns and src not in names:
                names.append(src)
        plan = None
        if validator is not None:
            want = list(names)
            names += [c for c in validator.order if c not in names]

            def plan(pf, g):  # per row group: what the batch needs and what the checks need
                need = set(want) | set(validator.plan(pf, g))
                return [c for c in names if c in need]

        for start, raw in self._raw(names, batch_rows, plan=plan):
            if validator is not None:
                validator.check(start, raw)
            n = len(next(iter(raw.values()))) if raw else 0
            out = Batch(start=start)
            for col in wanted:
                if col == "gfn":
                    arr = _to_numpy(raw[self.address_column], "gfn")
                    if self.address_column == "gpa":
                        arr = arr >> np.uint64(12)
                    out.gfn = arr
                elif col in raw:
                    setattr(out, col, _to_numpy(raw[col], col))
                elif col == "vcpu":
                    out.vcpu = np.zeros(n, dtype=np.uint16)
                elif col == "access":  # required by open_trace, so present
                    raise AssertionError("access column missing")
            yield out


def _combine(col) -> pa.Array:
    """A ChunkedArray (from a row-group read) as one contiguous Array."""
    if isinstance(col, pa.ChunkedArray):
        return col.chunk(0) if col.num_chunks == 1 else pa.concat_arrays(col.chunks)
    return col


def _to_numpy(arr: pa.Array, col: str) -> np.ndarray:
    """Arrow integer array -> contiguous numpy array of the column's canonical dtype."""
    out = arr.to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(out, dtype=_NP_DTYPE[col])


def open_trace(path) -> Trace:
    """Open ``path`` and check the trace schema (SPEC §2); values are checked by validate()."""
    if isinstance(path, Trace):
        return path
    p = Path(path)
    if not p.exists():
        raise TraceError(f"{path}: no such file")
    if p.is_dir():
        raise TraceError(f"{path}: is a directory, expected a Parquet trace file")
    if not p.is_file():  # a FIFO or a device would block or never end
        raise TraceError(f"{path}: not a regular file, expected a Parquet trace file")
    try:
        with pq.ParquetFile(p) as pf:
            schema = pf.schema_arrow
            meta = _read_meta(path, pf.metadata.metadata)
            names = schema.names
            has_gpa, has_gfn = "gpa" in names, "gfn" in names
            if has_gpa and has_gfn:
                raise TraceError(f'{path}: has both "gpa" and "gfn" columns, expected exactly one')
            if not (has_gpa or has_gfn):
                raise TraceError(f'{path}: no "gpa" or "gfn" column, expected exactly one')
            if "access" not in names:
                raise TraceError(f'{path}: no "access" column, expected uint8 access masks')
            for name in names:
                if name in TRACE_SCHEMA and names.count(name) > 1:
                    raise TraceError(f'{path}: column "{name}" appears {names.count(name)} times')
                if name not in TRACE_SCHEMA:
                    continue  # unknown extra columns are allowed and ignored
                typ = schema.field(name).type
                if not pa.types.is_integer(typ):
                    raise TraceError(
                        f'{path}: column "{name}" must be {TRACE_SCHEMA[name]}, found {typ}'
                    )
            return Trace(p, pf, meta)
    except TraceError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise TraceError(f"{path}: not a Parquet file ({first_line(exc)})") from None


# --------------------------------------------------------------------------- validate
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


class _CountMerger:
    """Sums (key, count) pairs streamed in batches; memory ~ distinct keys, not rows."""

    def __init__(self, label: str = "trace"):
        self.label = label
        self.keys = np.empty(0, np.uint64)
        self.counts = np.empty(0, np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_len = 0

    def add(self, keys: np.ndarray, counts: np.ndarray) -> None:
        keep = counts > 0
        self._pending.append((keys[keep], counts[keep]))
        self._pending_len += int(keep.sum())
        # Merge lazily: re-sorting the accumulated keys on every batch would be quadratic.
        if self._pending_len > max(1 << 22, 2 * len(self.keys)):
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        n = len(self.keys) + sum(len(k) for k, _ in self._pending)
        # concatenated keys and counts, the sort order and the sorted copies: 40 bytes a key
        budget.ensure(40 * n, f"{self.label}: counting rows per page ({n:,} gfn counts)")
        keys = np.concatenate([self.keys] + [k for k, _ in self._pending])
        counts = np.concatenate([self.counts] + [c for _, c in self._pending])
        self._pending, self._pending_len = [], 0
        order = np.argsort(keys, kind="stable")
        keys, counts = keys[order], counts[order]
        if len(keys) == 0:
            self.keys, self.counts = keys, counts
            return
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        self.keys = keys[starts]
        self.counts = np.add.reduceat(counts, starts).astype(np.int64)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self._merge()
        return self.keys, self.counts


class _FirstMerger(_CountMerger):
    """Keeps, per key, the value fed with its first occurrence (batches fed in order);
    memory ~ distinct keys. ``result()`` gives (sorted uint64 keys, uint64 values)."""

    def __init__(self):
        super().__init__()
        self.counts = np.empty(0, np.uint64)  # the values

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        self._pending.append((keys, values))
        self._pending_len += len(keys)
        if self._pending_len > max(1 << 22, 2 * len(self.keys)):
            self._merge()

    def _merge(self) -> None:
        if self._pending:
            keys = np.concatenate([self.keys] + [k for k, _ in self._pending])
            values = np.concatenate([self.counts] + [v for _, v in self._pending])
            self._pending, self._pending_len = [], 0
            self.keys, first = np.unique(keys, return_index=True)  # first occurrences
            self.counts = values[first]


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
        self.mergers = (
            {k: _CountMerger(self.label) for k in ("read", "written", "executed", "touched")}
            if page_counts
            else None
        )
        self.shift = 12 if self.addr == "gpa" else 0
        # control rows and instructions: op decides what access may be; insn the 1024-row limit
        self.has_op = "op" in tr.columns
        self.access_bound = (0, 7, "an access mask in 0..7") if self.has_op else _BOUNDS["access"]
        self.op_counts = np.zeros(5, dtype=np.int64)
        self.run_insn = np.zeros(VCPU_LIMIT, dtype=np.uint64)  # per vCPU: current insn id,
        self.run_len = np.zeros(VCPU_LIMIT, dtype=np.int64)  # its rows so far (0: none yet)
        self.insn_stats = insn_stats
        self.byte_addresses = tr.byte_addresses
        self.starts = _CountMerger() if insn_stats else None
        self.ip_first = _FirstMerger() if insn_stats else None
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
            if self.mergers is not None and len(g_acc):
                uniq, inv = np.unique(g_acc, return_inverse=True)
                m = len(uniq)
                self.mergers["touched"].add(uniq, np.bincount(inv, minlength=m))
                for key, bit in (("read", 1), ("written", 2), ("executed", 4)):
                    sel = (a_acc & bit) != 0
                    self.mergers[key].add(uniq, np.bincount(inv[sel], minlength=m))
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
        uniq, counts = np.unique(addr, return_counts=True)
        self.starts.add(uniq, counts)
        if ip is not None:
            uniq, first = np.unique(ip, return_index=True)
            self.ip_first.add(uniq, addr[first])

    def result(self) -> TraceStats:
        """TraceStats of every row checked so far (the whole trace once it has been fed)."""
        counts = None
        distinct = None
        if self.mergers is not None:
            counts = {k: m.result() for k, m in self.mergers.items()}
            distinct = len(counts["touched"][0])
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


# --------------------------------------------------------------------------- facts
def trace_facts(
    path: Path, page_counts: bool, insn_stats: bool = False
) -> tuple[TraceStats, TraceFacts]:
    """Validate one trace (full streaming pass) and gather what selector resolution needs
    (``insn_stats``: also instruction starts by byte address and each ip's first one)."""
    tr = open_trace(path)
    stats = validate(tr, page_counts=page_counts, insn_stats=insn_stats)
    return stats, facts_of(tr, stats)


def facts_of(tr: Trace, stats: TraceStats) -> TraceFacts:
    """What selector resolution needs to know of an opened trace and its statistics."""
    return TraceFacts(
        max_gfn=stats.max_gfn,
        meta_ram=tr.meta.ram,
        gfn_sets=dict(tr.meta.gfn_sets or {}),
        page_counts=stats.page_counts,
        symbols=dict(tr.meta.symbols),
        processes=dict(tr.meta.processes),
        byte_addresses=tr.byte_addresses,
        insn_starts=stats.insn_starts,
        ip_first=stats.ip_first,
    )


def replay_facts(
    path: Path, page_counts: bool, insn_stats: bool = False
) -> tuple[TraceStats, TraceFacts, bool]:
    """What replay_trace needs before its first batch, and whether values are checked yet.

    Without page counts, when Parquet statistics prove the gfn range, only metadata is read
    (and the vcpu column if its statistics are missing) and the values are not checked yet
    (False): replay_trace checks every value on the batches it decodes anyway, so the trace
    is read once instead of twice (figures in docs/performance.md). Otherwise:
    trace_facts's full validation pass (True).
    """
    if not page_counts and not insn_stats:
        tr = open_trace(path)
        stats = quick_stats(tr)
        if stats is not None:
            return stats, facts_of(tr, stats), False
    stats, facts = trace_facts(path, page_counts, insn_stats)
    return stats, facts, True


# --------------------------------------------------------------------------- info
def _fmt_ranges(ranges: list[tuple[int, int]], limit: int = 4) -> str:
    parts = [f"{a:#x}-{b:#x}" if a != b else f"{a:#x}" for a, b in ranges[:limit]]
    if len(ranges) > limit:
        parts.append(f"... ({len(ranges) - limit:,} more)")
    return ", ".join(parts)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def _pages(ranges) -> int:
    return sum(b - a + 1 for a, b in ranges)


def info_text(path) -> str:
    """Multi-line human summary of a trace for ``trace info`` (validates it on the way)."""
    tr = open_trace(path)
    st = validate(tr, page_counts=True)
    vc = [int(v) for v in st.vcpus]
    vlist = ", ".join(map(str, vc)) if len(vc) <= 16 else f"{vc[0]}..{vc[-1]}"
    cols = [c for c in TRACE_SCHEMA if c in tr.columns]
    m = tr.meta
    rows = [
        ("trace", f"{tr.name} ({tr.path})"),
        ("rows", f"{st.rows:,}"),
        ("row groups", f"{tr.row_groups:,}"),
        ("file size", _fmt_bytes(tr.size)),
        ("columns", ", ".join(f"{c} ({tr.types[c]})" for c in cols)),
        ("vCPUs", f"{len(vc):,} ({vlist})"),
        ("distinct gfns", f"{st.distinct_gfns:,} ({_fmt_bytes(st.distinct_gfns * PAGE_BYTES)})"),
        ("gfn range", f"{st.min_gfn:#x} - {st.max_gfn:#x}"),
    ]
    rows += [
        (f"  {key}", f"{len(st.page_counts[key][0]):,} gfns")
        for key in ("read", "written", "executed")
    ]
    rows.append(("access mix", ""))
    accesses = max(1, int(st.op_counts[0]))  # percentages of access rows
    for value in (1, 2, 3, 4, 5, 6, 7):
        c = int(st.access_counts[value])
        if c:
            rows.append(
                (f"  {ACCESS_NAMES[value]} ({value})", f"{c:>14,}  {100.0 * c / accesses:5.1f} %")
            )
    if "op" in tr.columns:
        rows.append(("control records", f"{st.control_records:,}"))
        rows += [
            (f"  {name} ({op})", f"{int(st.op_counts[op]):>14,}") for op, name in OP_NAMES.items()
        ]
    has_meta = m.source or m.ram or m.gfn_sets or m.vcpus or m.symbols or m.processes
    rows.append(("metadata", "" if has_meta else "none"))
    if m.source:
        rows.append(("  source", m.source))
    if m.vcpus is not None:
        rows.append(("  vcpus", f"{m.vcpus:,}"))
    if m.ram:
        rows.append(("  ram", f"{_fmt_ranges(m.ram)} ({_fmt_bytes(_pages(m.ram) * PAGE_BYTES)})"))
    for name, ranges in m.gfn_sets.items():
        rows.append(
            (
                f"  set {name}",
                (
                    f"{_pages(ranges):,} pages in {len(ranges):,} "
                    f"range{'s' if len(ranges) != 1 else ''} ({_fmt_ranges(ranges, 3)})"
                ),
            )
        )
    if m.symbols:
        rows.append(("  symbols", f"{len(m.symbols):,} names"))
    if m.processes:
        rows.append(("  processes", f"{len(m.processes):,} names"))
    # names and text come from the file: show control characters escaped, never act on them
    rows = [(escape(k), escape(v)) for k, v in rows]
    width = max(len(k) for k, _ in rows) + 2
    lines = [f"{k + ':':<{width}}{v}".rstrip() for k, v in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- write
def _as_table(data, path) -> pa.Table:
    """polars DataFrame / pyarrow Table or RecordBatch / dict of arrays -> canonical Table."""
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    elif not isinstance(data, pa.Table):
        if hasattr(data, "to_arrow"):  # polars DataFrame, without importing polars here
            data = data.to_arrow()
        elif isinstance(data, dict):
            data = pa.table(
                {
                    k: v if isinstance(v, pa.Array | pa.ChunkedArray) else pa.array(v)
                    for k, v in data.items()
                }
            )
        else:
            raise TypeError(f"cannot write {type(data).__name__} as a trace")
    known = [c for c in TRACE_SCHEMA if c in data.column_names]
    extra = [c for c in data.column_names if c not in TRACE_SCHEMA]
    cols, names = [], []
    for name in known + extra:
        col = data.column(name)
        if name in TRACE_SCHEMA and col.type != TRACE_SCHEMA[name]:
            try:
                col = col.cast(TRACE_SCHEMA[name], safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise TraceError(
                    f'{path}: column "{name}" cannot be stored as '
                    f"{TRACE_SCHEMA[name]}: {first_line(exc)}"
                ) from None
        cols.append(col)
        names.append(name)
    return pa.Table.from_arrays(cols, names=names)


class TraceWriter:
    """Stream chunks into a trace file atomically: a temp file in the same folder that is
    renamed over ``path`` on a clean close and removed on error.

    ``meta`` (a dict, stored as JSON under META_KEY) may be updated until close. Chunks are
    rebuffered so every row group but the last has exactly ``row_group_size`` rows.
    """

    def __init__(self, path, meta: dict | None = None, row_group_size: int = DEFAULT_ROW_GROUP):
        if row_group_size < 1:
            raise ValueError("row_group_size must be >= 1")
        self.path = Path(path)
        self.meta = dict(meta or {})
        self.row_group_size = int(row_group_size)
        self.rows = 0
        self._tmp = self.path.parent / f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._done = False

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, data) -> None:
        """Append a chunk (same columns every time) of any type write_trace accepts."""
        table = _as_table(data, self.path)
        if self._schema is None:
            self._schema = table.schema
        elif table.schema != self._schema:
            raise ValueError(f"chunk columns {table.schema.names} differ from {self._schema.names}")
        if table.num_rows == 0:
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        if self._pending_rows >= self.row_group_size:
            self._flush(final=False)

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TraceError(
                f"{self.path}: cannot create the folder: {exc.strerror or exc}"
            ) from None
        names = self._schema.names
        self._writer = pq.ParquetWriter(
            self._tmp,
            self._schema,
            compression=COMPRESSION[0],
            compression_level=COMPRESSION[1],
            use_dictionary=[c for c in names if c not in _DELTA_COLUMNS],
            column_encoding={c: "DELTA_BINARY_PACKED" for c in names if c in _DELTA_COLUMNS},
        )

    def _flush(self, final: bool) -> None:
        try:
            self._flush_io(final)
        except OSError as exc:  # disk full, permissions: a TraceError, not an input problem
            self.abort()
            raise TraceError(f"{self.path}: cannot write: {first_line(exc)}") from None

    def _flush_io(self, final: bool) -> None:
        if self._writer is None:
            self._open()
        table = pa.concat_tables(self._pending) if len(self._pending) > 1 else self._pending[0]
        rgs = self.row_group_size
        full = table.num_rows if final else table.num_rows - table.num_rows % rgs
        if full:
            self._writer.write_table(table.slice(0, full), row_group_size=rgs)
        rest = table.slice(full)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows

    def close(self) -> Path:
        """Write remaining rows and the metadata, then move the file into place."""
        if self._done:
            return self.path
        try:
            if self._schema is None:
                raise TraceError(f"{self.path}: nothing to write")
            if self._pending_rows or self._writer is None:
                if not self._pending:
                    self._pending = [self._schema.empty_table()]
                self._flush(final=True)
            meta = {"format": FORMAT_VERSION, **self.meta}
            try:
                parse_meta(meta)
            except ValueError as exc:
                raise TraceError(f'{self.path}: metadata key "{META_KEY}": {exc}') from None
            try:
                self._writer.add_key_value_metadata(
                    {META_KEY: json.dumps(meta, separators=(",", ":"))}
                )
                self._writer.close()
                os.replace(self._tmp, self.path)
            except OSError as exc:
                raise TraceError(f"{self.path}: cannot write: {first_line(exc)}") from None
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.path

    def abort(self) -> None:
        """Drop everything written so far (idempotent)."""
        self._done = True
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None
        self._tmp.unlink(missing_ok=True)


def write_trace(
    data, path, meta: dict | None = None, row_group_size: int = DEFAULT_ROW_GROUP
) -> Path:
    """Write a whole table (polars DataFrame, pyarrow Table, dict of numpy arrays) as a trace
    file with canonical column types and ``meta`` JSON, atomically."""
    with TraceWriter(path, meta=meta, row_group_size=row_group_size) as w:
        w.write(data)
    return w.path
