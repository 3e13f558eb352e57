"""importers.py: lackey, qemu-mem and csv on hand-written inputs with hand-derived rows."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from altp2m_replay import importers
from altp2m_replay.cli import main
from altp2m_replay.errors import ImportFormatError
from altp2m_replay.traces import open_trace, validate

SAMPLES = Path(__file__).resolve().parent.parent / "traces"


def rows_of(path, cols=("gpa", "access", "insn", "gla", "ip")):
    """Read a trace back as a list of tuples (raw columns, gpa kept as gpa)."""
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    return list(zip(*(t.column(c).to_pylist() for c in cols), strict=True))


def run_error(args, *paths_absent):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for p in paths_absent:
        assert not Path(p).exists()
    return lines[0]


# --------------------------------------------------------------------------- lackey
LACKEY = """\
==4242== Lackey, an example Valgrind tool
==4242== Command: ./demo

I  04000ff0,3
 L 7ff000ffc,8
 S 7ff001000,4
I  04000ffe,4
 M 05000000,4
--4242-- WARNING: unhandled syscall: 334
I  04000ff0,3
==4242== Counted 1 call to main()
"""

# base gfn 0x1000: first-touch order 0x4000 -> 0x1000, 0x7ff000 -> 0x1001,
# 0x7ff001 -> 0x1002, 0x4001 -> 0x1003, 0x5000 -> 0x1004
LACKEY_ROWS = [
    (0x1000FF0, 4, 0, 0x4000FF0, 0x4000FF0),
    (0x1001FFC, 1, 0, 0x7FF000FFC, 0x4000FF0),  # load straddles: first page ...
    (0x1002000, 1, 0, 0x7FF001000, 0x4000FF0),  # ... then the next page from its start
    (0x1002000, 2, 0, 0x7FF001000, 0x4000FF0),
    (0x1000FFE, 4, 1, 0x4000FFE, 0x4000FFE),  # fetch straddles too
    (0x1003000, 4, 1, 0x4001000, 0x4000FFE),
    (0x1004000, 3, 1, 0x5000000, 0x4000FFE),  # M = read-modify-write
    (0x1000FF0, 4, 2, 0x4000FF0, 0x4000FF0),
]


def test_lackey_rows(tmp_path):
    src = tmp_path / "demo.lackey"
    src.write_text(LACKEY)
    out = tmp_path / "demo.parquet"
    assert importers.import_trace("lackey", src, out) == len(LACKEY_ROWS)
    assert rows_of(out) == LACKEY_ROWS
    tr = open_trace(out)
    assert tr.meta.source == "import lackey demo.lackey"
    assert tr.meta.ram == [(0x1000, 0x1004)]
    assert tr.meta.gfn_sets == {"code": [(0x1000, 0x1000), (0x1003, 0x1003)]}
    assert "vcpu" not in tr.columns and validate(out).rows == len(LACKEY_ROWS)


def test_lackey_base_gfn_gzip_and_small_flushes(tmp_path, monkeypatch):
    src = tmp_path / "demo.lackey.gz"
    with gzip.open(src, "wt") as fh:
        fh.write(LACKEY)
    monkeypatch.setattr(importers, "FLUSH_ROWS", 3)
    out = tmp_path / "demo.parquet"
    importers.import_trace("lackey", src, out, base_gfn=0x200)
    shift = (0x1000 - 0x200) << 12
    assert rows_of(out) == [(gpa - shift, *rest) for gpa, *rest in LACKEY_ROWS]


@pytest.mark.parametrize(
    ("bad", "lineno"),
    [
        ("I  zz,3\n", 4),
        (" X 1000,4\n", 4),
        (" L 1000\n", 4),
        ("L 1000,4\n", 4),
        ("hello world\n", 4),
        (" S 1000,-1\n", 4),
    ],
)
def test_lackey_malformed_line(tmp_path, bad, lineno):
    src = tmp_path / "bad.lackey"
    src.write_text("==1== x\nI  0400,3\n L 0500,8\n" + bad + " L 0600,8\n")
    out = tmp_path / "out.parquet"
    line = run_error(["trace", "import", "lackey", src, "-o", out], out)
    assert f"{src}: line {lineno}:" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.lackey"]


def test_lackey_failure_keeps_existing_output(tmp_path):
    src = tmp_path / "bad.lackey"
    src.write_text("I  0400,3\nnonsense\n")
    out = tmp_path / "out.parquet"
    out.write_bytes(b"old")
    with pytest.raises(ImportFormatError, match="line 2"):
        importers.import_trace("lackey", src, out)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.lackey", "out.parquet"]


def test_import_missing_and_empty_inputs(tmp_path):
    out = tmp_path / "o.parquet"
    line = run_error(["trace", "import", "lackey", tmp_path / "nope.log", "-o", out], out)
    assert "nope.log: no such file" in line
    empty = tmp_path / "empty.log"
    empty.write_text("==1== nothing traced\n\n")
    line = run_error(["trace", "import", "lackey", empty, "-o", out], out)
    assert "empty.log: no memory accesses found" in line
    with pytest.raises(ImportFormatError, match='did you mean "lackey"'):
        importers.import_trace("lakey", empty, out)


# --------------------------------------------------------------------------- qemu-mem
QEMU_SYSTEM = """\
insn_vaddr,insn_symbol,mem_vaddr,mem_hwaddr,access_size,access_type,mem_value
0xffffffff81000010,start_kernel,0xffff888000004000,0x4000,32,load,0x00000000
0xffffffff81000014,start_kernel,0xffff888000004000,0x4000,32,store,0x00000001
0xffffffff81000020,foo<int, int>,0xffff888000007ff8,0x7ff8,64,load,0x0000000000000000
0xffffffff81000020,foo<int, int>,0xffff888000007ff8,0x7ff8,64,store,0x0000000000000001
0xffffffff81000020,foo<int, int>,0xffff888000008000,0x8000,64,load,0x0000000000000000
0xffffffff81000020,foo<int, int>,0xffff888000008008,0x8008,64,load,0x0000000000000000
mem accesses: 6
"""


def test_qemu_mem_system_mode(tmp_path):
    src = tmp_path / "q.csv"
    src.write_text(QEMU_SYSTEM)
    out = tmp_path / "q.parquet"
    assert importers.import_trace("qemu-mem", src, out) == 6
    ip1, ip2, ip3 = 0xFFFFFFFF81000010, 0xFFFFFFFF81000014, 0xFFFFFFFF81000020
    assert rows_of(out) == [
        (0x4000, 1, 0, 0xFFFF888000004000, ip1),
        (0x4000, 2, 1, 0xFFFF888000004000, ip2),  # other instruction: new insn
        (0x7FF8, 1, 2, 0xFFFF888000007FF8, ip3),
        (0x7FF8, 2, 2, 0xFFFF888000007FF8, ip3),  # store after load, same ip: same insn (rmw)
        (0x8000, 1, 3, 0xFFFF888000008000, ip3),  # load after store: next execution
        (0x8008, 1, 4, 0xFFFF888000008008, ip3),  # load after load: next execution
    ]
    tr = open_trace(out)
    assert tr.meta.source == "import qemu-mem q.csv" and tr.meta.ram == [(0, 8)]


def test_qemu_mem_user_mode_bits_to_bytes(tmp_path):
    # User-mode QEMU prints mem_hwaddr 0: the first-touch allocator maps mem_vaddr instead.
    src = tmp_path / "u.csv"
    src.write_text(
        "insn_vaddr,insn_symbol,mem_vaddr,mem_hwaddr,access_size,access_type,mem_value\n"
        "0x401000,main,0x7fff0ff0,0x0,64,load,0x0\n"  # 8 bytes at 0xff0: one page
        "0x401004,main,0x7fff0ffc,,64,store,0x0\n"  # 8 bytes at 0xffc: straddles
        "0x401008,,0x600000,0x0,8,load,0x00\n"
    )
    out = tmp_path / "u.parquet"
    assert importers.import_trace("qemu-mem", src, out, base_gfn=0x10) == 4
    assert rows_of(out) == [
        (0x10FF0, 1, 0, 0x7FFF0FF0, 0x401000),
        (0x10FFC, 2, 1, 0x7FFF0FFC, 0x401004),
        (0x11000, 2, 1, 0x7FFF1000, 0x401004),
        (0x12000, 1, 2, 0x600000, 0x401008),
    ]
    assert open_trace(out).meta.ram == [(0x10, 0x12)]


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ("0x1,main,0x2,0x2,32,fetch,0x0", 'access_type must be "load" or "store"'),
        ("0x1,main,0x2,0x2,12,load,0x0", "divisible by 8"),
        ("0x1,main,0x2,0x2,thirty,load,0x0", "decimal access_size"),
        ("0x1,main,0x2", "expected 7 comma-separated fields"),
    ],
)
def test_qemu_mem_malformed(tmp_path, bad, needle):
    src = tmp_path / "q.csv"
    src.write_text(QEMU_SYSTEM.splitlines()[0] + "\n0x1,main,0x2,0x2,32,load,0x0\n" + bad + "\n")
    out = tmp_path / "q.parquet"
    line = run_error(["trace", "import", "qemu-mem", src, "-o", out], out)
    assert f"{src}: line 3:" in line and needle in line


def test_qemu_mem_requires_header(tmp_path):
    src = tmp_path / "q.csv"
    src.write_text("0x1,main,0x2,0x2,32,load,0x0\n")
    with pytest.raises(ImportFormatError, match="line 1: expected the header"):
        importers.import_trace("qemu-mem", src, tmp_path / "q.parquet")


# --------------------------------------------------------------------------- csv
CSV = """\
gfn,access,vcpu,insn,tsc,comment
0x10,x,0,0,100,fetch
0x11,r,0,0,100,
0x12,W,1,0,90,upper case
0x13,rw,1,0,95,

