"""Shared fixtures: small generated traces, written once per test session through the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import settings

from altp2m_replay.cli import main

if os.environ.get("HYPOTHESIS_MAX_EXAMPLES"):
    # `make test-fast`: a few examples per property that does not set its own (the big
    # reference-vs-kernel properties read the same variable)
    settings.register_profile("fast", max_examples=int(os.environ["HYPOTHESIS_MAX_EXAMPLES"]))
    settings.load_profile("fast")


def _generate(path: Path, rows: int, seed: int, vcpus: int) -> Path:
    args = [
        "trace",
        "generate",
        "kernel",
        "-n",
        str(rows),
        "--seed",
        str(seed),
        "--vcpus",
        str(vcpus),
        "-o",
        str(path),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="session")
def kernel_trace(tmp_path_factory) -> Path:
    """`trace generate kernel -n 20000 --seed 1 --vcpus 2`, as ``kern.parquet``.

    Tests must not modify it; copy it first.
    """
    return _generate(tmp_path_factory.mktemp("kernel-trace") / "kern.parquet", 20_000, 1, 2)


@pytest.fixture(scope="session")
def small_kernel_trace(tmp_path_factory) -> Path:
    """`trace generate kernel -n 2000 --seed 7 --vcpus 2`, as ``small.parquet``."""
    return _generate(tmp_path_factory.mktemp("small-trace") / "small.parquet", 2_000, 7, 2)
