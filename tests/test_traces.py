"""traces: schema checks, streaming batches, validation, info, atomic writes; CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from altp2m_replay import traces
from altp2m_replay.cli import main
from altp2m_replay.errors import TraceError
from altp2m_replay.traces import (
    META_KEY,
    TraceWriter,
    checker,
    open_trace,
    validate,
    write_trace,
)

SAMPLES = Path(__file__).resolve().parent.parent / "traces"


def run_error(args, *paths_absent):
    """Run the CLI expecting bad input: exit 2, exactly one ``Error:`` line, no output."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for p in paths_absent:
        assert not Path(p).exists()
    return lines[0]


def small(n=10, **extra):
    data = {
        "gfn": np.arange(n, dtype=np.uint64) + 0x1000,
        "access": np.tile(np.array([4, 1, 2, 3], np.uint8), n)[:n],
        "vcpu": (np.arange(n) % 2).astype(np.uint16),
        "tsc": np.arange(n, dtype=np.uint64) * 10,
    }
    data.update(extra)
    return data


def raw_parquet(path, columns: dict, **kw):
    """Write an arbitrary (possibly invalid) table with plain pyarrow."""
    pq.write_table(pa.table(columns), path, **kw)
    return path


# --------------------------------------------------------------------------- open / batches
def test_open_trace_attributes(tmp_path):
    p = tmp_path / "t.parquet"
    meta = {
        "source": "unit",
        "vcpus": 2,
        "ram": [[0, 0xFFFF]],
        "gfn_sets": {"pt": [[1, 2], [5, 5]]},
    }
    write_trace(small(25), p, meta=meta, row_group_size=10)
    tr = open_trace(p)
    assert tr.path == p and tr.name == "t" and tr.rows == 25 and tr.row_groups == 3
    assert tr.columns == frozenset({"gfn", "access", "vcpu", "tsc"})
    assert tr.size == p.stat().st_size
    assert tr.meta.source == "unit" and tr.meta.vcpus == 2 and tr.meta.format == 1
    assert tr.meta.ram == [(0, 0xFFFF)]
    assert tr.meta.gfn_sets == {"pt": [(1, 2), (5, 5)]}
    kv = pq.ParquetFile(p).metadata.metadata
    assert json.loads(kv[META_KEY.encode()])["format"] == 1


def test_batches_gpa_defaults_and_dtypes(tmp_path):
    p = tmp_path / "g.parquet"
    gpa = np.array([0x1234, 0x5678_9ABC, (1 << 48) - 1], np.uint64)
    write_trace({"gpa": gpa, "access": np.array([1, 2, 4], np.uint8)}, p)
    (b,) = list(open_trace(p).batches())
    assert b.start == 0 and len(b) == 3
    np.testing.assert_array_equal(b.gfn, gpa >> np.uint64(12))
    assert b.vcpu.dtype == np.uint16 and not b.vcpu.any()
    assert b.insn is None and b.tsc is None and b.ip is None and b.gla is None
    for arr in (b.gfn, b.access, b.vcpu):
        assert arr.flags.c_contiguous
    assert b.gfn.dtype == np.uint64 and b.access.dtype == np.uint8


def test_batches_convert_other_integer_widths(tmp_path):
    p = raw_parquet(
        tmp_path / "w.parquet",
        {
            "gfn": pa.array([1, 2, 3], pa.int32()),
            "access": pa.array([1, 2, 4], pa.int64()),
            "vcpu": pa.array([0, 1, 2], pa.uint8()),
            "tsc": pa.array([5, 6, 7], pa.int16()),
            "note": pa.array(["a", "b", "c"]),  # unknown extra column: ignored
        },
    )
    tr = open_trace(p)
    assert "note" not in tr.columns
    (b,) = list(tr.batches(columns=("gfn", "access", "vcpu", "tsc", "ip")))
    assert (b.gfn.dtype, b.access.dtype, b.vcpu.dtype, b.tsc.dtype) == (
        np.uint64,
        np.uint8,
        np.uint16,
        np.uint64,
    )
    assert b.ip is None and b.insn is None
    assert validate(p).rows == 3


