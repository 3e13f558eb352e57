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


def did_you_mean(word: str, choices) -> str:
    """Return ' (did you mean "x"?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""
