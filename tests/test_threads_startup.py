"""Start-up: cached kernels load without Numba's whole lowering library (unit.lean_kernel_loads),
with the same results; the command line imports nothing heavy before it needs it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from altp2m_replay.results import TABLES

PROBE = """
import sys
from altp2m_replay import run
run.replay(sys.argv[1:2], ["xen-access-altp2m-write", "hvmi-ve-pagetables"], sys.argv[2], jobs=1,
           threads=2, html=False)
print("full" if "numba.np.linalg" in sys.modules else "lean")
"""


def _run(code: str, *args, full_init: bool = False) -> str:
    env = {k: v for k, v in os.environ.items() if k != "ALTP2M_REPLAY_NUMBA_FULL_INIT"}
    if full_init:
        env["ALTP2M_REPLAY_NUMBA_FULL_INIT"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


@pytest.fixture(scope="module")
def cached(small_kernel_trace, tmp_path_factory) -> Path:
    """The small trace, once replayed in a process of its own: that process compiles the
    kernels if Numba's cache lacks them, so the probes below load them, as users' runs do."""
    _run(PROBE, small_kernel_trace, tmp_path_factory.mktemp("warm") / "out")
    return small_kernel_trace


def _digests(out: Path) -> list[str]:
    return [hashlib.sha256((out / f"{n}.parquet").read_bytes()).hexdigest() for n in TABLES]


def test_lean_kernel_loads_skip_numbas_registries_and_change_no_result(cached, tmp_path):
    assert _run(PROBE, cached, tmp_path / "lean") == "lean"
    assert _run(PROBE, cached, tmp_path / "full", full_init=True) == "full"
    assert _digests(tmp_path / "lean") == _digests(tmp_path / "full")


@pytest.mark.parametrize(
    ("argv", "absent"),
    [
        (["--help"], ("numpy", "numba", "polars", "pyarrow", "jinja2")),
        (["policy", "list"], ("numba", "polars", "pyarrow", "jinja2")),
        (["replay", "--help"], ("numpy", "numba", "polars", "pyarrow", "jinja2")),
    ],
)
def test_the_command_line_imports_only_what_the_command_needs(argv, absent):
    code = (
        "import sys\nfrom altp2m_replay.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        f"print('imported:', *[m for m in {absent!r} if m in sys.modules])"
    )
    last = _run(code, *argv).splitlines()[-1]
    assert last == "imported:", argv


def test_compare_does_not_import_the_template_engine(small_kernel_trace, tmp_path):
    out = tmp_path / "out"
    _run(PROBE, small_kernel_trace, out)
    code = (
        "import sys\nfrom altp2m_replay.cli import main\n"
        "try:\n    main(['compare', sys.argv[1], sys.argv[1]])\nexcept SystemExit:\n    pass\n"
        "print('imported:', *[m for m in ('jinja2', 'altp2m_replay.report.html') if m in sys.modules])"
    )
    lines = _run(code, out).splitlines()
    assert lines[-1] == "imported:"
    assert any("ept_exits" in line for line in lines)  # the comparison did run


def test_a_replay_without_html_does_not_import_the_report(cached, tmp_path):
    code = PROBE.replace(
        'print("full" if "numba.np.linalg" in sys.modules else "lean")',
        'print("imported:", *[m for m in ("jinja2", "altp2m_replay.report", "distributed") '
        "if m in sys.modules])",
    )
    assert _run(code, cached, tmp_path / "out") == "imported:"


def test_a_replay_from_the_cache_does_not_import_what_only_compiling_needs(cached, tmp_path):
    """numba.np.arrayobj (and what it pulls in: Numba's string and hashing support) is only
    needed to compile ``_kernels.array1`` to ``array3``; importing it cost every replay 60 ms."""
    code = PROBE.replace(
        'print("full" if "numba.np.linalg" in sys.modules else "lean")',
        'print("imported:", *[m for m in ("numba.np.arrayobj", "numba.cpython.charseq") '
        "if m in sys.modules])",
    )
    assert _run(code, cached, tmp_path / "out") == "imported:"


def test_the_execute_warm_up_compiles_is_the_one_replay_batch_calls(cached):
    """warm_kernels compiles ``execute`` in a second process for execute_signature(), and
    replay_batch then loads it from the cache only if it calls it with exactly those types
    (else both compile it, and the cache holds two entries)."""
    from altp2m_replay.engine import _kernels
    from altp2m_replay.engine.simulate import execute_signature

    index = _kernels.execute._cache._cache_file._load_index()
    assert [key[0] for key in index] == [execute_signature()]