def test_batches_default_is_row_groups_and_batch_rows(tmp_path):
    p = tmp_path / "rg.parquet"
    write_trace(small(1000), p, row_group_size=300)
    tr = open_trace(p)
    assert [(b.start, len(b)) for b in tr.batches()] == [
        (0, 300),
        (300, 300),
        (600, 300),
        (900, 100),
    ]
    for rows in (1, 7, 256, 5000):
        got = list(tr.batches(batch_rows=rows, columns=("gfn",)))
        assert all(b.access is None for b in got)
        assert [b.start for b in got] == list(np.cumsum([0] + [len(b) for b in got[:-1]]))
        np.testing.assert_array_equal(np.concatenate([b.gfn for b in got]), small(1000)["gfn"])
    with pytest.raises(ValueError, match="gva"):
        list(tr.batches(columns=("gva",)))
    assert all(b.gpa is None for b in tr.batches(columns=("gfn", "gpa")))  # a gfn trace


def test_trace_writer_row_groups_exact(tmp_path):
    p = tmp_path / "w.parquet"
    data = small(1000)
    with TraceWriter(p, row_group_size=128) as w:
        for lo, hi in ((0, 5), (5, 400), (400, 401), (401, 1000)):
            w.write({k: v[lo:hi] for k, v in data.items()})
        w.meta["source"] = "late"
    tr = open_trace(p)
    assert tr.group_rows == (128,) * 7 + (104,)
    assert tr.meta.source == "late"
    got = np.concatenate([b.tsc for b in tr.batches()])
    np.testing.assert_array_equal(got, data["tsc"])


def test_write_trace_polars_and_arrow_inputs(tmp_path):
    import polars as pl

    df = pl.DataFrame({"gfn": [1, 2, 3], "access": [1, 2, 4], "insn": [0, 0, 1]})
    write_trace(df, tmp_path / "pl.parquet")
    write_trace(df.to_arrow(), tmp_path / "pa.parquet")
    for name in ("pl", "pa"):
        tr = open_trace(tmp_path / f"{name}.parquet")
        assert tr.types["gfn"] == pa.uint64() and tr.types["access"] == pa.uint8()
        assert list(next(tr.batches()).insn) == [0, 0, 1]


def test_write_is_atomic(tmp_path):
    p = tmp_path / "keep.parquet"
    write_trace(small(5), p)
    before = p.read_bytes()
    with pytest.raises(RuntimeError), TraceWriter(p) as w:
        w.write(small(5))
        raise RuntimeError("interrupted")
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["keep.parquet"]
    with pytest.raises(TraceError, match="cannot be stored as uint8"):
        write_trace({"gfn": [1], "access": [300]}, tmp_path / "bad.parquet")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["keep.parquet"]


def test_metadata_errors(tmp_path):
    t = pa.table({"gfn": pa.array([1], pa.uint64()), "access": pa.array([1], pa.uint8())})
    cases = {
        b"{not json": "altp2m_replay",
        b'{"format": 2}': '"format" must be 1',
        b'{"ram": [[5, 1]]}': '"ram"',
        b'{"gfn_sets": {"pt": [1, 2]}}': '"gfn_sets.pt"',
        b'{"vcpus": "four"}': '"vcpus"',
        b"[1, 2]": "JSON object",
    }
    for i, (raw, needle) in enumerate(cases.items()):
        p = tmp_path / f"m{i}.parquet"
        pq.write_table(t.replace_schema_metadata({META_KEY: raw}), p)
        with pytest.raises(TraceError) as exc:
            open_trace(p)
        msg = str(exc.value)
        assert msg.startswith(f'{p}: metadata key "{META_KEY}"') and needle in msg, msg
        assert "\n" not in msg


def test_meta_absent_is_default(tmp_path):
    p = raw_parquet(
        tmp_path / "n.parquet",
        {"gfn": pa.array([1], pa.uint64()), "access": pa.array([1], pa.uint8())},
    )
    m = open_trace(p).meta
    assert (m.format, m.source, m.vcpus, m.ram, m.gfn_sets) == (1, None, None, None, {})


