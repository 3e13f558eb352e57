"""qemu-capture importer on small hand-written record streams, and the capture command's
error paths (no QEMU needed here; tests/test_capture_e2e.py runs a real guest)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from test_importers import run_error  # one Error: line, exit 2, the paths absent

from altp2m_replay import capture, importers
from altp2m_replay.cli import main

KBASE = 0xFFFFFFFF80000000


# --------------------------------------------------------------------------- stream writer
def word(kind: int, vcpu: int, gpa: int) -> bytes:
    return struct.pack("<Q", (kind << 60) | (vcpu << 48) | gpa)


def header(vcpus: int = 2, limit: int = 0) -> bytes:
    return b"A2MCAPT1" + struct.pack("<QQQ", 1, vcpus, limit)


def fetch(vcpu, gpa, ip):
    return word(1, vcpu, gpa) + struct.pack("<Q", ip)


def tail(vcpu, gpa):
    return word(2, vcpu, gpa)


def read(vcpu, gpa):
    return word(3, vcpu, gpa)


def write(vcpu, gpa):
    return word(4, vcpu, gpa)


def insn(vcpu, ip):  # an instruction whose fetch address was not RAM: no row
    return word(5, vcpu, 0) + struct.pack("<Q", ip)


def end(records, unresolved=(0, 0, 0), reason=1):
    return word(14, 0, 0) + struct.pack("<5Q", records, *unresolved, reason)


# Every record kind. vCPU 0 runs kernel text (nokaslr: gpa = ip - KBASE), vCPU 1 user code.
BODY = [
    fetch(0, 0x1000123, KBASE + 0x1000123),  # row 0: vCPU 0 instruction 0
    read(0, 0x5008),  # row 1: its load
    fetch(1, 0x2FFE, 0x401FFE),  # row 2: vCPU 1 instruction 0, crosses a page ...
    tail(1, 0x7000),  # row 3: ... whose second page is frame 7
    write(1, 0x9FFC),  # row 4: a store that crosses a page ...
    write(1, 0xA000),  # row 5: ... two rows of the same instruction
    insn(0, 0xFFFFFFFFFFF00000),  # no row: vCPU 0 instruction 1 (ROM)
    read(0, 0xFEE00030),  # row 6: its MMIO read (local APIC)
    fetch(0, 0x1000130, KBASE + 0x1000130),  # row 7: vCPU 0 instruction 2
]
ROWS = [  # (gpa, access, vcpu, insn, ip)
    (0x1000123, 4, 0, 0, KBASE + 0x1000123),
    (0x5008, 1, 0, 0, KBASE + 0x1000123),
    (0x2FFE, 4, 1, 0, 0x401FFE),
    (0x7000, 4, 1, 0, 0x401FFE),
    (0x9FFC, 2, 1, 0, 0x401FFE),
    (0xA000, 2, 1, 0, 0x401FFE),
    (0xFEE00030, 1, 0, 1, 0xFFFFFFFFFFF00000),
    (0x1000130, 4, 0, 2, KBASE + 0x1000130),
]


N_ROWS = len(ROWS)


def stream(body=BODY, records=N_ROWS, **kw) -> bytes:
    return header() + b"".join(body) + end(records, **kw)


def rows_of(path):
    t = pq.read_table(path)
    return list(
        zip(
            *(t.column(c).to_pylist() for c in ("gpa", "access", "vcpu", "insn", "ip")), strict=True
        )
    )


def meta_of(path):
    return json.loads(pq.read_metadata(path).metadata[b"altp2m_replay"])


def need(tool: str) -> None:
    """Skip when a tool is missing locally; in CI (CI=true) that is a failure."""
    if shutil.which(tool) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is missing in CI: .ci/run installs it")
        pytest.skip(f"{tool} is not installed")


# --------------------------------------------------------------------------- importer
def test_every_record_kind_gives_the_hand_derived_rows(tmp_path):
    src = tmp_path / "cap.bin"
    src.write_bytes(stream())
    out = tmp_path / "cap.parquet"
    symbols = {"entry_a": KBASE + 0x1000123, "never_run": KBASE + 0x1000200}
    n = importers.import_qemu_capture(src, out, symbols=symbols, meta={"gfn_sets": {"x": [[1, 2]]}})
    assert n == len(ROWS)
    assert rows_of(out) == ROWS
    meta = meta_of(out)
    assert meta["vcpus"] == 2  # from the header
    # user fetches (ip below 2^47) touched frames 2 and 7; kernel fetches frame 0x1000
    assert meta["gfn_sets"]["user_code"] == [[2, 2], [7, 7]]
    assert meta["gfn_sets"]["kernel_code_executed"] == [[0x1000, 0x1000]]
    assert meta["gfn_sets"]["x"] == [[1, 2]]
    assert meta["symbols"] == {"entry_a": KBASE + 0x1000123}  # only executed addresses
    assert meta["capture"]["end"] == "stop marker"


def test_cli_import_and_validate(tmp_path):
    src = tmp_path / "cap.bin"
    src.write_bytes(stream())
    out = tmp_path / "cap.parquet"
    r = CliRunner().invoke(main, ["trace", "import", "qemu-capture", str(src), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "8 rows" in r.output
    r = CliRunner().invoke(main, ["trace", "validate", str(out)])
    assert r.exit_code == 0, r.output


def test_zstd_stream_gives_the_same_rows(tmp_path):
    need("zstd")
    raw = tmp_path / "cap.bin"
    raw.write_bytes(stream())
    subprocess.run(["zstd", "-q", "-f", str(raw), "-o", str(tmp_path / "cap.zst")], check=True)
    out = tmp_path / "z.parquet"
    importers.import_qemu_capture(tmp_path / "cap.zst", out)
    assert rows_of(out) == ROWS


def test_chunk_boundaries_do_not_change_rows(tmp_path, monkeypatch):
    # 3-word chunks split fetch records (two words) across reads
    monkeypatch.setattr(importers, "_CHUNK_WORDS", 3)
    src = tmp_path / "cap.bin"
    src.write_bytes(stream())
    out = tmp_path / "c.parquet"
    importers.import_qemu_capture(src, out)
    assert rows_of(out) == ROWS


def import_error(tmp_path, data: bytes) -> str:
    src = tmp_path / "bad.bin"
    src.write_bytes(data)
    out = tmp_path / "bad.parquet"
    msg = run_error(["trace", "import", "qemu-capture", src, "-o", out], out)
    assert [p.name for p in tmp_path.iterdir()] == ["bad.bin"]  # no temp file left either
    return msg


@pytest.mark.parametrize("cut", [4, 8 + 4])
def test_truncated_inside_a_record(tmp_path, cut):
    # header (32 bytes) + first fetch (16 bytes) + read (8): cut inside the second fetch record
    data = header() + b"".join(BODY[:3])[: 24 + cut]
    msg = import_error(tmp_path, data)
    assert "bad.bin: byte 56 (record 3)" in msg
    assert "truncated" in msg and "rest of a record" in msg


def test_missing_end_record(tmp_path):
    msg = import_error(tmp_path, header() + b"".join(BODY))
    assert f"byte {32 + 8 * 13} (record 10)" in msg  # 9 records: 3 fetches and 1 insn of 2 words
    assert "the end record (type 14)" in msg


def test_cut_end_record(tmp_path):
    msg = import_error(tmp_path, stream()[:-8])
    assert "end record is cut short" in msg and "expected 48 bytes, found 40" in msg


def test_unknown_record_type(tmp_path):
    msg = import_error(tmp_path, stream(body=[*BODY[:2], word(9, 0, 0), *BODY[2:]]))
    assert "byte 56 (record 3)" in msg and "expected a record type 1-5 or 14, found 9" in msg


def test_access_before_any_instruction(tmp_path):
    msg = import_error(tmp_path, stream(body=[read(1, 0x1000), *BODY]))
    assert "byte 32 (record 1)" in msg and "vCPU 1" in msg


def test_count_mismatch_and_trailing_bytes(tmp_path):
    assert "counts 9 access records, found 8" in import_error(tmp_path, stream(records=9))
    (tmp_path / "bad.bin").unlink()
    assert "expected the end of the stream" in import_error(tmp_path, stream() + b"\0" * 8)


def test_bad_header(tmp_path):
    assert "byte 0: expected a qemu-capture header" in import_error(
        tmp_path, b"A2MCAPT2" + stream()[8:]
    )
    (tmp_path / "bad.bin").unlink()
    assert "found an empty file" in import_error(tmp_path, b"")
    (tmp_path / "bad.bin").unlink()
    bad_version = b"A2MCAPT1" + struct.pack("<QQQ", 7, 2, 0) + b"".join(BODY) + end(8)
    assert "byte 8: expected format version 1, found 7" in import_error(tmp_path, bad_version)


def test_corrupt_zstd_stream(tmp_path):
    need("zstd")
    raw = tmp_path / "cap.bin"
    raw.write_bytes(stream() * 50)
    subprocess.run(["zstd", "-q", "-f", str(raw), "-o", str(tmp_path / "cap.zst")], check=True)
    data = (tmp_path / "cap.zst").read_bytes()
    raw.unlink()
    (tmp_path / "cap.zst").unlink()
    msg = import_error(tmp_path, data[: len(data) // 2])  # a zstd frame cut in half
    assert "bad.bin" in msg


# --------------------------------------------------------------------------- capture command
def test_capture_names_missing_tools(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no qemu, gcc or zstd on PATH
    out = tmp_path / "t.parquet"
    msg = run_error(["trace", "capture", "shell", "-o", out], out)
    assert "qemu-system-x86_64, gcc, zstd not found" in msg
    assert "apt-get install qemu-system-x86 gcc zstd" in msg


def test_capture_refuses_bad_arguments(tmp_path):
    out = tmp_path / "t.parquet"
    msg = run_error(["trace", "capture", "shel", "-o", out], out)
    assert 'unknown workload "shel" (did you mean "shell"?)' in msg
    assert "files, idle, shell" in msg
    assert "--memory must be in 64..3072" in run_error(
        ["trace", "capture", "idle", "--memory", "4096", "-o", out], out
    )
    assert "--vcpus must be in 1..64" in run_error(
        ["trace", "capture", "idle", "--vcpus", "0", "-o", out], out
    )


def test_unsupported_qemu_fails_the_build(tmp_path, monkeypatch):
    need("gcc")
    monkeypatch.setattr(capture, "require_tools", lambda tools: None)
    monkeypatch.setattr(capture, "qemu_version", lambda: (9, 0, "9.0.2"))
    with pytest.raises(capture.CaptureError, match=r"QEMU 9\.0\.2 is not supported"):
        capture.build_plugin(tmp_path)
    # and the C source refuses it by itself
    r = subprocess.run(
        [
            "gcc",
            "-fsyntax-only",
            "-DCAP_QEMU_MAJOR=9",
            "-DCAP_QEMU_MINOR=0",
            str(capture.PLUGIN_SRC),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "unsupported QEMU version" in r.stderr


# --------------------------------------------------------------------------- guest pieces
def test_console_report_and_ram_ranges():
    text = "\n".join(
        [
            "[    0.1] noise",
            "A2M kernel 6.1.0-57-amd64",
            "A2M clocksource tsc",
            "A2M cpus 2",
            "A2M memmap 0x0 0x9fbff System RAM",
            "A2M memmap 0x9fc00 0x9ffff Reserved",
            "A2M memmap 0x100000 0xffdffff System RAM",
            "A2M pt before 10 12",
            "A2M pt after 10 12",
            "A2M pt after 40 40",
            "A2M window 3.5 4.25",
            "A2M done",
        ]
    )
    rep = capture.parse_console(text)
    assert (rep.kernel, rep.clocksource, rep.cpus, rep.done) == ("6.1.0-57-amd64", "tsc", 2, True)
    assert rep.page_tables == {(10, 12), (40, 40)}
    assert rep.window == (3.5, 4.25)
    # whole pages only: 0x9fbff + 1 = 0x9fc00 -> last whole page 0x9e; 0xffdffff -> 0xffdf
    assert capture.ram_ranges(rep.memmap) == [[0, 0x9E], [0x100, 0xFFDF]]


def test_marker_program_and_initramfs():
    elf = capture.marker_elf(capture.MARK_START)
    assert elf[:4] == b"\x7fELF" and elf[4] == 2  # 64-bit
    entry = struct.unpack_from("<Q", elf, 24)[0]
    code = elf[entry - 0x400000 :]
    assert code[:8] == bytes([0x0F, 0x1F, 0x84, 0x00]) + struct.pack("<I", 0x41324D53)
    archive = capture.cpio_newc(
        [("init", 0o100755, b"#!/bin/sh\n"), ("dev/console", 0o020600, b"5:1")]
    )
    assert archive.startswith(b"070701") and len(archive) % 4 == 0
    assert b"init\0" in archive and b"TRAILER!!!\0" in archive
    # the console node: rdevmajor 5, rdevminor 1 (fields 10 and 11 of the second header)
    second = archive.index(b"070701", 6)
    fields = [int(archive[second + 6 + 8 * i : second + 14 + 8 * i], 16) for i in range(13)]
    assert (fields[1], fields[9], fields[10]) == (0o020600, 5, 1)


# --------------------------------------------------------------------------- the bundled corpus
def test_bundled_captures():
    files = sorted((Path(__file__).resolve().parent.parent / "traces").glob("qemu-*.parquet"))
    assert len(files) >= 3
    for f in files:
        meta = meta_of(f)
        t = pq.read_table(f, columns=["gpa", "access", "vcpu", "ip"])
        gfn = t.column("gpa").to_numpy() >> 12
        ram = meta["ram"]
        in_ram = np.zeros(len(gfn), dtype=bool)
        for a, b in ram:
            in_ram |= (gfn >= a) & (gfn <= b)
        # outside RAM only the local APIC's MMIO page, and only data accesses
        assert set(np.unique(gfn[~in_ram]).tolist()) <= {0xFEE00}, f
        assert (t.column("access").to_numpy()[~in_ram] != 4).all()
        assert set(np.unique(t.column("vcpu").to_numpy()).tolist()) == {0, 1}
        assert meta["source"].startswith("qemu-capture:") and "clocksource tsc" in meta["source"]
        assert f.stat().st_size < 3_000_000