0x14,rx,0,1,110,
0x15,wx,0,2,120,
0x16,rwx,0,3,130,
22,3,0,4,140,digits
"""


def test_csv_letters_hex_and_extra_columns(tmp_path):
    src = tmp_path / "c.csv"
    src.write_text(CSV)
    out = tmp_path / "c.parquet"
    assert importers.import_trace("csv", src, out) == 8
    assert rows_of(out, ("gfn", "access", "vcpu", "insn", "tsc")) == [
        (0x10, 4, 0, 0, 100),
        (0x11, 1, 0, 0, 100),
        (0x12, 2, 1, 0, 90),
        (0x13, 3, 1, 0, 95),
        (0x14, 5, 0, 1, 110),
        (0x15, 6, 0, 2, 120),
        (0x16, 7, 0, 3, 130),
        (22, 3, 0, 4, 140),
    ]
    tr = open_trace(out)
    assert tr.columns == frozenset({"gfn", "access", "vcpu", "insn", "tsc"})
    assert tr.meta.source == "import csv c.csv" and tr.meta.ram == [(0, 22)]
    assert validate(out).rows == 8


def test_csv_gpa(tmp_path):
    src = tmp_path / "g.csv"
    src.write_text("access,gpa\nr,0x1234\nw,8192\n")
    out = tmp_path / "g.parquet"
    importers.import_trace("csv", src, out)
    assert rows_of(out, ("gpa", "access")) == [(0x1234, 1), (8192, 2)]
    assert next(open_trace(out).batches()).gfn.tolist() == [1, 2]


@pytest.mark.parametrize(
    ("body", "lineno", "needle"),
    [
        ("gfn,access\n1,r\n2,q\n", 3, 'column "access": expected 1..7 or letters r, w, x'),
        ("gfn,access\n1,r\n2,0\n", 3, 'column "access"'),
        ("gfn,access\n1,r\n2,rr\n", 3, 'column "access"'),
        ("gfn,access\n1,r\n2,r,5\n", 3, "expected 2 fields as in the header, found 3"),
        ("gfn,access\n1,r\n-2,r\n", 3, 'column "gfn": expected a non-negative integer'),
        ("gfn,access\n1,r\n,r\n", 3, 'column "gfn": expected a non-negative integer'),
        ("gfn,access\n\n1,r\n0x1000000000,r\n", 4, 'column "gfn": expected a gfn below 2^36'),
        ("gfn,access,vcpu\n1,r,4096\n", 2, 'column "vcpu": expected a vCPU number in 0..4095'),
        ("gpa,gfn,access\n1,1,r\n", 1, 'exactly one of the columns "gpa" and "gfn", found both'),
        ("address,access\n1,r\n", 1, 'exactly one of the columns "gpa" and "gfn", found neither'),
        ("gfn,kind\n1,r\n", 1, 'expected an "access" column'),
    ],
)
def test_csv_malformed(tmp_path, body, lineno, needle):
    src = tmp_path / "bad.csv"
    src.write_text(body)
    out = tmp_path / "bad.parquet"
    line = run_error(["trace", "import", "csv", src, "-o", out], out)
    assert f"{src}: line {lineno}:" in line and needle in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv"]


def test_cli_import_ok(tmp_path):
    src = tmp_path / "demo.lackey"
    src.write_text(LACKEY)
    out = tmp_path / "demo.parquet"
    r = CliRunner().invoke(
        main, ["trace", "import", "lackey", str(src), "-o", str(out), "--base-gfn", "4096"]
    )
    assert r.exit_code == 0 and f"wrote {out}: 8 rows" in r.output


def test_real_lackey_sample():
    p = SAMPLES / "wordfreq-lackey.parquet"
    st = validate(p, page_counts=True)
    tr = open_trace(p)
    assert tr.meta.source.startswith("import lackey")
    assert 100_000 < st.rows < 300_000
    assert st.access_counts[4] > st.access_counts[1] > st.access_counts[2] > 0
    assert st.access_counts[3] > 0  # lackey M lines
    # every row's gla page maps to one gfn, allocated in first-touch order from 0x1000
    b = next(tr.batches(columns=("gfn", "gla")))
    pairs = np.unique(np.stack([b.gla >> np.uint64(12), b.gfn]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1]
    assert st.min_gfn == 0x1000 and st.max_gfn == 0x1000 + st.distinct_gfns - 1


def test_base_gfn_takes_hex_and_refuses_garbage(tmp_path):
    from click.testing import CliRunner

    from altp2m_replay import traces
    from altp2m_replay.cli import main

    src = tmp_path / "l.txt"
    src.write_text("I  04000000,4\n L 7ff000010,8\n")
    out = tmp_path / "l.parquet"
    res = CliRunner().invoke(
        main, ["trace", "import", "lackey", str(src), "-o", str(out), "--base-gfn", "0x2000"]
    )
    assert res.exit_code == 0, res.output
    gfns = next(iter(traces.open_trace(out).batches(columns=("gfn", "access")))).gfn
    assert list(gfns) == [0x2000, 0x2001]
    bad = CliRunner().invoke(
        main,
        [
            "trace",
            "import",
            "lackey",
            str(src),
            "-o",
            str(tmp_path / "b.parquet"),
            "--base-gfn",
            "zz",
        ],
    )
    assert bad.exit_code == 2 and "Error:" in bad.output and not (tmp_path / "b.parquet").exists()