# --------------------------------------------------------------------------- validate
def brute_stats(gfn, access, vcpu):
    out = {}
    for key, mask in (
        ("touched", np.ones(len(gfn), bool)),
        ("read", (access & 1) != 0),
        ("written", (access & 2) != 0),
        ("executed", (access & 4) != 0),
    ):
        u, c = np.unique(gfn[mask], return_counts=True)
        out[key] = (u, c)
    return out


def test_validate_stats_and_page_counts(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    n = 5000
    gfn = rng.integers(0, 300, n).astype(np.uint64) * np.uint64(7)
    access = rng.integers(1, 8, n).astype(np.uint8)
    vcpu = rng.integers(0, 5, n).astype(np.uint16)
    p = tmp_path / "s.parquet"
    write_trace(
        {"gpa": (gfn << np.uint64(12)) | np.uint64(0x123), "access": access, "vcpu": vcpu},
        p,
        row_group_size=700,
    )
    # A tiny first table, so the per-page tally really grows many times.
    monkeypatch.setattr(checker, "_TALLY_START", 2)
    st_ = validate(p, page_counts=True)
    assert st_.rows == n
    np.testing.assert_array_equal(st_.vcpus, np.unique(vcpu))
    assert st_.max_gfn == int(gfn.max()) and st_.min_gfn == int(gfn.min())
    np.testing.assert_array_equal(st_.access_counts, np.bincount(access, minlength=8))
    assert st_.distinct_gfns == len(np.unique(gfn))
    for key, (u, c) in brute_stats(gfn, access, vcpu).items():
        got_u, got_c = st_.page_counts[key]
        assert got_u.dtype == np.uint64 and got_c.dtype == np.int64
        np.testing.assert_array_equal(got_u, u)
        np.testing.assert_array_equal(got_c, c)
    plain = validate(p)
    assert plain.page_counts is None and plain.distinct_gfns is None


@pytest.mark.parametrize("stats", [True, False])
def test_validate_with_and_without_parquet_statistics(tmp_path, stats):
    """Clean column chunks are skipped via statistics; without statistics every value is read."""
    gpa = pa.array([1 << 12, 2 << 12, 1 << 48, 5], pa.uint64())
    p = raw_parquet(
        tmp_path / "s.parquet",
        {"gpa": gpa, "access": pa.array([1, 1, 1, 1], pa.uint8())},
        write_statistics=stats,
    )
    with pytest.raises(
        TraceError,
        match=r'row 2, column "gpa": expected a guest-physical address below 2\^48, found 281474976710656',
    ):
        validate(p)
    ok = raw_parquet(
        tmp_path / "ok.parquet",
        {
            "gpa": pa.array([1 << 12, 9 << 12], pa.uint64()),
            "access": pa.array([1, 1], pa.uint8()),
            "ip": pa.array([1, None], pa.uint64()),
        },
        write_statistics=stats,
    )
    with pytest.raises(
        TraceError,
        match=r'row 1, column "ip": expected a value \(nulls are not allowed\), found null',
    ):
        validate(ok)


def test_validate_reports_earliest_row_across_checks(tmp_path):
    n = 50
    data = small(n)
    data["access"] = data["access"].copy()
    data["vcpu"] = data["vcpu"].copy()
    data["access"][30] = 0
    data["vcpu"][20] = 5000
    data["tsc"] = data["tsc"].copy()
    data["tsc"][40] = 0
    p = tmp_path / "e.parquet"
    write_trace(data, p, row_group_size=16)
    with pytest.raises(TraceError, match=r'row 20, column "vcpu"'):
        validate(p)


@pytest.mark.parametrize("vcpus", [1, 3, 40])
def test_tsc_decrease_found_across_row_groups(tmp_path, vcpus):
    n = 400
    vcpu = (np.arange(n) % vcpus).astype(np.uint16)
    tsc = np.arange(n, dtype=np.uint64) * 3
    v_bad = vcpu[257]
    tsc[257] = tsc[257 - vcpus] - 1  # below the previous row of the same vCPU
    p = tmp_path / "t.parquet"
    write_trace(
        {"gfn": np.ones(n, np.uint64), "access": np.ones(n, np.uint8), "vcpu": vcpu, "tsc": tsc},
        p,
        row_group_size=256 if vcpus > 1 else 257,
    )
    with pytest.raises(TraceError) as exc:
        validate(p)
    msg = str(exc.value)
    assert (
        'row 257, column "tsc"' in msg
        and f"vCPU {v_bad} was at {tsc[257 - vcpus]} in row {257 - vcpus}" in msg
    )
    # Equal tsc values and other vCPUs running "behind" are fine.
    tsc2 = np.repeat(np.arange(n // 2, dtype=np.uint64), 2)
    write_trace(
        {
            "gfn": np.ones(n, np.uint64),
            "access": np.ones(n, np.uint8),
            "vcpu": vcpu,
            "tsc": tsc2[::-1].copy() if vcpus == 1 else np.where(vcpu == 0, tsc2, tsc2 // 2),
        },
        p,
        row_group_size=100,
    )
    if vcpus == 1:
        with pytest.raises(TraceError, match='row 2, column "tsc"'):
            validate(p)
    else:
        assert validate(p).rows == n


def test_info_text(tmp_path):
    p = tmp_path / "big.parquet"
    n = 12_345
    write_trace(
        small(n, gfn=(np.arange(n) % 1500).astype(np.uint64)),
        p,
        meta={"source": "unit test", "ram": [[0, 0xFFFFF]], "gfn_sets": {"page_tables": [[1, 4]]}},
    )
    text = traces.info_text(p)
    for needle in (
        "12,345",
        "row groups:",
        "distinct gfns:",
        "1,500 (",
        "vCPUs:",
        "2 (0, 1)",
        "rw (3)",
        "source:",
        "unit test",
        "0x0-0xfffff (4.0 GiB)",
        "set page_tables",
        "4 pages",
    ):
        assert needle in text, (needle, text)


def test_samples_are_valid():
    files = sorted(SAMPLES.glob("*.parquet"))
    assert len(files) >= 4
    for f in files:
        assert f.stat().st_size < 3_000_000
        st_ = validate(f)
        tr = open_trace(f)
        assert tr.meta.source and st_.rows == tr.rows
        if tr.meta.ram and not tr.meta.source.startswith("qemu-capture:"):
            # (real captures also touch MMIO outside RAM: tests/test_capture_import.py)
            inside = any(a <= st_.min_gfn and st_.max_gfn <= b for a, b in tr.meta.ram)
            assert inside, f


# --------------------------------------------------------------------------- hypothesis
@st.composite
def tables(draw):
    n = draw(st.integers(1, 120))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    addr = draw(st.sampled_from(["gpa", "gfn"]))
    limit = (1 << 48) if addr == "gpa" else (1 << 36)
    data = {
        addr: rng.integers(0, limit, n, dtype=np.uint64),
        "access": rng.integers(1, 8, n).astype(np.uint8),
    }
    optional = draw(st.sets(st.sampled_from(["vcpu", "insn", "gla", "ip", "tsc"])))
    if "vcpu" in optional:
        data["vcpu"] = rng.integers(0, 4096, n).astype(np.uint16)
    for col in ("insn", "gla", "ip"):
        if col in optional:
            data[col] = rng.integers(0, np.iinfo(np.uint64).max, n, dtype=np.uint64, endpoint=True)
    if "tsc" in optional:  # globally non-decreasing, so non-decreasing per vCPU too
        start = int(rng.integers(0, 1 << 63))
        data["tsc"] = np.uint64(start) + np.cumsum(rng.integers(0, 1 << 40, n)).astype(np.uint64)
    return data


def concat(batches, col):
    parts = [getattr(b, col) for b in batches]
    return None if parts[0] is None else np.concatenate(parts)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=tables(), rg=st.integers(1, 50), batch_rows=st.integers(1, 40))
def test_roundtrip_property(tmp_path, data, rg, batch_rows):
    p = tmp_path / "h.parquet"
    write_trace(data, p, row_group_size=rg)
    tr = open_trace(p)
    cols = ("gfn", "access", "vcpu", "insn", "tsc", "ip", "gla")
    runs = [
        list(tr.batches(columns=cols)),
        list(tr.batches(1, cols)),
        list(tr.batches(7, cols)),
        list(tr.batches(batch_rows, cols)),
    ]
    n = len(data["access"])
    gfn = data["gpa"] >> np.uint64(12) if "gpa" in data else data["gfn"]
    for batches in runs:
        assert sum(len(b) for b in batches) == n
        np.testing.assert_array_equal(concat(batches, "gfn"), gfn)
        np.testing.assert_array_equal(concat(batches, "access"), data["access"])
        np.testing.assert_array_equal(
            concat(batches, "vcpu"), data.get("vcpu", np.zeros(n, np.uint16))
        )
        for col in ("insn", "tsc", "ip", "gla"):
            got = concat(batches, col)
            if col in data:
                np.testing.assert_array_equal(got, data[col])
            else:
                assert got is None
    s = validate(p, page_counts=True)
    assert s.rows == n and s.max_gfn == int(gfn.max())
    np.testing.assert_array_equal(s.access_counts, np.bincount(data["access"], minlength=8))
    np.testing.assert_array_equal(s.page_counts["touched"][0], np.unique(gfn))


_BAD = {
    "access": [0, 8, 255],
    "gfn": [1 << 36, (1 << 64) - 1],
    "vcpu": [4096, 65535],
    "op": [5, 7],  # 1..4 are control rows (tests/test_control_rows.py)
}


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(n=st.integers(2, 200), col=st.sampled_from(sorted(_BAD)), data=st.data())
def test_validate_names_first_bad_row_property(tmp_path, n, col, data):
    rows = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=3)))
    value = data.draw(st.sampled_from(_BAD[col]))
    cols = {
        "gfn": np.arange(n, dtype=np.uint64),
        "access": np.ones(n, np.uint8),
        "vcpu": np.zeros(n, np.uint16),
        "op": np.zeros(n, np.uint8),
    }
    dtype = {"access": pa.uint8(), "gfn": pa.uint64(), "vcpu": pa.uint16(), "op": pa.uint8()}
    arr = cols[col].astype(np.uint64)
    arr[rows] = value
    table = {c: pa.array(v, dtype[c]) for c, v in cols.items()}
    table[col] = pa.array(arr, pa.uint64())  # wide type so the bad value fits the file
    p = raw_parquet(tmp_path / "b.parquet", table, row_group_size=data.draw(st.integers(1, 64)))
    with pytest.raises(TraceError) as exc:
        validate(p)
    assert f'row {rows[0]}, column "{col}"' in str(exc.value)
    assert f"found {value}" in str(exc.value)


