"""``replay``: every trace x every policy, each trace decoded once, tables and manifest out.

A run has two phases. First every policy and trace is checked (for traces a streaming pre-pass
that also gathers what gfn selectors need), so bad input stops the run before any output
exists; an error found while replaying leaves only finished cells in ``DIR/.cells``. Then work
units — one trace with a group of policies — replay in this process, in ``jobs`` local
processes, or on a Dask cluster. A unit decodes its trace's row groups once and feeds every
policy's state from the same batches. Each finished cell (trace x policy) is stored at once
under ``DIR/.cells/`` so an interrupted run loses nothing finished, and ``--resume`` skips
cells whose inputs have not changed. The final tables are concatenated from the cells.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from altp2m_replay import __version__, traces
from altp2m_replay.checks import coverage_gaps
from altp2m_replay.costs import effective_costs
from altp2m_replay.engine import Replayer
from altp2m_replay.errors import (
    OutputError,
    PolicyError,
    ReplayError,
    ReplayRuntimeError,
    TraceError,
)
from altp2m_replay.policy import Policy, TraceFacts, load_policy, needs_page_counts
from altp2m_replay.prefetch import prefetch
from altp2m_replay.results import TABLES, atomic_write_json, atomic_write_parquet, cell_tables

CELLS = ".cells"
MAX_WINDOWS = 1 << 16  # timeline windows per cell: each holds every counter


def expand_trace_args(args) -> list[Path]:
    """Files and folders (their ``*.parquet``, sorted) -> trace paths; duplicate names refused."""
    paths: list[Path] = []
    for a in args:
        p = Path(a)
        if p.is_dir():
            found = sorted(p.glob("*.parquet"))
            if not found:
                raise TraceError(f"{a}: folder holds no .parquet traces")
            paths.extend(found)
        elif p.exists():
            paths.append(p)
        else:
            raise TraceError(f"{a}: no such file or folder")
    seen: dict[str, Path] = {}
    for p in paths:
        name = trace_name(p)
        if name in seen:
            raise TraceError(f"two traces are named {name!r} ({seen[name]} and {p}); trace names must be unique in a run")
        seen[name] = p
    return paths


def trace_name(p: Path) -> str:
    return p.name[:-8] if p.name.endswith(".parquet") else p.name


def load_policies(refs) -> list[Policy]:
    policies = [load_policy(r) for r in refs]
    names: dict[str, str] = {}
    for p in policies:
        if p.name in names:
            raise PolicyError(f"two policies are named {p.name!r} ({names[p.name]} and {p.source})")
        names[p.name] = p.source
    return policies


@dataclass
class CellOutput:
    trace: str
    policy: str
    tables: dict[str, pl.DataFrame]
    seconds: float
    records: int
    warnings: list[str]
    costs: dict[str, float]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def trace_facts(path: Path, page_counts: bool,
                insn_stats: bool = False) -> tuple[traces.TraceStats, TraceFacts]:
    """Validate one trace (full streaming pass) and gather what selector resolution needs
    (``insn_stats``: also instruction starts by byte address and each ip's first one)."""
    tr = traces.open_trace(path)
    stats = traces.validate(tr, page_counts=page_counts, insn_stats=insn_stats)
    return stats, _facts(tr, stats)


def _facts(tr: traces.Trace, stats: traces.TraceStats) -> TraceFacts:
    return TraceFacts(max_gfn=stats.max_gfn, meta_ram=tr.meta.ram,
                      gfn_sets=dict(tr.meta.gfn_sets or {}), page_counts=stats.page_counts,
                      symbols=dict(tr.meta.symbols), processes=dict(tr.meta.processes),
                      byte_addresses=tr.byte_addresses, insn_starts=stats.insn_starts,
                      ip_first=stats.ip_first)


def _refuse_control_rows(path, op: np.ndarray | None, start: int = 0) -> None:
    """Until the engine replays control rows (issue 10): a TraceError at the first row of op
    1-4 in ``op`` (uint8, rows from ``start``), so no replay gives numbers that ignore them."""
    if op is not None and op.any():
        row = start + int(np.argmax(op != 0))
        raise TraceError(f"{path}: row {row}: control rows (op 1-4) are not replayed yet")


def replay_facts(path: Path, page_counts: bool,
                 insn_stats: bool = False) -> tuple[traces.TraceStats, TraceFacts, bool]:
    """What replay_trace needs before its first batch, and whether values are checked yet.

    Without page counts, when Parquet statistics prove the gfn range, only metadata is read
    (and the vcpu column if its statistics are missing) and the values are not checked yet
    (False): replay_trace checks every value on the batches it decodes anyway, so the trace
    is read once instead of twice (the separate pass took 0.25 s of a 0.8 s replay of 20 M
    rows). Otherwise: trace_facts's full validation pass (True).
    """
    if not page_counts and not insn_stats:
        tr = traces.open_trace(path)
        stats = traces.quick_stats(tr)
        if stats is not None:
            return stats, _facts(tr, stats), False
    stats, facts = trace_facts(path, page_counts, insn_stats)
    if stats.control_records:  # refused before any output (replay_trace checks each batch too)
        for b in traces.open_trace(path).batches(columns=("op",)):
            _refuse_control_rows(path, b.op, b.start)
    return stats, facts, True


def replay_trace(path: Path, policies: list[Policy], cost_overrides: dict, profile: str | None,
                 window: int | None, batch_rows: int | None = None, prepared=None,
                 progress=None) -> list[CellOutput]:
    """Replay one trace under every policy with a single decode of the trace.

    ``prepared`` is ``replay_facts``'s result when the caller has it already;
    ``progress(rows)`` is called after each batch. Unless ``prepared`` says the values were
    checked, each batch is checked before any policy sees it: a bad row stops the replay
    with the same TraceError ``trace validate`` gives (a replay error in an earlier row of
    the trace comes first).
    """
    path = Path(path)
    if prepared is None:
        prepared = replay_facts(path, any(needs_page_counts(p) for p in policies))
    stats, facts, checked = prepared
    tr = traces.open_trace(path)
    validator = None if checked else traces.Validator(tr)
    t0 = time.perf_counter()
    try:
        reps = [Replayer(p, facts, stats.vcpus, stats.rows, window=window) for p in policies]
        columns = ["gfn", "access", "vcpu"] + [c for c in ("insn", "tsc", "ip", "op") if c in tr.columns]
        # Decode (and check) the next row group while the kernel (nogil) replays this one.
        for b in prefetch(tr.batches(batch_rows=batch_rows, columns=tuple(columns), validator=validator)):
            _refuse_control_rows(path, b.op, b.start)
            live = [r for r in reps if not r.done]
            if not live and validator is None:
                break  # every policy crashed the guest; the rest still gets checked otherwise
            for r in live:
                r.feed(b.gfn, b.access, b.vcpu, b.insn, b.tsc, start_row=b.start, ip=b.ip)
            if progress is not None:
                progress(len(b.gfn) * len(reps))
    except (ReplayRuntimeError, PolicyError) as exc:
        # The engine knows the row and the policy; the user also needs the trace file.
        raise type(exc)(f"{path}: {exc}") from None
    seen = None
    if validator is not None:
        full = validator.result()
        seen = full.vcpus  # the vCPUs rows name; replayers have a slot for every candidate
        if full.max_gfn != stats.max_gfn or not np.isin(seen, stats.vcpus).all():
            # column statistics disagreed with the values: replay again from the facts the
            # checks gathered (progress has counted these rows once already)
            return replay_trace(path, policies, cost_overrides, profile, window, batch_rows,
                                (full, _facts(tr, full), True), None)
    elapsed = time.perf_counter() - t0
    out = []
    for p, r in zip(policies, reps, strict=True):
        res = r.finish(vcpus=seen)
        costs = effective_costs(p.costs, profile, cost_overrides)
        out.append(CellOutput(tr.name, p.name, cell_tables(tr.name, p, res, costs), elapsed / len(reps),
                              res.total["records"], res.warnings, costs))
    return out


def _validate_unit(args):
    path, page_counts = args
    return replay_facts(path, page_counts)


def _replay_unit(args):
    return replay_trace(*args)


# --------------------------------------------------------------------------- cell store
def cell_key(trace_sha: str, policy: Policy, costs: dict, window) -> str:
    """What a cell's numbers depend on: trace bytes, policy text, costs, window, version."""
    blob = json.dumps([__version__, trace_sha, policy.text, policy.source, costs, window],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _cell_dir(out: Path, trace: str, policy: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{trace}__{policy}")
    return out / CELLS / safe


def store_cell(out: Path, cell: CellOutput, key: str) -> Path:
    """Write one cell's tables atomically (a temporary folder renamed into place); returns
    the cell's folder."""
    final = _cell_dir(out, cell.trace, cell.policy)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        for name, df in cell.tables.items():
            df.write_parquet(tmp / f"{name}.parquet")
        meta = {"key": key, "trace": cell.trace, "policy": cell.policy, "records": cell.records,
                "seconds": cell.seconds, "warnings": cell.warnings, "costs": cell.costs}
        (tmp / "cell.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def clear_stale_temporaries(out: Path) -> None:
    """Remove half-written cell folders a killed run left in DIR/.cells (they start with '.')."""
    cells = out / CELLS
    if cells.is_dir():
        for p in cells.iterdir():
            if p.name.startswith(".") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def load_cell(out: Path, trace: str, policy: str, key: str) -> CellOutput | None:
    """A stored cell with this key, or None (absent, stale or unreadable)."""
    d = _cell_dir(out, trace, policy)
    try:
        meta = json.loads((d / "cell.json").read_text(encoding="utf-8"))
        if meta.get("key") != key:
            return None
        tables = {name: pl.read_parquet(d / f"{name}.parquet") for name in TABLES}
    except (OSError, ValueError, pl.exceptions.PolarsError):
        return None
    return CellOutput(trace, policy, tables, meta["seconds"], meta["records"], meta["warnings"], meta["costs"])


# --------------------------------------------------------------------------- executors
class _Local:
    """Runs functions in this process, with the executor interface the run uses."""

    def map(self, fn, items):
        return [fn(i) for i in items]

    def submit_all(self, fn, items):
        for i, item in enumerate(items):
            yield i, fn(item)

    def close(self):
        pass


class _Processes:
    def __init__(self, jobs: int):
        # spawn, not fork: a forked child inherits polars' and pyarrow's thread pools in
        # whatever state they were and can deadlock. Workers load kernels from Numba's cache.
        self.ex = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))

    def map(self, fn, items):
        return list(self.ex.map(fn, items))

    def submit_all(self, fn, items):
        futs = {self.ex.submit(fn, item): i for i, item in enumerate(items)}
        for f in as_completed(futs):
            yield futs[f], f.result()

    def close(self):
        self.ex.shutdown(cancel_futures=True)


class _Dask:
    """Cells on an existing Dask distributed cluster; workers read the trace files themselves."""

    def __init__(self, address: str):
        try:
            from distributed import Client
        except ImportError:
            raise ReplayError("--scheduler needs Dask distributed: pip install 'altp2m-replay[cluster]'") from None
        try:
            self.client = Client(address, timeout="10s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise ReplayError(f"--scheduler {address}: cannot connect ({exc})") from None

    def map(self, fn, items):
        return self.client.gather(self.client.map(fn, items, pure=False))

    def submit_all(self, fn, items):
        from distributed import as_completed as dask_completed

        futs = self.client.map(fn, items, pure=False)
        index = {f.key: i for i, f in enumerate(futs)}
        for f in dask_completed(futs):
            yield index[f.key], f.result()

    def close(self):
        self.client.close()


def _executor(jobs: int, units: int, scheduler: str | None):
    if scheduler:
        return _Dask(scheduler)
    if jobs > 1 and units > 1:
        return _Processes(min(jobs, units))
    return _Local()


def _split(items: list, parts: int) -> list[list]:
    parts = max(1, min(parts, len(items)))
    return [items[i::parts] for i in range(parts)]


# --------------------------------------------------------------------------- run
def replay(trace_args, policy_refs, out_dir, *, cost_overrides=None, profile=None, window=None,
           jobs=None, scheduler=None, resume=False, html=True, command=None, batch_rows=None,
           progress=None) -> dict:
    """Run every trace x policy and write SPEC §10's outputs into ``out_dir``.

    Policies and trace schemas are checked before any work, and every trace value before
    the first output file exists; every file is written atomically. ``progress`` is an
    optional object with ``start(total_rows)``, ``advance(rows)`` and ``done()``.
    """
    paths = expand_trace_args(trace_args)
    policies = load_policies(policy_refs)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder")
    for p in policies:
        gaps, _ = coverage_gaps(p)
        if gaps:  # a violation no rule answers would stop the run at its first occurrence
            raise PolicyError(f"{p.source}: {gaps[0]}")
    opened = [traces.open_trace(p) for p in paths]  # schema errors surface before any work
    for tr in opened:
        n_win = -(-tr.rows // window) if window else 256
        if n_win > MAX_WINDOWS:
            raise OutputError(f"--window {window} gives {n_win:,} timeline windows for {tr.path} "
                              f"({tr.rows:,} rows); use --window {-(-tr.rows // MAX_WINDOWS)} or more")
    overrides = cost_overrides or {}
    for p in policies:
        effective_costs(p.costs, profile, overrides)  # a bad profile fails here, not in a worker
    jobs = jobs or os.cpu_count() or 1
    t0 = time.perf_counter()
    need_counts = any(needs_page_counts(p) for p in policies)
    shas = [sha256(p) for p in paths]

    created = not out.exists()
    clear_stale_temporaries(out)
    ex = _executor(jobs, len(paths) * len(policies), scheduler)
    stored: list[Path] = []  # cell folders this run wrote
    try:
        prepared = ex.map(_validate_unit, [(p, need_counts) for p in paths])
        # Which cells still need computing (all of them unless resuming).
        keys = {}
        done: dict[tuple[str, str], CellOutput] = {}
        todo: dict[int, list[Policy]] = {}
        for ti, (path, sha) in enumerate(zip(paths, shas, strict=True)):
            for pol in policies:
                costs = effective_costs(pol.costs, profile, overrides)
                key = cell_key(sha, pol, costs, window)
                keys[(trace_name(path), pol.name)] = key
                cached = load_cell(out, trace_name(path), pol.name, key) if resume else None
                if cached is not None:
                    done[(cached.trace, cached.policy)] = cached
                else:
                    todo.setdefault(ti, []).append(pol)
        groups_per_trace = max(1, jobs // max(1, len(todo))) if not scheduler else len(policies)
        # In this process the unit reports every batch; elsewhere each finished unit does.
        inline = progress.advance if progress is not None and isinstance(ex, _Local) else None
        units = [(paths[ti], group, overrides, profile, window, batch_rows, prepared[ti], inline)
                 for ti, pols in todo.items() for group in _split(pols, groups_per_trace)]
        if progress is not None:
            progress.start(sum(opened[ti].rows * len(pols) for ti, pols in todo.items()))
        if units:
            out.mkdir(parents=True, exist_ok=True)
        for i, cells in ex.submit_all(_replay_unit, units):
            for cell in cells:
                stored.append(store_cell(out, cell, keys[(cell.trace, cell.policy)]))
                done[(cell.trace, cell.policy)] = cell
            if progress is not None and inline is None:
                progress.advance(int(units[i][6][0].rows) * len(units[i][1]))
    except BaseException as exc:
        # Finished cells stay in DIR/.cells for --resume after an interruption or a failed
        # cell. A bad trace is bad input: values are checked as each trace is replayed, so
        # cells of other traces may be done already; they go, as if every trace had been
        # checked first. A folder this run made and left empty goes too.
        if isinstance(exc, TraceError):
            for d in stored:
                shutil.rmtree(d, ignore_errors=True)
            if created and (out / CELLS).is_dir() and not any((out / CELLS).iterdir()):
                (out / CELLS).rmdir()
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    finally:
        ex.close()
        if progress is not None:
            progress.done()

    cells = [done[(trace_name(p), pol.name)] for p in paths for pol in policies]
    elapsed = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    for name in TABLES:
        atomic_write_parquet(pl.concat([c.tables[name] for c in cells], how="vertical"), out / f"{name}.parquet")
    fresh = sum(len(u[1]) for u in units)
    records = sum(opened[paths.index(u[0])].rows * len(u[1]) for u in units)
    manifest = {
        "tool": "altp2m-replay",
        "version": __version__,
        "command": command or " ".join(sys.argv),
        "inputs": [{"trace": trace_name(p), "path": str(p), "bytes": p.stat().st_size, "sha256": sha,
                    "rows": tr.rows} for p, sha, tr in zip(paths, shas, opened, strict=True)],
        "policies": [{"name": p.name, "source": p.source, "description": p.description,
                      "text": p.text} for p in policies],
        "cells": [{"trace": c.trace, "policy": c.policy, "records": c.records,
                   "seconds": round(c.seconds, 6), "costs": c.costs, "warnings": c.warnings}
                  for c in cells],
        "timings": {"seconds": round(elapsed, 6),
                    "records_per_second": round(records / elapsed) if elapsed > 0 else None,
                    "jobs": jobs, "scheduler": scheduler, "resumed_cells": len(cells) - fresh},
    }
    atomic_write_json(manifest, out / "manifest.json")
    if html:
        from altp2m_replay.report import write_report

        write_report(out)
    return manifest

