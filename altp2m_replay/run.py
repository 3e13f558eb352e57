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

import contextlib
import functools
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait as mp_wait
from pathlib import Path

import numpy as np
import polars as pl

from altp2m_replay import __version__, budget, traces
from altp2m_replay.checks import coverage_gaps
from altp2m_replay.costs import effective_costs
from altp2m_replay.engine import Replayer
from altp2m_replay.errors import (
    Interrupted,
    OutputError,
    PolicyError,
    ReplayError,
    ReplayRuntimeError,
    TraceError,
    WorkerLost,
    first_line,
)
from altp2m_replay.outdir import (
    OutputFolder,
    publish,
    sha256,
    table_digests,
    write_checked,
    write_table,
)
from altp2m_replay.policy import Policy, load_policy
from altp2m_replay.prefetch import side_by_side
from altp2m_replay.results import TABLES, cell_tables
from altp2m_replay.selectors import needs_insn_stats, needs_page_counts

CELLS = ".cells"
MAX_WINDOWS = 1 << 16  # timeline windows per cell: each holds every counter


def lean_kernel_loads() -> bool:
    """Make Numba load cached kernels without first loading all of its lowering code.

    Before it looks in its cache, Numba's loader calls ``target_context.refresh()``, which
    imports and installs every lowering registry it has (typed containers, random, linalg,
    ...): 0.15-0.2 s of CPU, a fifth of a warm ``replay`` of a small trace, paid again by every
    worker process. Cached object code needs none of it, only the runtime its code calls
    (NRT), set up here. A cache miss still compiles through Numba's compiler, which
    refreshes the context itself. Applied once per process; ALTP2M_REPLAY_NUMBA_FULL_INIT=1,
    or a Numba without the expected loader, keeps Numba's own behaviour. Returns whether
    the lean loader is in use.
    """
    from numba.core import caching
    from numba.core.runtime import rtsys

    cache = caching.Cache
    if getattr(cache.load_overload, "lean", False):
        return True
    if os.environ.get("ALTP2M_REPLAY_NUMBA_FULL_INIT") or not all(
        hasattr(cache, a) for a in ("_load_overload", "_guard_against_spurious_io_errors")
    ):
        return False

    def load_overload(self, sig, target_context):
        rtsys.initialize(target_context)
        with self._guard_against_spurious_io_errors():
            return self._load_overload(sig, target_context)

    load_overload.lean = True
    cache.load_overload = load_overload
    return True


lean_kernel_loads()


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


@dataclass
class CellOutput:
    trace: str
    policy: str
    tables: dict[str, pl.DataFrame]
    seconds: float
    records: int
    warnings: list[str]
    costs: dict[str, float]


def replay_trace(
    path: Path,
    policies: list[Policy],
    cost_overrides: dict,
    profile: str | None,
    window: int | None,
    batch_rows: int | None = None,
    prepared=None,
    progress=None,
    threads: int = 1,
    cpu: dict | None = None,
) -> list[CellOutput]:
    """Replay one trace under every policy with a single decode of the trace.

    ``prepared`` is ``replay_facts``'s result when the caller has it already;
    ``progress(rows)`` is called after each batch. Unless ``prepared`` says the values were
    checked, each batch is checked before any policy sees it: a bad row stops the replay
    with the same TraceError ``trace validate`` gives (a replay error in an earlier row of
    the trace comes first).

    ``threads`` > 1 replays the policies side by side (``prefetch.side_by_side``): every
    policy still gets the decoded batches in order, so its cell is the same, and errors are
    those of replaying the policies one after the other. ``cpu``: see ``side_by_side``.
    """
    path = Path(path)
    if prepared is None:
        prepared = traces.replay_facts(
            path,
            any(needs_page_counts(p) for p in policies),
            any(needs_insn_stats(p) for p in policies),
        )
    stats, facts, checked = prepared
    tr = traces.open_trace(path)
    validator = None if checked else traces.Validator(tr)
    t0 = time.perf_counter()
    columns = ["gfn", "access", "vcpu"] + [
        c for c in ("insn", "tsc", "ip", "op", "arg") if c in tr.columns
    ]
    if any(p.breakpoints is not None for p in policies) and "gpa" in tr.columns:
        columns.append("gpa")  # byte addresses of fetches, for breakpoints
    seen = rerun = None

    def feed(i: int, b: traces.Batch) -> bool:
        r = reps[i]
        r.feed(
            b.gfn,
            b.access,
            b.vcpu,
            b.insn,
            b.tsc,
            start_row=b.start,
            ip=b.ip,
            op=b.op,
            arg=b.arg,
            gpa=b.gpa,
        )
        return r.done  # the guest crashed: nothing more to replay

    def settle() -> bool:
        nonlocal seen, rerun
        if validator is not None:
            full = validator.result()
            seen = full.vcpus  # the vCPUs rows name; replayers have a slot for every candidate
            if full.max_gfn != stats.max_gfn or not np.isin(seen, stats.vcpus).all():
                rerun = full
                return False
        return True

    def finish(i: int):
        p = policies[i]
        res = reps[i].finish(vcpus=seen)
        costs = effective_costs(p.costs, profile, cost_overrides)
        return res, costs, cell_tables(tr.name, p, res, costs)

    def advance(b: traces.Batch) -> None:
        progress(len(b.gfn) * len(reps))

    try:
        reps = [Replayer(p, facts, stats.vcpus, stats.rows, window=window) for p in policies]
        batches = tr.batches(batch_rows=batch_rows, columns=tuple(columns), validator=validator)
        done = side_by_side(
            batches,
            len(reps),
            feed,
            finish,
            threads,
            read_all=validator is not None,
            settle=settle,
            on_item=None if progress is None else advance,
            cpu=cpu,
        )
    except (ReplayRuntimeError, PolicyError) as exc:
        # The engine knows the row and the policy; the user also needs the trace file.
        raise type(exc)(f"{path}: {exc}") from None
    if done is None:
        # column statistics disagreed with the values: replay again from the facts the
        # checks gathered (progress has counted these rows once already)
        return replay_trace(
            path,
            policies,
            cost_overrides,
            profile,
            window,
            batch_rows,
            (rerun, traces.facts_of(tr, rerun), True),
            None,
            threads,
            cpu,
        )
    elapsed = time.perf_counter() - t0
    return [
        CellOutput(
            tr.name, p.name, tables, elapsed / len(reps), res.total["records"], res.warnings, costs
        )
        for p, (res, costs, tables) in zip(policies, done, strict=True)
    ]


