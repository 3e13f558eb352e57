"""One error hierarchy. The CLI turns every ``ReplayError`` into ``Error: ...`` and exit 2."""

from __future__ import annotations

import difflib


class ReplayError(Exception):
    """Bad input or usage: the user can fix it. Exit code 2."""

    exit_code = 2


class TraceError(ReplayError):
    """A trace file is missing, unreadable, or breaks the trace format (SPEC §2)."""


class ImportFormatError(ReplayError):
    """An importer met a malformed input line."""


class PolicyError(ReplayError):
    """A policy file is broken, unknown, or asks for something Xen would refuse."""


class ReplayRuntimeError(ReplayError):
    """The trace drove the policy somewhere it cannot go (unmatched violation, retry loop)."""


class MemoryBudgetError(ReplayRuntimeError):
    """A run would need more memory than ``--max-memory`` allows (sized before the work, or
    guarded when a table grows)."""


class OutputError(ReplayError):
    """An output or results folder is missing, unreadable or inconsistent."""


class WorkerLost(ReplayError):
    """A worker process died (killed by the system, often for memory). Exit code 1."""

    exit_code = 1


class Interrupted(ReplayError):
    """Ctrl-C (SIGINT): the run stopped; the message says what it kept. Exit code 130."""

    exit_code = 130


class GateFailed(ReplayError):
    """``compare`` found a metric that grew past the threshold. Exit code 1."""

    exit_code = 1


def escape(text: str) -> str:
    """``text`` with control characters (newlines, terminal escapes) shown as Python escapes,
    so text taken from a file or a file name prints as what it is, on one line."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def shown(value, limit: int = 60) -> str:
    """``repr(value)``, cut to about ``limit`` characters (a value from a file can be huge)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<{type(value).__name__} nested too deeply>"
    return text if len(text) <= limit else text[:limit] + "..."


def did_you_mean(word: str, choices) -> str:
    """Return ' (did you mean "x"?)' when a close match exists, else ''."""
    if not isinstance(word, str) or len(word) > 100:  # a list or table from a file; a blob
        return ""
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its class name when it has none: a library's
    multi-line error becomes the one line an ``Error:`` message can carry."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
