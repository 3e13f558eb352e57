"""The `compare` gate fails closed (issue 12): a gated metric that is null, NaN, infinite or
missing in NEW fails the gate instead of passing it."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from altp2m_replay import run
from altp2m_replay.cli import main


def compare(*args):
    return CliRunner().invoke(main, ["compare", *[str(a) for a in args]])


@pytest.fixture(scope="module")
def base(tmp_path_factory, small_kernel_trace) -> Path:
    out = tmp_path_factory.mktemp("gate") / "base"
    run.replay(
        [small_kernel_trace], ["baseline", "xen-access-altp2m-write"], out, jobs=1, html=False
    )
    return out


def edited(base: Path, dst: Path, column: str, value) -> Path:
    """A copy of BASE whose xen-access-altp2m-write total has ``column = value`` (``value``
    "drop": the column is gone), re-signed in the manifest as if one run wrote it."""
    shutil.copytree(base, dst)
    df = pl.read_parquet(dst / "summary.parquet")
    if value == "drop":
        df = df.drop(column)
    else:
        hit = (pl.col("policy") == "xen-access-altp2m-write") & (pl.col("vcpu") == -1)
        df = df.with_columns(
            pl.when(hit)
            .then(pl.lit(value, dtype=df.schema[column]))
            .otherwise(pl.col(column))
            .alias(column)
        )
    df.write_parquet(dst / "summary.parquet")
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["files"]["summary.parquet"] = hashlib.sha256(
        (dst / "summary.parquet").read_bytes()
    ).hexdigest()
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_an_infinite_number_in_new_is_refused_as_bad_input(base, tmp_path):
    # Replay never writes one (costs that would overflow are refused), so an infinite number
    # is a damaged or hand-edited table: one Error line naming row and column, exit 2.
    new = edited(base, tmp_path / "new", "cycles_total", math.inf)
    r = compare(base, new, "--max-increase", 1000)
    assert r.exit_code == 2, r.output
    (line,) = r.stderr.splitlines()
    assert line.startswith("Error: ") and '"cycles_total"' in line and "finite" in line


@pytest.mark.parametrize("fmt", ["text", "markdown", "json"])
@pytest.mark.parametrize("value", [None, math.nan], ids=["null", "nan"])
def test_a_gated_metric_without_a_usable_value_in_new_fails(base, tmp_path, value, fmt):
    new = edited(base, tmp_path / "new", "cycles_total", value)
    r = compare(base, new, "--format", fmt, "--max-increase", 1000)
    assert r.exit_code == 1, r.output
    (line,) = r.stderr.splitlines()
    assert line.startswith("Error: ") and "no usable value" in line
    if fmt == "json":
        doc = json.loads(r.stdout)  # still valid JSON, infinity included
        assert doc["failed"] is True
        (bad,) = [c for c in doc["cells"] if c["failed"]]
        assert bad["policy"] == "xen-access-altp2m-write" and bad["vcpu"] == -1
        assert bad["metrics"]["cycles_total"]["status"] == "invalid"
    else:
        assert "null, NaN or infinite in new" in r.stdout
        assert ("INVALID" if fmt == "text" else "❌ invalid") in r.stdout


def test_an_unusable_value_in_base_only_is_not_a_failure(base, tmp_path):
    old = edited(base, tmp_path / "old", "ept_exits", None)
    r = compare(old, base)
    assert r.exit_code == 0, r.output
    assert "n/a" in r.stdout


def test_a_gated_metric_missing_from_new_is_an_error(base, tmp_path):
    new = edited(base, tmp_path / "new", "vm_events", "drop")
    r = compare(base, new)
    assert r.exit_code == 2, r.output
    (line,) = r.stderr.splitlines()
    assert line.startswith("Error: ") and '"vm_events": no such column' in line


def test_null_in_both_still_fails_when_gated(base, tmp_path):
    old = edited(base, tmp_path / "old", "cycles_total", None)
    new = edited(base, tmp_path / "new", "cycles_total", None)
    r = compare(old, new, "--metric", "cycles_total")
    assert r.exit_code == 1, r.output
    assert "1 value null, NaN or infinite in new" in r.stdout