def _validate_unit(args):
    path, page_counts, insn_stats = args
    return traces.replay_facts(path, page_counts, insn_stats)


def _replay_unit(args):
    return replay_trace(*args)


# --------------------------------------------------------------------------- cell store
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


# --------------------------------------------------------------------------- executors
# Each executor has ``keep`` (results in order: here, or on a cluster handles to results that
# stay there, passed on to later work), ``submit_all`` (results here, in completion order)
# and ``close(abort)`` (abort: stop running work now).
class _Local:
    """Runs functions in this process."""

    def keep(self, fn, items):
        return [fn(i) for i in items]

    def submit_all(self, fn, items):
        for i, item in enumerate(items):
            yield i, fn(item)

    def close(self, abort=False):
        pass


def _worker_main(conn, parent: int) -> None:
    """A worker process: run ``(fn, item)`` tasks from ``conn`` and send back
    ``(True, result)`` or ``(False, exception, traceback text)`` until told to stop.

    Ctrl-C is the main process's to handle (a terminal sends it to the whole process group;
    the worker also starts with SIGINT ignored, see _Processes._start), and a thread exits
    the worker when its parent is gone (killed, perhaps by the OOM killer) instead of
    letting it run on as an orphan.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent,), name="parent-watch", daemon=True).start()
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        fn, item = task
        try:
            reply = (True, fn(item))
        except BaseException as exc:
            reply = (False, exc, traceback.format_exc())
        try:
            conn.send(reply)
        except Exception as exc:
            conn.send((False, RuntimeError(f"{type(exc).__name__}: {exc}"), traceback.format_exc()))


def _watch_parent(parent: int, every: float = 0.2) -> None:
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


class _Processes:
    """Units in up to ``jobs`` spawned worker processes, one unit at a time each.

    A small pool of its own rather than ProcessPoolExecutor: that one's result thread can
    hang for good on a worker killed while sending its result (so Ctrl-C could not finish),
    and it says only BrokenProcessPool when a worker dies. Here each worker has its own
    pipe, a dead worker is seen by its sentinel (WorkerLost, with how it died), and
    ``close(abort=True)`` kills the workers without waiting for anything.
    """

    def __init__(self, jobs: int):
        # spawn, not fork: a forked child inherits polars' and pyarrow's thread pools in
        # whatever state they were and can deadlock. Workers load kernels from Numba's cache.
        self.ctx = multiprocessing.get_context("spawn")
        self.jobs = jobs
        self.idle: list = []  # (process, connection)
        self.all: list = []

    def _start(self):
        conn, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker_main, args=(child, os.getpid()), daemon=True)
        # SIGINT ignored across the exec, so a Ctrl-C while the worker starts up cannot print
        # its traceback (Python keeps an inherited SIG_IGN); _worker_main keeps it ignored.
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            proc.start()
        finally:
            if main:
                signal.signal(signal.SIGINT, old)
        child.close()
        self.all.append((proc, conn))
        return proc, conn

    def submit_all(self, fn, items):
        queue = list(enumerate(items))[::-1]
        while len(self.all) < min(self.jobs, len(queue)):
            self.idle.append(self._start())
        busy: dict = {}  # connection -> (item index, process)
        while queue or busy:
            while queue and self.idle:
                proc, conn = self.idle.pop()
                i, item = queue.pop()
                try:
                    conn.send((fn, item))
                except OSError:  # it died while idle
                    self._lost(proc)
                busy[conn] = (i, proc)
            ready = mp_wait([*busy, *(p.sentinel for _, p in busy.values())])
            for conn in [r for r in ready if r in busy]:
                i, proc = busy.pop(conn)
                try:
                    reply = conn.recv()
                except (EOFError, OSError):
                    self._lost(proc)
                self.idle.append((proc, conn))
                if not reply[0]:
                    exc = reply[1]
                    if not isinstance(exc, ReplayError):
                        exc.add_note(f"in a worker process:\n{reply[2]}")
                    raise exc
                yield i, reply[1]
            for proc in [p for _, p in busy.values() if p.sentinel in ready]:
                self._lost(proc)

    def _lost(self, proc):
        proc.join(1)
        code = proc.exitcode
        if code is not None and code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exit code {code}"
        raise WorkerLost(f"a worker process died ({how}), often for lack of memory")

    def keep(self, fn, items):
        return [r for _, r in sorted(self.submit_all(fn, items), key=lambda x: x[0])]

    def close(self, abort=False):
        for proc, conn in self.all:
            if abort:
                proc.kill()  # running units would otherwise finish first
            else:
                with contextlib.suppress(OSError):
                    conn.send(None)
        for proc, conn in self.all:
            proc.join(None if abort else 10)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()
        self.all, self.idle = [], []


class _Dask:
    """Cells on an existing Dask distributed cluster; workers read the trace files themselves."""

    def __init__(self, address: str):
        try:
            from distributed import Client
        except ImportError:
            raise ReplayError(
                "--scheduler needs Dask distributed: pip install 'altp2m-replay[cluster]'"
            ) from None
        try:
            self.client = Client(address, timeout="10s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise ReplayError(f"--scheduler {address}: cannot connect ({exc})") from None

    def _result(self, fut):
        from distributed import KilledWorker

        try:
            return fut.result()
        except KilledWorker as exc:
            reason = first_line(exc).split(". ")[0]
            raise WorkerLost(f"a Dask worker died, often for lack of memory ({reason})") from None

    def keep(self, fn, items):
        """Results stay on the workers (futures); errors are raised here, before any work.

        A trace's prepared facts can hold page counts as large as the trace's gfn range;
        the units of that trace take the future, so each worker fetches them once instead
        of the client sending them with every policy's unit."""
        from distributed import wait

        futs = self.client.map(fn, items, pure=False)
        wait(futs)
        for f in futs:
            if f.status != "finished":
                self._result(f)  # raises the worker's error
        return futs

    def submit_all(self, fn, items):
        from distributed import as_completed as dask_completed

        futs = self.client.map(fn, items, pure=False)
        index = {f.key: i for i, f in enumerate(futs)}
        for f in dask_completed(futs):
            yield index[f.key], self._result(f)

    def close(self, abort=False):
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


