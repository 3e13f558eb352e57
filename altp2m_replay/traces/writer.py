"""Write Parquet traces.

This module's one job is writing: ``TraceWriter`` streams chunks of columns into a
temporary file in row groups of canonical dtype and encoding, checks the metadata and
renames the file into place when closed; ``write_trace`` writes one table at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from altp2m_replay.errors import TraceError, first_line
from altp2m_replay.traces.layout import (
    _DELTA_COLUMNS,
    COMPRESSION,
    DEFAULT_ROW_GROUP,
    FORMAT_VERSION,
    META_KEY,
    TRACE_SCHEMA,
    parse_meta,
)


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
