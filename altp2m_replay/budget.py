"""Memory budget (SPEC §13): the limit of each process and the check before every growth.

While a cell runs, the engine asks :func:`ensure` before every growth of its pool or tables,
and trace checks before they allocate what a trace's values ask for. Sizing a run before it
starts (what each cell needs from its policy and trace) is ``engine/sizing.py``'s job.

The budget is ``--max-memory`` (default: half the machine's RAM) and applies to each process
of a run (``--jobs N`` runs up to N). It travels to worker processes in the environment.
"""

from __future__ import annotations

import os
import re

from altp2m_replay.errors import MemoryBudgetError, ReplayError

ENV = "ALTP2M_REPLAY_MAX_MEMORY"
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


# --------------------------------------------------------------------------- the limit
def parse_size(text: str, where: str = "--max-memory") -> int:
    """``8G``, ``512M``, ``1.5GiB``, ``1073741824`` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(text))
    if m is None:
        raise ReplayError(
            f"{where}: expected a size such as 8G, 512M or 1073741824, found {text!r}"
        )
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 1 << 20:
        raise ReplayError(f"{where}: {text} is below 1 MiB; a replay needs more than that")
    return n


def machine_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def limit() -> int:
    """The budget of this process in bytes: ``set_limit``'s, else half the machine's RAM."""
    raw = os.environ.get(ENV)
    if raw:
        try:
            return parse_size(raw, ENV)
        except ReplayError:
            pass
    return machine_ram() // 2


def set_limit(nbytes: int) -> None:
    """Set the budget for this process and the worker processes it starts."""
    os.environ[ENV] = str(int(nbytes))


def fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def rss() -> int:
    """Resident memory of this process in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def room() -> int:
    """Bytes this process may still take before it reaches the budget."""
    return limit() - rss()


def ensure(extra: int, what: str) -> None:
    """Raise MemoryBudgetError when taking ``extra`` more bytes would pass the budget."""
    if extra > room():
        raise MemoryBudgetError(
            f"{what} needs {fmt(extra)} more, which takes the process past --max-memory "
            f"{fmt(limit())} ({fmt(rss())} in use); raise --max-memory or shrink what asks for it"
        )
