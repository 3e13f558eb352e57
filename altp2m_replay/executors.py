"""Where replay units run: in this process, in spawned worker processes, or on Dask.

This module's one job is running units of work and bringing back their results. Each
executor has ``keep`` (results in order: here, or on a cluster handles to results that
stay there, passed on to later work), ``submit_all`` (results here, in completion order)
and ``close(abort)`` (abort: stop running work now); ``plan_workers`` says how many
processes and threads a run uses.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
import traceback
from multiprocessing.connection import wait as mp_wait

from altp2m_replay.errors import (
    ReplayError,
    WorkerLost,
    first_line,
)


class Local:
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
    the worker also starts with SIGINT ignored, see Processes._start), and a thread exits
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


class Processes:
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


class Dask:
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


def executor_for(jobs: int, units: int, scheduler: str | None):
    if scheduler:
        return Dask(scheduler)
    if jobs > 1 and units > 1:
        return Processes(min(jobs, units))
    return Local()


def split_evenly(items: list, parts: int) -> list[list]:
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