# --------------------------------------------------------------------------- CLI errors
def _good(tmp_path):
    p = tmp_path / "good.parquet"
    write_trace(small(2000), p)
    return p


CASES = {
    "missing": (lambda d: d / "nope.parquet", ["nope.parquet: no such file"]),
    "truncated": (lambda d: _truncate(_good(d)), ["not a Parquet file"]),
    "text": (
        lambda d: _write_text(d / "t.parquet", "gfn,access\n1,2\n"),
        ["t.parquet: not a Parquet file ("],
    ),
    "no access": (
        lambda d: raw_parquet(d / "t.parquet", {"gfn": pa.array([1], pa.uint64())}),
        ['no "access" column'],
    ),
    "gpa and gfn": (
        lambda d: raw_parquet(
            d / "t.parquet",
            {
                "gpa": pa.array([1], pa.uint64()),
                "gfn": pa.array([1], pa.uint64()),
                "access": pa.array([1], pa.uint8()),
            },
        ),
        ['both "gpa" and "gfn"'],
    ),
    "no address": (
        lambda d: raw_parquet(d / "t.parquet", {"access": pa.array([1], pa.uint8())}),
        ['no "gpa" or "gfn" column'],
    ),
    "float": (
        lambda d: raw_parquet(
            d / "t.parquet", {"gfn": pa.array([1], pa.uint64()), "access": pa.array([1.0])}
        ),
        ['t.parquet: column "access" must be uint8, found double'],
    ),
    "string": (
        lambda d: raw_parquet(
            d / "t.parquet", {"gfn": pa.array(["1"]), "access": pa.array([1], pa.uint8())}
        ),
        ['column "gfn" must be uint64, found string'],
    ),
    "negative": (
        lambda d: raw_parquet(
            d / "t.parquet",
            {
                "gfn": pa.array([1, 2, 3, -4], pa.int64()),
                "access": pa.array([1, 1, 1, 1], pa.int8()),
            },
        ),
        ['row 3, column "gfn"', "found -4"],
    ),
    "access 0": (
        lambda d: raw_parquet(
            d / "t.parquet",
            {"gfn": pa.array([1, 2], pa.uint64()), "access": pa.array([1, 0], pa.uint8())},
        ),
        ['row 1, column "access"', "1..7", "found 0"],
    ),
    "access 8": (
        lambda d: raw_parquet(
            d / "t.parquet",
            {"gfn": pa.array([1, 2], pa.uint64()), "access": pa.array([8, 1], pa.int32())},
        ),
        ['row 0, column "access"', "found 8"],
    ),
    "gpa 2^48": (
        lambda d: raw_parquet(
            d / "t.parquet",
            {"gpa": pa.array([0, 1 << 48], pa.uint64()), "access": pa.array([1, 1], pa.uint8())},
        ),
        ['row 1, column "gpa"', "below 2^48", "found 281474976710656"],
    ),
    "vcpu 4096": (
        lambda d: raw_parquet(
            d / "t.parquet",
            {
                "gfn": pa.array([0, 1, 2], pa.uint64()),
                "access": pa.array([1, 1, 1], pa.uint8()),
                "vcpu": pa.array([0, 0, 4096], pa.uint16()),
            },
        ),
        ['row 2, column "vcpu"', "0..4095", "found 4096"],
    ),
    "null": (
        lambda d: raw_parquet(
            d / "t.parquet",
            {"gfn": pa.array([0, 1, 2], pa.uint64()), "access": pa.array([1, None, 1], pa.uint8())},
        ),
        ['row 1, column "access"', "found null"],
    ),
    "empty": (
        lambda d: raw_parquet(
            d / "t.parquet", {"gfn": pa.array([], pa.uint64()), "access": pa.array([], pa.uint8())}
        ),
        ["empty trace (0 rows)"],
    ),
    "op": (
        lambda d: raw_parquet(
            d / "t.parquet",
            {
                "gfn": pa.array([0, 1], pa.uint64()),
                "access": pa.array([1, 1], pa.uint8()),
                "op": pa.array([0, 5], pa.uint8()),
            },
        ),
        ['row 1, column "op"', "an op in 0..4", "found 5"],
    ),
    "tsc": (
        lambda d: raw_parquet(
            d / "t.parquet",
            {
                "gfn": pa.array([0, 1, 2, 3], pa.uint64()),
                "access": pa.array([1, 1, 1, 1], pa.uint8()),
                "vcpu": pa.array([0, 1, 0, 1], pa.uint16()),
                "tsc": pa.array([10, 5, 20, 4], pa.uint64()),
            },
        ),
        ['row 3, column "tsc"', "non-decreasing", "vCPU 1 was at 5 in row 1", "found 4"],
    ),
}


def _truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def _write_text(p, text):
    p.write_text(text)
    return p


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("command", ["validate", "info"])
def test_cli_trace_errors(tmp_path, case, command):
    make, needles = CASES[case]
    p = make(tmp_path)
    line = run_error(["trace", command, p])
    assert str(p) in line
    for needle in needles:
        assert needle in line, (needle, line)


def test_cli_validate_and_info_ok(tmp_path):
    p = _good(tmp_path)
    r = CliRunner().invoke(main, ["trace", "validate", str(p)])
    assert r.exit_code == 0 and "valid, 2,000 rows" in r.output
    r = CliRunner().invoke(main, ["trace", "info", str(p)])
    assert r.exit_code == 0 and "2,000" in r.output
