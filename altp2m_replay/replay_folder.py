"""Read a ``replay`` output folder back: checked Parquet tables and the manifest.

The reading side of ``results`` (which builds the tables) and ``outdir`` (which publishes
them): ``report`` and ``compare`` both open a finished folder through these functions, so
a corrupt table, a missing column or a hand-edited manifest fails the same way, by name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from altp2m_replay.errors import OutputError, first_line


def results_dir(path) -> Path:
    """``path`` as a folder that holds ``summary.parquet``, or an ``OutputError``."""
    d = Path(path)
    if not d.exists():
        raise OutputError(f"{path}: no such folder")
    if not d.is_dir():
        raise OutputError(f"{path}: not a folder; expected a `replay` output folder")
    if not (d / "summary.parquet").is_file():
        raise OutputError(f"{path}: no summary.parquet; expected a `replay` output folder")
    return d


def read_table(
    d: Path, name: str, required: Sequence[str], *, optional: bool = False
) -> pl.DataFrame | None:
    """``d/name.parquet`` with ``required`` columns; None when absent and ``optional``."""
    path = d / f"{name}.parquet"
    if not path.is_file():
        if optional:
            return None
        raise OutputError(f"{path}: no such file")
    try:
        df = pl.read_parquet(path)
    except Exception as exc:  # polars/arrow raise several types for a corrupt file
        raise OutputError(f"{path}: not a readable Parquet table ({first_line(exc)})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise OutputError(
            f"{path}: missing column(s) {', '.join(missing)}; "
            f"expected the {name} table that `replay` writes"
        )
    _refuse_infinite(df, path)
    return df


def _refuse_infinite(df: pl.DataFrame, path: Path) -> None:
    """No report or gate can rank an infinite number (replay refuses costs that overflow)."""
    for col, dtype in df.schema.items():
        if dtype.is_float():
            bad = df[col].is_infinite().fill_null(False)
            if bad.any():
                row = int(bad.arg_max())
                raise OutputError(
                    f'{path}: row {row}, column "{col}": expected a finite number, '
                    f"found {df[col][row]}"
                )


def read_manifest(d: Path) -> dict:
    """``manifest.json`` as a dict; {} when absent (the Parquet alone can still be rendered)."""
    path = d / "manifest.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OutputError(f"{path}: not readable JSON ({exc})") from None
    except RecursionError:
        raise OutputError(
            f"{path}: not readable JSON (arrays or objects nested too deeply)"
        ) from None
    if not isinstance(data, dict):
        raise OutputError(f"{path}: expected a JSON object, found {type(data).__name__}")
    # the report trusts these shapes below, so a hand-edited manifest fails here, by name
    for key in ("inputs", "policies", "cells"):
        items = data.setdefault(key, [])
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise OutputError(f'{path}: "{key}" must be a list of objects')
    for i, cell in enumerate(data["cells"]):
        costs = cell.setdefault("costs", {})
        if not isinstance(costs, dict):
            raise OutputError(f"{path}: cells[{i}].costs must be an object")
        for k, v in costs.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise OutputError(f'{path}: cells[{i}].costs "{k}" must be a number, found {v!r}')
        if not isinstance(cell.setdefault("warnings", []), list):
            raise OutputError(f"{path}: cells[{i}].warnings must be a list")
    if not isinstance(data.get("timings", {}), dict):
        raise OutputError(f'{path}: "timings" must be an object')
    return data
