"""Open a trace and stream it as numpy batches.

This module's one job is reading: ``open_trace`` checks a file's schema and metadata and
returns a ``Trace``, whose ``batches`` decode row groups into ``Batch`` objects of canonical
dtype (gfns derived from gpas when the file stores byte addresses). It checks no values;
that is ``checker``'s job, run on the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from altp2m_replay.errors import TraceError, first_line
from altp2m_replay.traces.layout import (
    _BATCH_FIELDS,
    _MAX_GROUP_READ,
    _NP_DTYPE,
    DEFAULT_ROW_GROUP,
    TRACE_SCHEMA,
    TraceMeta,
    _read_meta,
)

if TYPE_CHECKING:  # only an annotation: the checker imports this module
    from altp2m_replay.traces.checker import Validator


def trace_name(path: Path) -> str:
    """A trace's name in every output table (SPEC §10): its file name without ``.parquet``."""
    return path.name[: -len(".parquet")] if path.name.endswith(".parquet") else path.name


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
