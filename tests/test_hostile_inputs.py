"""Hostile inputs, one class at a time: each gives exit 2, exactly one ``Error:`` line on
stderr and no output file (SPEC §12), never a traceback or a hang."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from altp2m_replay import traces
from altp2m_replay.cli import main
from altp2m_replay.errors import escape


def _files(d) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def one_error(tmp_path, *args, exit_code=2) -> str:
    """Run the CLI in ``tmp_path``; check exit code, one Error line, no new file; return it."""
    before = _files(tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        os.chdir(cwd)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    assert result.exit_code == exit_code, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert _files(tmp_path) == before, "the failed command left files behind"
    return lines[0]


def small_trace(path, meta: str | None = None, **cols):
    data = {"gfn": pa.array([0x10, 0x11], pa.uint64()), "access": pa.array([1, 2], pa.uint8())}
    data.update(cols)
    table = pa.table(data)
    if meta is not None:
        table = table.replace_schema_metadata({traces.META_KEY: meta})
    pq.write_table(table, path)
    return path


POLICY_HEAD = 'name = "hostile"\n'


# --------------------------------------------------------------------------- policy TOML
@pytest.mark.parametrize(
    ("body", "needle"),
    [
        # a list or a table where a string is expected, at every such key
        ('[[setup]]\nop = ["set_mem_access"]\n', "setup[0]: unknown op"),
        ("[[setup]]\nop = { a = 1 }\n", "setup[0]: unknown op"),
        ("[[on_violation]]\naction = { a = 1 }\n", "on_violation[0]: unknown action"),
        ('[[on_violation]]\naction = ["step"]\n', "on_violation[0]: unknown action"),
        ('[[on_violation]]\naction = "emulate"\nkind = [["r"]]\n', '"kind" must be'),
        ('[[on_violation]]\naction = "emulate"\nkind = { r = 1 }\n', '"kind" must be'),
        ('[costs]\nprofile = ["xen-dom0"]\n', "unknown profile"),
        ("[costs]\nprofile = { a = 1 }\n", "unknown profile"),
        (
            '[[view]]\nname = "v"\n[[setup]]\nop = "enable_notify"\n[on_ve]\naction = ["emulate"]\n',
            "[on_ve]: unknown action",
        ),
        ('description = ["a"]\n', '"description" must be a string'),
        ("[domain]\nhost_order = 9.0\n", '"host_order" must be 0, 9 or 18'),
        ("[domain]\nhost_order = [9]\n", '"host_order" must be 0, 9 or 18'),
        ('[domain]\nxen = "4.' + "9" * 5000 + '"\n', '"xen" must be a version'),
        ('[domain]\nxen = ["4.22"]\n', '"xen" must be a version'),
        # integers too large for a float, wherever a number goes
        ("[costs]\nept_exit = 1" + "0" * 400 + "\n", 'cost "ept_exit" must be a number'),
        ("[costs]\ncpu_ghz = 1" + "0" * 400 + "\n", '"cpu_ghz" must be a number'),
        (
            '[[view]]\nname = "v"\n[[setup]]\nop = "set_mem_access"\nview = "v"\naccess = "r"\n'
            'gfns = { set = "touched", top = 1'
            + "0" * 400
            + ' }\n[[on_violation]]\naction = "emulate"\n',
            None,
        ),
        # costs whose totals could overflow a float
        ("[costs]\nept_exit = 1e308\n", 'cost "ept_exit" must be a number'),
        ("[costs]\nmmio = inf\n", 'cost "mmio" must be a number'),
        ("[costs]\ncpu_ghz = 1e-300\n", '"cpu_ghz" must be a number'),
    ],
)
def test_policy_values_of_the_wrong_shape(tmp_path, body, needle):
    path = tmp_path / "p.toml"
    path.write_text(POLICY_HEAD + body, encoding="utf-8")
    if needle is None:  # accepted: a huge top is "all of them"
        result = CliRunner().invoke(main, ["policy", "check", str(path)])
        assert result.exit_code == 0, result.stderr
        return
    line = one_error(tmp_path, "policy", "check", "p.toml")
    assert line.startswith("Error: p.toml: ") and needle in line, line
    assert len(line) < 400, "a huge value is shown cut short"


@pytest.mark.parametrize(
    "nested",
    [
        "x = " + "[" * 5000 + "]" * 5000,
        "x = " + "{ a = " * 3000 + "1" + " }" * 3000,
        "[domain]\nram = " + "[" * 5000 + "]" * 5000,
    ],
)
def test_policy_nested_thousands_deep(tmp_path, nested):
    (tmp_path / "p.toml").write_text(POLICY_HEAD + nested + "\n", encoding="utf-8")
    assert "nested too deeply" in one_error(tmp_path, "policy", "check", "p.toml")


@pytest.mark.parametrize(
    "dotted",
    [
        "a." * 50_000 + "x = 1",  # a dotted key
        "[" + ".".join(["t"] * 50_000) + "]\nx = 1",  # a dotted table header
        "[[" + ".".join(['"q"'] * 30_000) + "]]\nx = 1",  # quoted parts, array of tables
        "x = { " + "b." * 30_000 + "c = 1 }",  # in an inline table
    ],
)
def test_dotted_keys_are_refused_before_the_quadratic_parse(tmp_path, dotted):
    """tomllib takes seconds on a 100 KB dotted key; the limit answers at once. No timing
    assertion: the parse never starts (a broken-TOML error would come from it)."""
    (tmp_path / "p.toml").write_text(POLICY_HEAD + dotted + "\n", encoding="utf-8")
    line = one_error(tmp_path, "policy", "check", "p.toml")
    assert "line 2: a dotted key or table name with more than 100 parts" in line


def test_long_but_legal_dotted_keys_still_parse(tmp_path):
    from altp2m_replay.policy import MAX_KEY_PARTS, parse_policy

    key = ".".join(["a"] * MAX_KEY_PARTS)  # MAX_KEY_PARTS parts: allowed, then unknown
    with pytest.raises(Exception, match='unknown key "a"'):
        parse_policy(POLICY_HEAD + key + " = 1\n", "p.toml")
    # dots inside strings and floats are not key parts
    text = POLICY_HEAD + 'description = "' + "a." * 300 + '"\n[costs]\ncpu_ghz = 2.5\n'
    assert parse_policy(text, "p.toml").costs == {"cpu_ghz": 2.5}


def test_oversized_policy_is_refused(tmp_path, monkeypatch):
    from altp2m_replay import policy

    monkeypatch.setattr(policy, "MAX_POLICY_BYTES", 1000)
    with pytest.raises(policy.PolicyError, match="policy files are limited to 1,000"):
        policy.parse_policy(POLICY_HEAD + "#" * 2000 + "\n", "p.toml")


# --------------------------------------------------------------------------- traces
def test_trace_metadata_nested_thousands_deep(tmp_path):
    small_trace(
        tmp_path / "t.parquet",
        meta='{"format": 1, "source": ' + "[" * 100_000 + "]" * 100_000 + "}",
    )
    for args in (
        ("trace", "info", "t.parquet"),
        ("trace", "validate", "t.parquet"),
        ("replay", "t.parquet", "-p", "baseline", "-o", "out"),
    ):
        line = one_error(tmp_path, *args)
        assert 'metadata key "altp2m_replay": arrays or objects nested too deeply' in line


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_non_regular_files_are_refused_up_front(tmp_path, kind):
    """A FIFO would block the open for ever; a device would never end."""
    if kind == "fifo":
        os.mkfifo(tmp_path / "f.parquet")
        name = "f.parquet"
    else:
        name = "/dev/zero"
    for args in (
        ("trace", "info", name),
        ("trace", "validate", name),
        ("replay", name, "-p", "baseline", "-o", "out"),
        ("policy", "check", "baseline", "--trace", name),
    ):
        assert "not a regular file" in one_error(tmp_path, *args)


def test_validate_and_replay_agree_when_ip_statistics_hide_a_negative_value(tmp_path):
    """Statistics of the ip chunk claim 0..5; the values hold -3. Both commands read the
    values and give the same error."""
    ip = pa.array([5, -3], pa.int64())
    small_trace(tmp_path / "t.parquet", ip=ip)
    _forge_statistic(tmp_path / "t.parquet", -3, 0)
    assert (
        pq.ParquetFile(tmp_path / "t.parquet").metadata.row_group(0).column(2).statistics.min == 0
    )
    v = one_error(tmp_path, "trace", "validate", "t.parquet")
    r = one_error(tmp_path, "replay", "t.parquet", "-p", "baseline", "-o", "out")
    assert 'row 1, column "ip": expected a non-negative integer' in v
    assert v == r


def _forge_statistic(path, old: int, new: int) -> None:
    """Replace the int64 statistic ``old`` by ``new`` in the footer of ``path`` (the footer
    is Thrift: a same-sized value leaves it well-formed)."""
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[-8:-4], "little")
    start = len(data) - 8 - size
    a, b = old.to_bytes(8, "little", signed=True), new.to_bytes(8, "little", signed=True)
    footer = bytes(data[start:-8])
    assert footer.count(a) >= 1
    data[start:-8] = footer.replace(a, b)
    path.write_bytes(bytes(data))


def test_trace_info_escapes_control_characters_from_metadata(tmp_path):
    meta = json.dumps(
        {
            "format": 1,
            "source": "evil\x1b[31mred\nError: spoofed\r\x07",
            "gfn_sets": {"set\nname": [[1, 2]]},
        }
    )
    small_trace(tmp_path / "t.parquet", meta=meta)
    result = CliRunner().invoke(main, ["trace", "info", str(tmp_path / "t.parquet")])
    assert result.exit_code == 0
    out = result.stdout
    assert "\x1b" not in out and "\r" not in out and "\x07" not in out
    assert not any(line.startswith("Error") for line in out.splitlines())
    assert r"evil\x1b[31mred\nError: spoofed\r\x07" in out
    assert r"set set\nname" in out


@pytest.mark.parametrize(
    "name", ["new\nError: spoofed.parquet", "esc\x1b[2Jx.parquet", "cr\rError: over.parquet"]
)
def test_a_file_name_cannot_split_or_spoof_the_error_line(tmp_path, name):
    (tmp_path / name).write_bytes(b"not parquet")
    for args in (
        ("trace", "validate", name),
        ("replay", name, "-p", "baseline", "-o", "out"),
        ("policy", "check", name + ".toml"),
    ):
        line = one_error(tmp_path, *args)
        assert escape(name) in line and "\x1b" not in line and "\r" not in line


# --------------------------------------------------------------------------- importers
def _import(tmp_path, fmt, text: str | bytes, name="in.csv"):
    src = tmp_path / name
    src.write_bytes(text.encode() if isinstance(text, str) else text)
    return one_error(tmp_path, "trace", "import", fmt, name, "-o", "out.parquet")


QEMU_HEAD = "insn_vaddr,insn_symbol,mem_vaddr,mem_hwaddr,access_size,access_type,mem_value\n"


@pytest.mark.parametrize(
    ("fmt", "text", "needle"),
    [
        (
            "csv",
            'gfn,access\n0x10,r\n"' + "a" * 200_000 + '",r\n',
            "line 3: field larger than field limit",
        ),
        (
            "csv",
            "gfn,access\n" + "," * 2_000_000 + "\n",
            "line 2: longer than 1,048,576 characters",
        ),
        ("lackey", "I  " + "1" * 2_000_000 + ",4\n", "line 1: longer than"),
        ("qemu-mem", QEMU_HEAD + "0x1," + "x" * 2_000_000 + "\n", "line 2: longer than"),
        ("csv", "gfn,access\n0x10,r\x00\n", 'line 2: column "access"'),
    ],
)
def test_importer_lines_and_fields_past_the_limits(tmp_path, fmt, text, needle):
    assert needle in _import(tmp_path, fmt, text)


@pytest.mark.parametrize("fmt", ["csv", "lackey", "qemu-mem"])
@pytest.mark.parametrize("damage", ["garbage", "truncated", "not-gzip"])
def test_corrupt_gzip_input(tmp_path, fmt, damage):
    good = gzip.compress(b"gfn,access\n" + b"0x10,r\n" * 50_000)
    blob = {
        "garbage": good[:20] + bytes(range(256)) * 4,
        "truncated": good[: len(good) // 2],
        "not-gzip": b"plain text, named .gz",
    }[damage]
    line = _import(tmp_path, fmt, blob, name="in.csv.gz")
    assert line.startswith("Error: in.csv.gz: ")


def test_csv_with_a_utf8_byte_order_mark_is_read(tmp_path):
    from altp2m_replay.importers import import_trace

    src = tmp_path / "bom.csv"
    src.write_text("gfn,access\n0x10,r\n0x11,w\n", encoding="utf-8-sig")
    assert src.read_bytes()[:3] == b"\xef\xbb\xbf"
    assert import_trace("csv", src, tmp_path / "o.parquet") == 2
    gz = tmp_path / "bom.csv.gz"
    gz.write_bytes(gzip.compress(src.read_bytes()))
    assert import_trace("csv", gz, tmp_path / "g.parquet") == 2


@pytest.mark.parametrize(
    ("fields", "column"),
    [
        ("0xZZ,f,0x2000,,8,load,0", "insn_vaddr"),
        ("0x1000,f,0xZZ,,8,load,0", "mem_vaddr"),
        ("0x1000,f,0x2000,0xZZ,8,load,0", "mem_hwaddr"),
        ("0x1000,f,0x2000,,0x8,load,0", "access_size"),
        ("0x1000,f,0x2000,,-8,load,0", "access_size"),
        ("0x1000,f,0x2000,0x1000000000000,8,load,0", "mem_hwaddr"),
        ("0x10000000000000000,f,0x2000,,8,load,0", "insn_vaddr"),
    ],
)
def test_qemu_mem_names_the_offending_column(tmp_path, fields, column):
    line = _import(tmp_path, "qemu-mem", QEMU_HEAD + fields + "\n")
    assert f"line 2: column {column}:" in line


@pytest.mark.parametrize("bits", [1 << 43, (1 << 23) + 8, 10**30])
def test_qemu_mem_access_size_is_bounded(tmp_path, bits):
    """2^43 bits would be 2^28 page-crossing rows from one line."""
    line = _import(tmp_path, "qemu-mem", QEMU_HEAD + f"0x1000,f,0x2000,,{bits},load,0\n")
    assert "column access_size: expected a positive number of bits" in line


# --------------------------------------------------------------------------- generate, costs
@pytest.mark.parametrize("seed", ["-1", "-99999999999999999999"])
def test_generate_refuses_negative_seeds(tmp_path, seed):
    line = one_error(
        tmp_path, "trace", "generate", "random", "-n", "10", "--seed", seed, "-o", "g.parquet"
    )
    assert "--seed" in line
    from altp2m_replay import generate
    from altp2m_replay.errors import TraceError

    with pytest.raises(TraceError, match="--seed must be a non-negative integer"):
        generate.generate("random", 10, seed=-1, output=tmp_path / "g.parquet")


@pytest.mark.parametrize(
    "cost",
    [
        "ept_exit=1e308",
        "mmio=1e16",
        "ept_exit=inf",
        "ept_exit=nan",
        "cpu_ghz=1e-9",
        "ept_exit=1e999",
    ],
)
def test_costs_whose_totals_could_overflow_are_refused(tmp_path, cost):
    small_trace(tmp_path / "t.parquet")
    line = one_error(tmp_path, "replay", "t.parquet", "-p", "baseline", "-o", "out", "--cost", cost)
    assert line.startswith("Error: --cost: ") and "must be a number in" in line


def test_the_largest_costs_allowed_total_to_finite_numbers(tmp_path):
    """Every cost at its maximum and counters at their largest: all totals finite."""
    from altp2m_replay.costs import COSTS, MAX_COST, MIN_GHZ, cycles

    counters = {c: (1 << 63) - 1 for _, charged in COSTS.values() for c in charged}
    costs = dict.fromkeys(COSTS, MAX_COST)
    total = cycles(counters, costs)["cycles_total"]
    assert np.isfinite(total) and np.isfinite(total / (MIN_GHZ * 1e3))


def test_report_and_compare_refuse_infinite_numbers_in_tables(tmp_path):
    """Tables written before the bounds (or by hand) may hold inf: one Error line naming
    the file, row and column, not a crash."""
    import polars as pl

    from altp2m_replay import run

    small_trace(tmp_path / "t.parquet")
    run.replay([tmp_path / "t.parquet"], ["baseline"], tmp_path / "a", jobs=1, html=False)
    summary = pl.read_parquet(tmp_path / "a" / "summary.parquet")
    summary.with_columns(pl.lit(float("inf")).alias("cycles_total")).write_parquet(
        tmp_path / "a" / "summary.parquet"
    )
    # re-sign the edited table in the manifest, so the folder still passes as one run's set
    # and the check on values is the one that answers
    import hashlib
    import json

    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest["files"]["summary.parquet"] = hashlib.sha256(
        (tmp_path / "a" / "summary.parquet").read_bytes()
    ).hexdigest()
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    for args in (("report", "a"), ("compare", "a", "a")):
        line = one_error(tmp_path, *args)
        assert (
            'summary.parquet: row 0, column "cycles_total": expected a finite number, found inf'
            in line
        )


@pytest.mark.parametrize(
    "doc", ["[" * 100_000 + "]" * 100_000, '{"cells": ' + '{"a": ' * 50_000 + "1" + "}" * 50_001]
)
def test_report_refuses_a_manifest_nested_thousands_deep(tmp_path, doc):
    from altp2m_replay import run

    small_trace(tmp_path / "t.parquet")
    run.replay([tmp_path / "t.parquet"], ["baseline"], tmp_path / "a", jobs=1, html=False)
    (tmp_path / "a" / "manifest.json").write_text(doc, encoding="utf-8")
    assert "manifest.json: not readable JSON (arrays or objects nested too deeply)" in one_error(
        tmp_path, "report", "a"
    )
