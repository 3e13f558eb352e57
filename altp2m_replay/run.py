"""``replay``: every trace x every policy, each trace decoded once, tables and manifest out.

A run has two phases. First every policy and trace is checked (for traces a streaming pre-pass
that also gathers what gfn selectors need), so bad input stops the run before any work. Then
work units — one trace with a group of policies — replay in this process, in ``jobs`` local
processes, or on a Dask cluster. A unit decodes its trace's row groups once and feeds every
policy's state from the same batches. Each finished cell (trace x policy) is stored at once
under ``DIR/.cells/`` so an interrupted run loses nothing finished, and ``--resume`` skips
cells whose inputs have not changed. The final tables are concatenated from the cells and
replace the folder's files as one set (``outdir``). The folder is locked for the run; bad
input or a failed write leaves it as it was (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import polars as pl

from altp2m_replay import __version__, traces
from altp2m_replay.cells import (
    CELLS,
    cell_key,
    clear_stale_temporaries,
    load_cell,
    prune_cells,
    store_cell,
)
from altp2m_replay.checks import coverage_gaps
from altp2m_replay.costs import effective_costs
from altp2m_replay.engine import sizing
from altp2m_replay.errors import (
    Interrupted,
    OutputError,
    PolicyError,
    TraceError,
    WorkerLost,
    first_line,
)
from altp2m_replay.executors import Local, executor_for, plan_workers, split_evenly
from altp2m_replay.outdir import (
    OutputFolder,
    publish,
    sha256,
    table_digests,
    write_checked,
    write_table,
)
from altp2m_replay.policy import Policy, load_policy
from altp2m_replay.results import TABLES
from altp2m_replay.selectors import needs_insn_stats, needs_page_counts
from altp2m_replay.unit import CellOutput, replay_unit, validate_unit

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
        name = traces.trace_name(p)
        if name in seen:
            raise TraceError(
                f"two traces are named {name!r} ({seen[name]} and {p}); trace names must be unique in a run"
            )
        seen[name] = p
    return paths


def load_policies(refs) -> list[Policy]:
    policies = [load_policy(r) for r in refs]
    names: dict[str, str] = {}
    for p in policies:
        if p.name in names:
            raise PolicyError(f"two policies are named {p.name!r} ({names[p.name]} and {p.source})")
        names[p.name] = p.source
    return policies


def replay(
    trace_args,
    policy_refs,
    out_dir,
    *,
    cost_overrides=None,
    profile=None,
    window=None,
    jobs=None,
    scheduler=None,
    resume=False,
    html=True,
    command=None,
    batch_rows=None,
    progress=None,
    warn=None,
    threads=None,
    note=None,
) -> dict:
    """Run every trace x policy and write SPEC §10's outputs into ``out_dir``.

    Policies and trace schemas are checked before any work, and every trace value before
    the first output file exists; the output files are replaced as one set (``outdir``).
    ``progress`` is an optional object with ``start(total_rows)``, ``advance(rows)`` and
    ``done()``; ``warn(message)`` is told about stored cells that cannot be resumed, and
    ``note(message)`` that the kernels are being compiled (first run only). ``jobs`` and
    ``threads`` combine as ``plan_workers`` says.
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
            raise OutputError(
                f"--window {window} gives {n_win:,} timeline windows for {tr.path} "
                f"({tr.rows:,} rows); use --window {-(-tr.rows // MAX_WINDOWS)} or more"
            )
    overrides = cost_overrides or {}
    for p in policies:
        effective_costs(p.costs, profile, overrides)  # a bad profile fails here, not in a worker
    cores = os.cpu_count() or 1
    explicit_jobs = jobs is not None
    jobs = jobs or min(cores, len(paths))
    t0 = time.perf_counter()
    need_counts = any(needs_page_counts(p) for p in policies)
    shas = [sha256(p) for p in paths]
    keys = {
        (traces.trace_name(path), pol.name): cell_key(
            sha, pol, effective_costs(pol.costs, profile, overrides), window
        )
        for path, sha in zip(paths, shas, strict=True)
        for pol in policies
    }

    # The folder is locked for the run. Bad input or a failed write puts it back as it was;
    # an interruption or a lost worker keeps the finished cells for --resume.
    stored: list[Path] = []  # cell folders this run wrote
    with OutputFolder(out, keep_on=(KeyboardInterrupt, Interrupted, WorkerLost)) as folder:
        try:
            clear_stale_temporaries(out)
            done, units, unit_trace, threads = _replay_cells(
                folder,
                paths,
                policies,
                opened,
                keys,
                stored,
                overrides=overrides,
                profile=profile,
                window=window,
                jobs=jobs,
                scheduler=scheduler,
                resume=resume,
                batch_rows=batch_rows,
                need_counts=need_counts,
                progress=progress,
                warn=warn,
                explicit_jobs=explicit_jobs,
                threads=threads,
                cores=cores,
                note=note,
            )
            cells = [done[(traces.trace_name(p), pol.name)] for p in paths for pol in policies]
            elapsed = time.perf_counter() - t0
            fresh = sum(len(u[1]) for u in units)
            records = sum(
                opened[ti].rows * len(u[1]) for ti, u in zip(unit_trace, units, strict=True)
            )
            manifest = {
                "tool": "altp2m-replay",
                "version": __version__,
                "command": command or " ".join(sys.argv),
                "inputs": [
                    {
                        "trace": traces.trace_name(p),
                        "path": str(p),
                        "bytes": p.stat().st_size,
                        "sha256": sha,
                        "rows": tr.rows,
                    }
                    for p, sha, tr in zip(paths, shas, opened, strict=True)
                ],
                "policies": [
                    {
                        "name": p.name,
                        "source": p.source,
                        "description": p.description,
                        "text": p.text,
                    }
                    for p in policies
                ],
                "cells": [
                    {
                        "trace": c.trace,
                        "policy": c.policy,
                        "records": c.records,
                        "seconds": round(c.seconds, 6),
                        "costs": c.costs,
                        "warnings": c.warnings,
                    }
                    for c in cells
                ],
                "timings": {
                    "seconds": round(elapsed, 6),
                    "records_per_second": round(records / elapsed) if elapsed > 0 else None,
                    "jobs": jobs,
                    "threads": threads,
                    "scheduler": scheduler,
                    "resumed_cells": len(cells) - fresh,
                },
            }

            def write_set(staging: Path) -> None:
                for name in TABLES:
                    try:
                        df = pl.concat([c.tables[name] for c in cells], how="vertical")
                    except pl.exceptions.PolarsError as exc:  # a stored cell edited by hand
                        raise OutputError(
                            f"{out / CELLS}: the {name} tables of the stored cells "
                            f"do not fit together ({first_line(exc)}); run "
                            f"without --resume"
                        ) from None
                    write_table(df, staging / f"{name}.parquet", shown=out / f"{name}.parquet")
                manifest["files"] = table_digests(staging)  # what belongs together (outdir)
                text = (json.dumps(manifest, indent=2) + "\n").encode()
                write_checked(
                    staging / "manifest.json",
                    lambda p: p.write_bytes(text),
                    shown=out / "manifest.json",
                )
                if html:
                    from altp2m_replay.report.html import render_html

                    page = render_html(staging).encode("utf-8")
                    write_checked(
                        staging / "report.html",
                        lambda p: p.write_bytes(page),
                        shown=out / "report.html",
                    )

            publish(out, write_set)
            prune_cells(out, keys)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted; {_kept(out, stored)}") from None
        except WorkerLost as exc:
            raise WorkerLost(f"{exc}; {_kept(out, stored)}") from None
    return manifest