def plan_workers(
    traces: int, jobs: int, explicit_jobs: bool, threads: int | None, cores: int
) -> tuple[int, int]:
    """(policy groups per trace, threads per group) for ``traces`` traces with work to do.

    Processes take whole traces, and threads share a trace's policies on one decode: by
    default ``jobs`` is the number of cores but no more than the traces, and ``threads``
    the cores left to each process, so ``replay BIG -p a -p b`` runs one process with two
    threads on two cores, and ``replay corpus/ -p a`` two processes of one thread. Only an
    explicit ``--jobs`` larger than the number of traces splits a trace's policies over
    processes (each decoding the trace), as before threads existed.
    """
    groups = max(1, jobs // max(1, traces)) if explicit_jobs else 1
    if threads is None:
        busy = max(1, min(jobs, traces * groups))
        threads = max(1, cores // busy)
    return groups, threads


# --------------------------------------------------------------------------- run
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
    ex = _executor(jobs, len(paths) * len(policies), scheduler)
    finished = False
    try:
        need_stats = any(needs_insn_stats(p) for p in policies)
        prepared = ex.keep(_validate_unit, [(p, need_counts, need_stats) for p in paths])
        if not scheduler:  # Dask keeps the facts on the cluster; its workers have their own budget
            prepared = budget.check_run(paths, policies, prepared, window)  # before any cell runs
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
        inline = progress.advance if progress is not None and isinstance(ex, _Local) else None
        units, unit_trace = [], []
        for ti, pols in todo.items():
            for group in _split(pols, groups_per_trace):
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
        for i, cells in ex.submit_all(_replay_unit, units):
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
