"""The cell store: finished trace x policy cells kept under ``DIR/.cells/`` for ``--resume``.

This module's one job is storing and finding cells: ``cell_key`` says what a cell's numbers
depend on (trace bytes, policy, costs, window, the code), ``store_cell`` writes one cell's
tables atomically as soon as it finishes, ``load_cell`` gives a stored cell back only if
every file is the one it was written with, and ``prune_cells`` drops cells that can never
be resumed again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import polars as pl

from altp2m_replay import __version__
from altp2m_replay.errors import (
    first_line,
)
from altp2m_replay.outdir import (
    sha256,
    write_checked,
    write_table,
)
from altp2m_replay.policy import Policy
from altp2m_replay.results import TABLES
from altp2m_replay.unit import CellOutput

CELLS = ".cells"


CELL_FORMAT = 1  # cell.json layout; a stored cell of another format is computed again


def cell_key(trace_sha: str, policy: Policy, costs: dict, window) -> str:
    """What a cell's numbers depend on: trace bytes, policy text, costs, window, and the
    code (version and source: a stored cell of other code may differ in numbers or columns)."""
    blob = json.dumps(
        [__version__, _code_digest(), trace_sha, policy.text, policy.source, costs, window],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@functools.cache
def _code_digest() -> str:
    h = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _cell_ident(trace: str, policy: str) -> str:
    return hashlib.sha256(json.dumps([trace, policy]).encode()).hexdigest()[:16]


def _cell_dir(out: Path, trace: str, policy: str, key: str) -> Path:
    """``DIR/.cells/<readable>-<hash of the names>-<key>``.

    The readable part is for people only (ASCII letters, digits, ``-`` and ``_``, at most 80
    characters, never a leading dot); the hash of the exact (trace, policy) names keeps
    ``run 1`` and ``run_1`` apart, and the whole name stays far below the 255-byte limit
    whatever the names' length.
    """
    readable = "".join(
        ch if ch.isascii() and (ch.isalnum() or ch in "-_") else "_" for ch in f"{trace}__{policy}"
    )[:80]
    return out / CELLS / f"{readable}-{_cell_ident(trace, policy)}-{key}"


def store_cell(out: Path, cell: CellOutput, key: str) -> tuple[Path, Path | None]:
    """Write one cell's tables atomically (a temporary folder renamed into place).

    Returns the cell's folder and, when a cell of the same key was there (computed again
    without --resume), where that one was moved aside: the run deletes it when it succeeds
    and puts it back when it fails."""
    final = _cell_dir(out, cell.trace, cell.policy, key)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
        for name, df in cell.tables.items():
            write_table(df, tmp / f"{name}.parquet", shown=final / f"{name}.parquet")
        meta = {
            "format": CELL_FORMAT,
            "key": key,
            "trace": cell.trace,
            "policy": cell.policy,
            "records": cell.records,
            "seconds": cell.seconds,
            "warnings": cell.warnings,
            "costs": cell.costs,
            "files": {f"{name}.parquet": sha256(tmp / f"{name}.parquet") for name in TABLES},
        }
        data = json.dumps(meta, indent=1).encode()
        write_checked(tmp / "cell.json", lambda p: p.write_bytes(data), shown=final / "cell.json")
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=".old-", dir=final.parent)) / "cell"
            os.rename(final, old)
        os.rename(tmp, final)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, old


def clear_stale_temporaries(out: Path) -> None:
    """Remove half-written cell folders a killed run left in DIR/.cells (they start with '.')."""
    cells = out / CELLS
    if cells.is_dir():
        for p in cells.iterdir():
            if p.name.startswith(".") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


_CELL_NAME = re.compile(r"[A-Za-z0-9_-]*-([0-9a-f]{16})-[0-9a-f]{24}")


def prune_cells(out: Path, current: dict[tuple[str, str], str]) -> None:
    """Remove stored cells that can never be resumed again: those of this run's (trace,
    policy) pairs with another key, and folders not named as cells are (older versions)."""
    cells = out / CELLS
    keep = {_cell_dir(out, t, p, k).name for (t, p), k in current.items()}
    idents = {_cell_ident(t, p) for t, p in current}
    for d in cells.iterdir() if cells.is_dir() else ():
        m = _CELL_NAME.fullmatch(d.name)
        if d.name not in keep and (m is None or m.group(1) in idents):
            shutil.rmtree(d, ignore_errors=True)


class _BadCell(Exception):
    pass


def _number(v, what: str, integer: bool = False):
    ok = not isinstance(v, bool) and isinstance(v, int if integer else (int, float))
    if not ok or not math.isfinite(v) or v < 0:
        raise _BadCell(f"{what} is {v!r}, expected a {'whole ' if integer else ''}number >= 0")
    return v


def load_cell(out: Path, trace: str, policy: str, key: str, warn=None) -> CellOutput | None:
    """A stored cell with this key, or None (absent, or unusable: ``warn`` says why)."""
    d = _cell_dir(out, trace, policy, key)
    if not d.is_dir():
        return None
    try:
        meta = json.loads((d / "cell.json").read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise _BadCell("cell.json is not a JSON object")
        if meta.get("format") != CELL_FORMAT:
            raise _BadCell(f"format {meta.get('format')!r}, expected {CELL_FORMAT}")
        for field, want in (("key", key), ("trace", trace), ("policy", policy)):
            if meta.get(field) != want:
                raise _BadCell(f"{field} is {meta.get(field)!r}, expected {want!r}")
        records = _number(meta.get("records"), "records", integer=True)
        seconds = _number(meta.get("seconds"), "seconds")
        warnings, costs, files = meta.get("warnings"), meta.get("costs"), meta.get("files")
        if not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
            raise _BadCell("warnings is not a list of strings")
        if not isinstance(costs, dict):
            raise _BadCell("costs is not an object")
        for k, v in costs.items():
            _number(v, f"cost {k}")
        if not isinstance(files, dict):
            raise _BadCell("files is not an object")
        tables = {}
        for name in TABLES:
            path = d / f"{name}.parquet"
            if files.get(path.name) != sha256(path):
                raise _BadCell(f"{path.name} is not the file cell.json was written with")
            tables[name] = pl.read_parquet(path)
    except (_BadCell, OSError, ValueError, RecursionError, pl.exceptions.PolarsError) as exc:
        if warn is not None:
            warn(f"{d}: stored cell not usable ({first_line(exc)}); computing it again")
        return None
    return CellOutput(trace, policy, tables, seconds, records, warnings, costs)
