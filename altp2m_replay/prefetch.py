"""Threads that keep both cores busy while the GIL is released (Parquet decode, numpy work,
``nogil`` kernels): ``prefetch`` produces items ahead of their consumer, ``side_by_side`` hands
one stream of items to several consumers that each take every item in order."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import closing
from typing import Any

# where a consumer's error ranks against the items': after every item, in consumer order
AFTER_ITEMS = 1 << 62


def prefetch(it, depth: int = 2):
    """Run iterator ``it`` in a background thread, ``depth`` items ahead; re-raise its errors."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as exc:  # handed to the consumer, re-raised there
            q.put((done, exc))

    worker = threading.Thread(target=produce, name="prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, exc = q.get()
            if item is done:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                worker.join(0.05)


def side_by_side(
    items: Iterable,
    n: int,
    feed: Callable[[int, Any], bool],
    finish: Callable[[int], Any],
    threads: int = 1,
    *,
    read_all: bool = False,
    settle: Callable[[], bool] = lambda: True,
    on_item: Callable[[Any], None] | None = None,
    cpu: dict[str, float] | None = None,
) -> list | None:
    """Hand every item of ``items`` to each of ``n`` consumers in order; then finish each.

    ``feed(i, item)`` gives consumer i its next item and returns True when it wants no more
    (it stays to be finished). ``items`` is read ``prefetch``'s depth ahead in a thread of its
    own, and stops early once every consumer wants no more, unless ``read_all`` (reading
    checks something). After the last item, ``settle()`` runs in the calling thread: False
    means "do not finish" (the result is then None). Otherwise ``finish(i)`` for every
    consumer, and the list of what they returned, in consumer order. ``on_item(item)`` runs
    in the calling thread as each item is handed out.

    With ``threads`` > 1 that many workers share the consumers: a free worker takes the
    consumer furthest behind (one worker per consumer at a time, so each still sees its
    items in order), which keeps every worker busy when one consumer costs ten times the
    others. Consumers may run up to ``threads`` + 2 items apart; older items are dropped.

    Errors are those of the order one consumer after the other, item by item: the first
    item that fails, and within it the first consumer (an error raised by ``items`` itself,
    at item k, comes before any consumer's error at item k; ``finish`` errors rank after
    every item). A consumer stops at its first error and none goes past the earliest error
    known, so which error wins never depends on scheduling. Every thread is joined before
    this returns or raises, also on KeyboardInterrupt.

    ``cpu``, when given, receives the CPU seconds each thread spent in ``feed`` and
    ``finish``, by thread name: on a machine shared with other work, where wall times say
    little, the busiest thread's share tells what two idle cores would do.
    """
    if cpu is not None:
        feed, finish = _metered(feed, cpu), _metered(finish, cpu)
    if threads <= 1 or n <= 1:
        return _in_turn(items, n, feed, finish, read_all, settle, on_item)
    return _Crew(n, feed, finish, threads).run(items, read_all, settle, on_item)


def _metered(fn, cpu: dict[str, float]):
    def metered(*args):
        t = time.thread_time()
        try:
            return fn(*args)
        finally:
            name = threading.current_thread().name  # each thread adds to its own key only
            cpu[name] = cpu.get(name, 0.0) + time.thread_time() - t

    return metered


def _in_turn(items, n, feed, finish, read_all, settle, on_item):
    """``side_by_side`` in the calling thread: each item to every consumer in turn."""
    wants = [True] * n
    with closing(prefetch(items)) as source:  # an error stops the reading thread at once
        for item in source:
            if not any(wants) and not read_all:
                break
            for i in range(n):
                if wants[i] and feed(i, item):
                    wants[i] = False
            if on_item is not None:
                on_item(item)
    if not settle():
        return None
    return [finish(i) for i in range(n)]


class _Crew:
    """The worker threads of ``side_by_side`` and the state they share under one lock."""

    def __init__(self, n, feed, finish, threads):
        self.n, self.feed, self.finish, self.threads = n, feed, finish, threads
        self.cond = threading.Condition()
        self.window = threads + 2
        self.held: dict[int, Any] = {}  # item index -> item, while a consumer still needs it
        self.produced = 0  # items handed out so far
        self.cursor = [0] * n  # each consumer's next item
        self.busy = [False] * n
        self.halted = [False] * n  # takes no more items (wants none, or failed)
        self.results: list = [None] * n
        self.finished = [False] * n
        self.errors: list[tuple[int, int, BaseException]] = []
        self.limit: int | None = None  # earliest item with an error so far
        self.finishing = False
        self.closing = False

    # -- under self.cond
    def _needs_more(self, i: int) -> bool:
        return not self.halted[i] and (self.limit is None or self.cursor[i] <= self.limit)

    def _oldest(self) -> int:
        waiting = [self.cursor[i] for i in range(self.n) if self._needs_more(i)]
        return min(waiting, default=self.produced)

    def _drop_old(self) -> None:
        oldest = self._oldest()
        for k in [k for k in self.held if k < oldest]:
            del self.held[k]

    def _task(self):
        best = None
        for i in range(self.n):
            ready = not self.busy[i] and self._needs_more(i) and self.cursor[i] < self.produced
            if ready and (best is None or self.cursor[i] < self.cursor[best]):
                best = i
        if best is not None:
            return "feed", best
        if self.finishing:
            for i in range(self.n):
                if not self.busy[i] and not self.finished[i]:
                    return "finish", i
        return None

    def _fed_all(self) -> bool:
        return not any(self.busy) and all(
            not self._needs_more(i) or self.cursor[i] >= self.produced for i in range(self.n)
        )

    def _fail(self, k: int, i: int, exc: BaseException) -> None:
        self.errors.append((k, i, exc))
        if k < AFTER_ITEMS and (self.limit is None or k < self.limit):
            self.limit = k

    # -- worker threads
    def _work(self) -> None:
        while True:
            with self.cond:
                while (task := None if self.closing else self._task()) is None:
                    if self.closing:
                        return
                    self.cond.wait()
                what, i = task
                self.busy[i] = True
                k = self.cursor[i]
                item = self.held.get(k)
            try:
                if what == "feed":
                    wants_no_more = self.feed(i, item)
                else:
                    result = self.finish(i)
            except BaseException as exc:  # re-raised by the calling thread
                with self.cond:
                    self.busy[i] = False
                    self.halted[i] = True
                    self.finished[i] = True
                    self._fail(k if what == "feed" else AFTER_ITEMS, i, exc)
                    self._drop_old()
                    self.cond.notify_all()
                continue
            with self.cond:
                self.busy[i] = False
                if what == "feed":
                    self.cursor[i] = k + 1
                    self.halted[i] = self.halted[i] or bool(wants_no_more)
                    self._drop_old()
                else:
                    self.results[i], self.finished[i] = result, True
                self.cond.notify_all()

    # -- the calling thread
    def run(self, items, read_all, settle, on_item):
        workers = [
            threading.Thread(target=self._work, name=f"side-by-side-{w}", daemon=True)
            for w in range(min(self.threads, self.n))
        ]
        for w in workers:
            w.start()
        source = prefetch(items)
        try:
            k = 0
            try:
                for item in source:
                    with self.cond:
                        self.cond.wait_for(
                            lambda k=k: self.limit is not None or k - self._oldest() < self.window
                        )
                        if self.limit is not None:
                            break  # an earlier item failed: later ones change nothing
                        if not read_all and all(self.halted):
                            break
                        self.held[k] = item
                        self.produced = k = k + 1
                        self.cond.notify_all()
                    if on_item is not None:
                        on_item(item)
            except Exception as exc:  # raised by items itself at item k
                with self.cond:
                    self._fail(k, -1, exc)
            finally:
                source.close()  # stops the reading thread
            with self.cond:
                self.cond.wait_for(self._fed_all)
                failed = bool(self.errors)
            if not failed:
                if not settle():
                    return None
                with self.cond:
                    self.finishing = True
                    self.cond.notify_all()
                    self.cond.wait_for(lambda: all(self.finished))
        finally:
            with self.cond:
                self.closing = True
                self.cond.notify_all()
            for w in workers:
                w.join()
        if self.errors:
            raise min(self.errors, key=lambda e: (e[0], e[1]))[2]
        return self.results