def _kept(out: Path, stored: list[Path]) -> str:
    if not stored:
        return f"no cell had finished: {out} is as it was"
    n = len(stored)
    return (
        f"{n} finished cell{'s' if n != 1 else ''} kept in {out / CELLS}: run again with "
        f"--resume to go on from there"
    )


def _replay_cells(
    folder: OutputFolder,
    paths,
    policies,
    opened,
    keys,
    stored,
    *,
    overrides,
    profile,
    window,
    jobs,
    scheduler,
    resume,
    batch_rows,
    need_counts,
    progress,
    warn,
    explicit_jobs,
    threads,
    cores,
    note=None,
):
    """Check every trace, reuse stored cells (``resume``), replay the rest and store each
    finished cell at once. Returns (cells by (trace, policy), units run, each unit's trace,
    threads per unit)."""
    out = folder.path
    if not scheduler:
        from altp2m_replay.engine.simulate import kernels_cached, warm_kernels

        if not kernels_cached():
            # the first run after an install: compile once here, not once per worker process
            if note is not None:
                note("compiling the replay kernels (first run only; a minute or two)")
            warm_kernels()
    ex = executor_for(jobs, len(paths) * len(policies), scheduler)
    finished = False
    try:
        need_stats = any(needs_insn_stats(p) for p in policies)
        prepared = ex.keep(validate_unit, [(p, need_counts, need_stats) for p in paths])
        if not scheduler:  # Dask keeps the facts on the cluster; its workers have their own budget
            prepared = sizing.check_run(paths, policies, prepared, window)  # before any cell runs
        # Which cells still need computing (all of them unless resuming).
        done: dict[tuple[str, str], CellOutput] = {}
        todo: dict[int, list[Policy]] = {}
        for ti, path in enumerate(paths):
            for pol in policies:
                name = (traces.trace_name(path), pol.name)
                cached = load_cell(out, *name, keys[name], warn) if resume else None
                if cached is not None:
                    done[name] = cached
                else:
                    todo.setdefault(ti, []).append(pol)
        groups_per_trace, threads = plan_workers(len(todo), jobs, explicit_jobs, threads, cores)
        if scheduler:
            groups_per_trace, threads = len(policies), 1
        # In this process the unit reports every batch; elsewhere each finished unit does.
        inline = progress.advance if progress is not None and isinstance(ex, Local) else None
        units, unit_trace = [], []
        for ti, pols in todo.items():
            for group in split_evenly(pols, groups_per_trace):
                units.append(
                    (
                        paths[ti],
                        group,
                        overrides,
                        profile,
                        window,
                        batch_rows,
                        prepared[ti],
                        inline,
                        threads,
                    )
                )
                unit_trace.append(ti)
        if progress is not None:
            progress.start(sum(opened[ti].rows * len(pols) for ti, pols in todo.items()))
        cells_dir = out / CELLS
        if units and not cells_dir.is_dir():
            cells_dir.mkdir()
            folder.added.append(cells_dir)
        for i, cells in ex.submit_all(replay_unit, units):
            for cell in cells:
                d, old = store_cell(out, cell, keys[(cell.trace, cell.policy)])
                stored.append(d)
                if old is None:
                    folder.added.append(d)
                else:
                    folder.replaced.append((old, d))
                done[(cell.trace, cell.policy)] = cell
            if progress is not None and inline is None:
                progress.advance(opened[unit_trace[i]].rows * len(units[i][1]))
        finished = True
    finally:
        ex.close(abort=not finished)
        if progress is not None:
            progress.done()
    return done, units, unit_trace, threads
