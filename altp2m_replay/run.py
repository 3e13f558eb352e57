"""``replay``: every trace x every policy, streamed once per trace, tables and manifest out.

One trace is validated (a streaming pre-pass that also gathers what gfn selectors need), then
its row groups are decoded once and fed to the state of every policy, so N policies cost one
decode. Cells of different traces run in separate processes with ``jobs`` > 1.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from altp2m_replay import __version__, traces
from altp2m_replay.costs import effective_costs
from altp2m_replay.engine import Replayer
from altp2m_replay.errors import OutputError, PolicyError, TraceError
from altp2m_replay.policy import Policy, TraceFacts, load_policy, needs_page_counts
from altp2m_replay.results import TABLES, atomic_write_json, atomic_write_parquet, cell_tables


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
        name = p.name[:-8] if p.name.endswith(".parquet") else p.name
        if name in seen:
            raise TraceError(f"two traces are named {name!r} ({seen[name]} and {p}); trace names must be unique in a run")
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


def replay_trace(path: Path, policies: list[Policy], cost_overrides: dict, profile: str | None,
                 window: int | None, batch_rows: int | None = None) -> list[CellOutput]:
    """Replay one trace under every policy with a single decode of the trace."""
    tr = traces.open_trace(path)
    stats = traces.validate(tr, page_counts=any(needs_page_counts(p) for p in policies))
    facts = TraceFacts(
        max_gfn=stats.max_gfn,
        meta_ram=tr.meta.ram,
        gfn_sets=dict(tr.meta.gfn_sets or {}),
        page_counts=stats.page_counts,
    )
    t0 = time.perf_counter()
    reps = [Replayer(p, facts, stats.vcpus, stats.rows, window=window) for p in policies]
    columns = ["gfn", "access", "vcpu"]
    if "insn" in tr.columns:
        columns.append("insn")
    if "tsc" in tr.columns:
        columns.append("tsc")
    for b in tr.batches(batch_rows=batch_rows, columns=tuple(columns)):
        live = [r for r in reps if not r.done]
        if not live:
            break
        for r in live:
            r.feed(b.gfn, b.access, b.vcpu, b.insn, b.tsc, start_row=b.start)
    elapsed = time.perf_counter() - t0
    out = []
    for p, r in zip(policies, reps, strict=True):
        res = r.finish()
        costs = effective_costs(p.costs, profile, cost_overrides)
        out.append(CellOutput(tr.name, p.name, cell_tables(tr.name, p, res, costs), elapsed / len(reps),
                              res.total["records"], res.warnings, costs))
    return out


def _worker(args):
    return replay_trace(*args)


def replay(trace_args, policy_refs, out_dir, *, cost_overrides=None, profile=None, window=None,
           jobs=None, html=True, command=None, batch_rows=None, echo=None) -> dict:
    """Run every trace x policy and write SPEC §10's outputs into ``out_dir``.

    Everything is checked (policies, trace schemas and values) before the first output file is
    written, and every file is written atomically.
    """
    paths = expand_trace_args(trace_args)
    policies = load_policies(policy_refs)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder")
    for p in paths:
        traces.open_trace(p)  # schema errors surface before any work
    t0 = time.perf_counter()
    jobs = jobs or os.cpu_count() or 1
    args = [(p, policies, cost_overrides or {}, profile, window, batch_rows) for p in paths]
    if jobs > 1 and len(paths) > 1:
        with ProcessPoolExecutor(max_workers=min(jobs, len(paths))) as ex:
            results = list(ex.map(_worker, args))
    else:
        results = []
        for a in args:
            if echo:
                echo(f"replaying {a[0].name} under {len(policies)} policies")
            results.append(_worker(a))
    cells = [c for r in results for c in r]
    elapsed = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    for name in TABLES:
        frames = [c.tables[name] for c in cells]
        atomic_write_parquet(pl.concat(frames, how="vertical"), out / f"{name}.parquet")
    records = sum(c.records for c in cells)
    manifest = {
        "tool": "altp2m-replay",
        "version": __version__,
        "command": command or " ".join(sys.argv),
        "inputs": [{"trace": p.name[:-8] if p.name.endswith(".parquet") else p.name, "path": str(p),
                    "bytes": p.stat().st_size, "sha256": sha256(p)} for p in paths],
        "policies": [{"name": p.name, "source": p.source, "description": p.description,
                      "text": p.text} for p in policies],
        "cells": [{"trace": c.trace, "policy": c.policy, "records": c.records,
                   "seconds": round(c.seconds, 6), "costs": c.costs, "warnings": c.warnings}
                  for c in cells],
        "timings": {"seconds": round(elapsed, 6),
                    "records_per_second": round(records / elapsed) if elapsed > 0 else None},
    }
    atomic_write_json(manifest, out / "manifest.json")
    if html:
        from altp2m_replay.report import write_report

        write_report(out)
    return manifest
