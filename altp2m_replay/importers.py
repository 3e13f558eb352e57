"""``trace import``: convert Valgrind lackey logs, QEMU ``mem`` plugin CSV and plain CSV into
trace Parquet (SPEC §2). Inputs are read line by line and written in chunks, so memory stays
bounded; a malformed line stops the import with no output file left behind.

Decisions the SPEC leaves open (also in traces/README.md):

* lackey: vcpu is always 0 (lackey does not tag threads); ``ip`` is the address of the
  current ``I`` line; an access that crosses page boundaries becomes one row per page, the
  later rows starting at their page's first byte. ``gfn_sets`` gets ``code``: the gfns of
  the pages instructions were fetched from.
* qemu-mem: the plugin logs data accesses only (no fetch rows). ``mem_hwaddr`` is the gpa
  when present and non-zero (user-mode QEMU prints 0); otherwise ``mem_vaddr`` goes through
  the first-touch allocator and page-crossing accesses are split as for lackey. Instruction
  grouping: a store directly after a load with the same ``insn_vaddr`` completes that
  load's instruction (read-modify-write, push/pop of memory, one ``movs`` iteration); every
  other row starts a new instruction, so a loop that re-runs one memory instruction gives
  one instruction per execution. Plugin summary lines at the end are skipped.
* csv: header required; unknown columns are ignored; numbers are decimal or 0x-hex; with an
  ``op`` column, control rows (op 1-4) take access 0, and ``ram`` ends at the highest gfn of
  access and op 3/4 rows.
* qemu-capture: the binary records of the project's TCG plugin (capture/FORMAT.md), raw or
  zstd-compressed (decompressed by the ``zstd`` program as it is read). Rows get ``gpa``,
  ``access``, ``vcpu``, ``insn`` (per vCPU, one per instruction record) and ``ip``; a fetch
  that crosses a page is two rows of one instruction, a data access that crosses a page
  two rows. ``gfn_sets`` gets ``user_code`` (pages fetched with a user-half ``ip``) and
  ``kernel_code_executed``; ``trace capture`` adds what it learns from the guest.
"""

from __future__ import annotations

import csv
import gzip
import shutil
import subprocess
import zlib
from array import array
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numba
import numpy as np

from altp2m_replay.errors import ImportFormatError, did_you_mean, first_line
from altp2m_replay.ranges import gfns_to_ranges, merge_ranges
from altp2m_replay.schema import GFN_LIMIT, GPA_LIMIT, VCPU_LIMIT
from altp2m_replay.traces import TraceWriter

FORMATS = ("lackey", "qemu-mem", "csv", "qemu-capture")
FLUSH_ROWS = 1 << 20  # rows buffered before a chunk goes to the writer
MAX_LINE = 1 << 20  # characters in one input line
MAX_ACCESS_BYTES = 1 << 20  # one access spans at most 256 pages (lackey SIZE, qemu access_size)
_TYPECODE = {
    "gpa": "Q",
    "gfn": "Q",
    "access": "B",
    "vcpu": "H",
    "insn": "Q",
    "gla": "Q",
    "ip": "Q",
    "tsc": "Q",
    "op": "B",
    "arg": "Q",
}
_DTYPE = {"Q": np.uint64, "B": np.uint8, "H": np.uint16}
_U64_MAX = (1 << 64) - 1


class _Rows:
    """Column buffers (``array.array``, cheap appends) flushed to a TraceWriter in chunks."""

    def __init__(self, writer: TraceWriter, columns: list[str]):
        self.writer = writer
        self.columns = columns
        self.bufs = {c: array(_TYPECODE[c]) for c in columns}
        self.count = 0

    def flush(self) -> None:
        if len(self.bufs[self.columns[0]]):
            self.writer.write(
                {
                    c: np.frombuffer(b, dtype=_DTYPE[b.typecode])
                    if len(b)
                    else np.empty(0, _DTYPE[b.typecode])
                    for c, b in self.bufs.items()
                }
            )
            self.bufs = {c: array(_TYPECODE[c]) for c in self.columns}

    def maybe_flush(self) -> None:
        if len(self.bufs[self.columns[0]]) >= FLUSH_ROWS:
            self.flush()


class _FirstTouch:
    """Deterministic first-touch page allocator: virtual page -> base_gfn, base_gfn + 1, ..."""

    def __init__(self, base_gfn: int, label: str):
        self.base = base_gfn
        self.pages: dict[int, int] = {}
        self.label = label

    def gfn(self, vpage: int, lineno: int) -> int:
        g = self.pages.get(vpage)
        if g is None:
            g = self.base + len(self.pages)
            if g >= GFN_LIMIT:
                raise ImportFormatError(
                    f"{self.label}: line {lineno}: more virtual pages than "
                    f"gfns below 2^36 starting at --base-gfn {self.base:#x}"
                )
            self.pages[vpage] = g
        return g

    def ram(self) -> list[list[int]]:
        return [[self.base, self.base + len(self.pages) - 1]] if self.pages else []


def _open_text(path: Path):
    # surrogateescape: undecodable bytes become a "malformed line" error, not a traceback;
    # utf-8-sig: a byte-order mark (spreadsheets write one) is not part of the first name
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="")
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")


def _lines(fh, label: str):
    """The lines of ``fh``, each at most MAX_LINE characters: a file without line breaks
    must not be read into memory whole."""
    lineno = 0
    while line := fh.readline(MAX_LINE + 1):
        lineno += 1
        if len(line) > MAX_LINE:
            raise ImportFormatError(f"{label}: line {lineno}: longer than {MAX_LINE:,} characters")
        yield line


def _show(line: str) -> str:
    text = line.rstrip("\r\n")
    return repr(text[:60] + ("..." if len(text) > 60 else ""))


def import_trace(fmt: str, input_path, output, base_gfn: int = 0x1000) -> int:
    """Convert ``input_path`` in ``fmt`` (lackey, qemu-mem, csv) to a trace at ``output``;
    return the number of rows written."""
    if fmt not in FORMATS:
        raise ImportFormatError(
            f'unknown import format "{fmt}"{did_you_mean(fmt, FORMATS)}; '
            f"expected one of {', '.join(FORMATS)}"
        )
    src = Path(input_path)
    label = str(input_path)
    if not src.is_file():
        raise ImportFormatError(
            f"{label}: no such file" if not src.exists() else f"{label}: not a file"
        )
    if not 0 <= base_gfn < GFN_LIMIT:
        raise ImportFormatError(f"--base-gfn must be in 0..2^36-1, found {base_gfn}")
    if fmt == "qemu-capture":
        return import_qemu_capture(src, output)
    meta = {"format": 1, "source": f"import {fmt} {src.name}", "vcpus": 1}
    parse = {"lackey": _lackey, "qemu-mem": _qemu_mem, "csv": _csv}[fmt]
    with TraceWriter(output, meta=meta) as writer:
        try:
            with _open_text(src) as fh:
                rows = parse(fh, label, writer, base_gfn)
        except (OSError, EOFError, zlib.error) as exc:  # unreadable file, broken gzip stream
            raise ImportFormatError(f"{label}: cannot read: {first_line(exc)}") from None
        if rows == 0:
            raise ImportFormatError(f"{label}: no memory accesses found, expected at least one")
    return rows


# --------------------------------------------------------------------------- lackey
_LACKEY_KIND = {"L": 1, "S": 2, "M": 3}
_LACKEY_HELP = 'expected "I  ADDR,SIZE", " L|S|M ADDR,SIZE" or "==PID== ..."'


def _lackey(fh, label: str, writer: TraceWriter, base_gfn: int) -> int:
    alloc = _FirstTouch(base_gfn, label)
    out = _Rows(writer, ["gpa", "access", "insn", "gla", "ip"])
    code_gfns: set[int] = set()
    insn = -1
    ip = 0
    rows = 0
    for lineno, line in enumerate(_lines(fh, label), 1):
        # ==PID== is lackey's own output; --PID-- and **PID** are valgrind core messages.
        if not line.strip() or line[:2] in ("==", "--", "**"):
            continue
        head = line[:3]
        if head[0] == "I":
            access, rest = 4, line[1:]
        elif head[0] == " " and len(head) == 3 and head[2] == " " and head[1] in _LACKEY_KIND:
            access, rest = _LACKEY_KIND[head[1]], line[3:]
        else:
            raise ImportFormatError(f"{label}: line {lineno}: {_LACKEY_HELP}, found {_show(line)}")
        try:
            addr_s, size_s = rest.strip().split(",")
            addr, size = int(addr_s, 16), int(size_s, 10)
        except ValueError:
            raise ImportFormatError(
                f"{label}: line {lineno}: {_LACKEY_HELP} with ADDR in hex "
                f"and SIZE in decimal, found {_show(line)}"
            ) from None
        if (
            not (0 <= addr <= _U64_MAX and 0 <= size <= MAX_ACCESS_BYTES)
            or addr + max(size, 1) - 1 > _U64_MAX
        ):
            raise ImportFormatError(
                f"{label}: line {lineno}: address or size out of range, found {_show(line)}"
            )
        if access == 4:
            insn += 1
            ip = addr
        elif insn < 0:
            insn = 0  # data before any fetch: an instruction without a fetch row
        b = out.bufs
        vpage, last = addr >> 12, (addr + max(size, 1) - 1) >> 12
        gla = addr
        while True:
            gfn = alloc.gfn(vpage, lineno)
            if access == 4:
                code_gfns.add(gfn)
            b["gpa"].append((gfn << 12) | (gla & 0xFFF))
            b["access"].append(access)
            b["insn"].append(insn)
            b["gla"].append(gla)
            b["ip"].append(ip)
            rows += 1
            if vpage == last:
                break
            vpage += 1
            gla = vpage << 12
        out.maybe_flush()
    out.flush()
    writer.meta["ram"] = alloc.ram()
    writer.meta["gfn_sets"] = {"code": gfns_to_ranges(np.fromiter(code_gfns, np.int64)).tolist()}
    return rows


# --------------------------------------------------------------------------- qemu-mem
_QEMU_HEADER = "insn_vaddr,insn_symbol,mem_vaddr,mem_hwaddr,access_size,access_type,mem_value"
_QEMU_SUMMARY = ("mem accesses:", "io accesses:", "Warning:")


def _qemu_mem(fh, label: str, writer: TraceWriter, base_gfn: int) -> int:
    alloc = _FirstTouch(base_gfn, label)
    out = _Rows(writer, ["gpa", "access", "insn", "gla", "ip"])
    header_seen = False
    insn = -1
    prev_ip, prev_kind = None, 0  # prev_kind: 1 load that may be completed by a store
    rows = 0
    max_hw_gfn = -1
    for lineno, line in enumerate(_lines(fh, label), 1):
        text = line.strip()
        if not text:
            continue
        if not header_seen:
            if text.replace(" ", "") != _QEMU_HEADER:
                raise ImportFormatError(
                    f'{label}: line {lineno}: expected the header "{_QEMU_HEADER}", '
                    f"found {_show(line)}"
                )
            header_seen = True
            continue
        if text == _QEMU_HEADER or text.startswith(_QEMU_SUMMARY):
            continue
        if text.startswith("Region Base"):
            break  # region summary printed at exit: no more accesses follow
        fields = text.split(",")
        if len(fields) < 7:
            raise ImportFormatError(
                f"{label}: line {lineno}: expected 7 comma-separated fields "
                f"({_QEMU_HEADER}), found {len(fields)}: {_show(line)}"
            )
        # The symbol may itself contain commas (C++): count the fixed fields from both ends.
        insn_s = fields[0]
        vaddr_s, hw_s, size_s, kind_s = fields[-5:-1]
        where = f"{label}: line {lineno}"
        ip = _qemu_int(insn_s, 16, "insn_vaddr", where)
        vaddr = _qemu_int(vaddr_s, 16, "mem_vaddr", where)
        hw = _qemu_int(hw_s, 16, "mem_hwaddr", where) if hw_s.strip() else 0
        bits = _qemu_int(size_s, 10, "access_size", where)
        kind = kind_s.strip()
        if kind not in ("load", "store"):
            raise ImportFormatError(
                f'{label}: line {lineno}: access_type must be "load" or "store", found {kind!r}'
            )
        if bits <= 0 or bits % 8 or bits > 8 * MAX_ACCESS_BYTES:
            raise ImportFormatError(
                f"{where}: column access_size: expected a positive number of bits "
                f"divisible by 8, at most {8 * MAX_ACCESS_BYTES:,}, found {bits}"
            )
        for name, value, top in (
            ("insn_vaddr", ip, _U64_MAX),
            ("mem_vaddr", vaddr, _U64_MAX),
            ("mem_hwaddr", hw, GPA_LIMIT - 1),
        ):
            if value > top:
                raise ImportFormatError(
                    f"{where}: column {name}: expected an address below "
                    f"2^{top.bit_length()}, found {value:#x}"
                )
        access = 2 if kind == "store" else 1
        if not (access == 2 and prev_kind == 1 and ip == prev_ip):
            insn += 1
        prev_ip, prev_kind = ip, (1 if access == 1 else 0)
        b = out.bufs
        if hw:
            gpas = [(hw, vaddr)]
            max_hw_gfn = max(max_hw_gfn, hw >> 12)
        else:
            size = bits // 8
            vpage, last = vaddr >> 12, min(vaddr + size - 1, _U64_MAX) >> 12
            gpas = []
            gla = vaddr
            while True:
                gpas.append(((alloc.gfn(vpage, lineno) << 12) | (gla & 0xFFF), gla))
                if vpage == last:
                    break
                vpage += 1
                gla = vpage << 12
        for gpa, gla in gpas:
            b["gpa"].append(gpa)
            b["access"].append(access)
            b["insn"].append(insn)
            b["gla"].append(gla)
            b["ip"].append(ip)
            rows += 1
        out.maybe_flush()
    if not header_seen:
        raise ImportFormatError(
            f'{label}: line 1: expected the header "{_QEMU_HEADER}", found an empty file'
        )
    out.flush()
    ram = alloc.ram() + ([[0, max_hw_gfn]] if max_hw_gfn >= 0 else [])
    writer.meta["ram"] = merge_ranges(ram).tolist()
    return rows


def _qemu_int(text: str, base: int, column: str, where: str) -> int:
    """A non-negative integer field of the qemu-mem CSV, or an error naming its column."""
    s = text.strip()
    try:
        if s[:1] in "+-" or (s[:2].lower() == "0x" and base == 10):
            raise ValueError
        return int(s, base)
    except ValueError:
        kind = "hex" if base == 16 else "decimal"
        raise ImportFormatError(
            f"{where}: column {column}: expected a {kind} {column}, found {s[:40]!r}"
        ) from None


# --------------------------------------------------------------------------- csv
_CSV_LIMITS = {
    "gpa": (GPA_LIMIT - 1, "a guest-physical address below 2^48"),
    "gfn": (GFN_LIMIT - 1, "a gfn below 2^36"),
    "vcpu": (VCPU_LIMIT - 1, "a vCPU number in 0..4095"),
    "op": (4, "an op in 0..4 (0 = access, 1-4 = control rows)"),
}


def _parse_access(s: str) -> int | None:
    """'1'..'7' or letters r/w/x in any order without repeats -> mask; None if neither."""
    if s.isdigit():
        v = int(s)
        return v if 1 <= v <= 7 else None
    letters = s.lower()
    if not letters or len(set(letters)) != len(letters) or not set(letters) <= {"r", "w", "x"}:
        return None
    return ("r" in letters) * 1 | ("w" in letters) * 2 | ("x" in letters) * 4


def _parse_uint(s: str) -> int:
    s = s.strip()
    v = int(s[2:], 16) if s[:2].lower() == "0x" else int(s, 10)
    if v < 0 or s[:1] in "+-":
        raise ValueError
    return v


class _CsvRows:
    """A csv.reader whose errors (a field over the csv module's limit, a NUL) name the line."""

    def __init__(self, reader, label: str):
        self.reader, self.label = reader, label

    @property
    def line_num(self) -> int:
        return self.reader.line_num

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.reader)
        except csv.Error as exc:
            raise ImportFormatError(f"{self.label}: line {self.reader.line_num}: {exc}") from None


def _csv(fh, label: str, writer: TraceWriter, base_gfn: int) -> int:
    del base_gfn  # addresses come from the file
    reader = _CsvRows(csv.reader(_lines(fh, label)), label)
    header = None
    for fields in reader:
        if fields and any(f.strip() for f in fields):
            header = [f.strip().lower() for f in fields]
            break
    if header is None:
        raise ImportFormatError(
            f"{label}: line 1: expected a header naming the columns "
            f"(gpa or gfn, access, ...), found an empty file"
        )
    hl = reader.line_num
    dup = {c for c in header if header.count(c) > 1 and c}
    if dup:
        raise ImportFormatError(
            f'{label}: line {hl}: column "{sorted(dup)[0]}" appears twice in the header'
        )
    if ("gpa" in header) == ("gfn" in header):
        found = "both" if "gpa" in header else "neither"
        raise ImportFormatError(
            f'{label}: line {hl}: expected exactly one of the columns "gpa" and "gfn", '
            f"found {found}"
        )
    if "access" not in header:
        raise ImportFormatError(
            f'{label}: line {hl}: expected an "access" column in the header, '
            f"found {', '.join(header)}"
        )
    cols = [c for c in _TYPECODE if c in header]
    idx = [(c, header.index(c)) for c in cols]
    out = _Rows(writer, cols)
    width = len(header)
    rows = 0
    max_gfn = 0
    addr = "gpa" if "gpa" in header else "gfn"
    has_op = "op" in header
    for fields in reader:
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue
        lineno = reader.line_num
        if len(fields) != width:
            raise ImportFormatError(
                f"{label}: line {lineno}: expected {width} fields as in the header, "
                f"found {len(fields)}"
            )
        b = out.bufs
        for c, i in idx:
            s = fields[i].strip()
            if c == "access":
                v = 0 if has_op and s == "0" else _parse_access(s)  # 0: control rows, checked below
                if v is None:
                    raise ImportFormatError(
                        f'{label}: line {lineno}: column "access": expected 1..7 or '
                        f"letters r, w, x (e.g. rw), found {s!r}"
                    )
            else:
                try:
                    v = _parse_uint(s)
                except ValueError:
                    raise ImportFormatError(
                        f'{label}: line {lineno}: column "{c}": expected a non-negative '
                        f"integer (decimal or 0x-hex), found {s!r}"
                    ) from None
                hi, what = _CSV_LIMITS.get(c, (_U64_MAX, "a value below 2^64"))
                if v > hi:
                    raise ImportFormatError(
                        f'{label}: line {lineno}: column "{c}": expected {what}, found {s}'
                    )
            b[c].append(v)
        op = b["op"][-1] if has_op else 0
        if op and b["access"][-1]:
            s = fields[header.index("access")].strip()
            raise ImportFormatError(
                f'{label}: line {lineno}: column "access": expected 0 on a control row '
                f"(op {op}), found {s!r}"
            )
        if not op and not b["access"][-1]:
            raise ImportFormatError(
                f'{label}: line {lineno}: column "access": expected 1..7 or letters r, w, x '
                f"on an access row (op 0), found '0'"
            )
        g = b[addr][-1] >> (12 if addr == "gpa" else 0)
        if g > max_gfn and op not in (1, 2):  # the address of op 1/2 rows is ignored (SPEC §2)
            max_gfn = g
        rows += 1
        out.maybe_flush()
    out.flush()
    writer.meta["ram"] = [[0, max_gfn]]
    writer.meta.pop("vcpus")  # unknown: the CSV's vcpu column says what it says
    return rows


# --------------------------------------------------------------------------- qemu-capture
CAPTURE_MAGIC = b"A2MCAPT1"
CAPTURE_VERSION = 1
CAPTURE_HEADER_WORDS = 4  # magic, version, vCPUs, row limit
REC_FETCH, REC_FETCH_TAIL, REC_READ, REC_WRITE, REC_INSN, REC_END = 1, 2, 3, 4, 5, 14
END_WORDS = 6  # the END word, then records, unresolved fetches / data / fetch tails, reason
END_REASONS = {1: "stop marker", 2: "row limit", 3: "QEMU exit"}
USER_TOP = 1 << 47  # ip below: user half of the x86-64 address space
_CHUNK_WORDS = 1 << 20
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@numba.njit(cache=True, nogil=True)
def _decode_capture(
    words, gpa, acc, vcp, insn, ip, cur_insn, cur_ip, user_pages, kern_pages, sym_addr, sym_hit
):
    """Decode whole records of ``words`` into rows. Returns (words used, rows, records,
    status, detail): status 0 = needs more words, 1 = END record at the words used,
    2 = unknown record type (detail: the type), 3 = an access before any instruction of
    its vCPU (detail: the vCPU)."""
    n = words.shape[0]
    i = 0
    r = 0
    recs = 0
    nsym = sym_addr.shape[0]
    while i < n:
        w = words[i]
        t = w >> np.uint64(60)
        v = (w >> np.uint64(48)) & np.uint64(0xFFF)
        a = w & np.uint64(0xFFFFFFFFFFFF)
        if t in (REC_FETCH, REC_INSN):
            if i + 1 >= n:
                return i, r, recs, 0, 0
            cur_insn[v] += 1
            cur_ip[v] = words[i + 1]
            if t == REC_FETCH:
                gpa[r] = a
                acc[r] = 4
                vcp[r] = v
                insn[r] = cur_insn[v]
                ip[r] = cur_ip[v]
                r += 1
                g = a >> np.uint64(12)
                if g < user_pages.shape[0]:
                    if cur_ip[v] < USER_TOP:
                        user_pages[g] = 1
                    else:
                        kern_pages[g] = 1
                if nsym and sym_addr[0] <= cur_ip[v] <= sym_addr[nsym - 1]:
                    k = np.searchsorted(sym_addr, cur_ip[v])
                    if sym_addr[k] == cur_ip[v]:
                        sym_hit[k] = 1
            i += 2
        elif t in (REC_FETCH_TAIL, REC_READ, REC_WRITE):
            if cur_insn[v] < 0:
                return i, r, recs, 3, v
            gpa[r] = a
            acc[r] = 4 if t == REC_FETCH_TAIL else (1 if t == REC_READ else 2)
            vcp[r] = v
            insn[r] = cur_insn[v]
            ip[r] = cur_ip[v]
            r += 1
            if t == REC_FETCH_TAIL:
                g = a >> np.uint64(12)
                if g < user_pages.shape[0]:
                    if cur_ip[v] < USER_TOP:
                        user_pages[g] = 1
                    else:
                        kern_pages[g] = 1
            i += 1
        elif t == REC_END:
            return i, r, recs, 1, 0
        else:
            return i, r, recs, 2, t
        recs += 1
    return i, r, recs, 0, 0


class _CaptureStream:
    """The bytes of a capture file: read directly, or through ``zstd -dc`` when compressed."""

    def __init__(self, path: Path, label: str):
        self.label = label
        self.proc = None
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head == _ZSTD_MAGIC:
            if shutil.which("zstd") is None:
                raise ImportFormatError(
                    f"{label}: the file is zstd-compressed and the zstd program "
                    f"is not installed (apt-get install zstd)"
                )
            self.proc = subprocess.Popen(
                ["zstd", "-dcq", "--", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            self.fh = self.proc.stdout
        else:
            self.fh = open(path, "rb")  # noqa: SIM115 - closed in close()

    def read(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            b = self.fh.read(n - got)
            if not b:
                break
            parts.append(b)
            got += len(b)
        return b"".join(parts)

    def close(self) -> None:
        """Close; a failed decompression becomes an error naming the file."""
        self.fh.close()
        if self.proc is not None:
            err = self.proc.stderr.read().decode(errors="replace").strip()
            self.proc.stderr.close()
            if self.proc.wait() != 0:
                raise ImportFormatError(
                    f"{self.label}: zstd cannot decompress it: "
                    f"{err.splitlines()[-1] if err else 'exit code ' + str(self.proc.returncode)}"
                )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.fh.close()


def _capture_header(stream: _CaptureStream, label: str) -> int:
    head = stream.read(8 * CAPTURE_HEADER_WORDS)
    if len(head) < 8 * CAPTURE_HEADER_WORDS or head[:8] != CAPTURE_MAGIC:
        found = "an empty file" if not head else repr(head[:8])
        raise ImportFormatError(
            f"{label}: byte 0: expected a qemu-capture header starting "
            f"{CAPTURE_MAGIC.decode()!r} (32 bytes), found {found}"
        )
    version, vcpus = np.frombuffer(head[8:24], dtype="<u8")
    if version != CAPTURE_VERSION:
        raise ImportFormatError(
            f"{label}: byte 8: expected format version {CAPTURE_VERSION}, found {int(version)}"
        )
    if not 1 <= vcpus <= VCPU_LIMIT:
        raise ImportFormatError(
            f"{label}: byte 16: expected a vCPU count in 1..{VCPU_LIMIT}, found {int(vcpus)}"
        )
    return int(vcpus)


def import_qemu_capture(
    input_path,
    output,
    symbols: dict[str, int] | None = None,
    meta: dict | None = None,
    ram_pages: int = 1 << 20,
    progress=None,
) -> int:
    """Convert a qemu-capture record stream (raw or zstd) to a trace at ``output``; return
    the number of rows. ``symbols`` (name -> virtual address) are kept in the metadata when
    the trace executes their address; ``meta`` entries are added to the metadata (its
    ``gfn_sets`` merged); page sets cover gfns below ``ram_pages``."""
    src = Path(input_path)
    label = str(input_path)
    if not src.is_file():
        raise ImportFormatError(
            f"{label}: no such file" if not src.exists() else f"{label}: not a file"
        )
    names = sorted(symbols or {}, key=lambda k: (symbols[k], k))
    sym_addr = np.array([symbols[k] for k in names], dtype=np.uint64)
    sym_hit = np.zeros(len(names), dtype=np.uint8)
    user_pages = np.zeros(ram_pages, dtype=np.uint8)
    kern_pages = np.zeros(ram_pages, dtype=np.uint8)
    cur_insn = np.full(VCPU_LIMIT, -1, dtype=np.int64)
    cur_ip = np.zeros(VCPU_LIMIT, dtype=np.uint64)
    kinds = {
        "gpa": np.uint64,
        "access": np.uint8,
        "vcpu": np.uint16,
        "insn": np.int64,
        "ip": np.uint64,
    }
    stream = _CaptureStream(src, label)
    rows = records = 0
    offset = 8 * CAPTURE_HEADER_WORDS  # byte offset of the next undecoded record
    end = None
    writing = None
    pool = ThreadPoolExecutor(1)
    try:
        header_vcpus = _capture_header(stream, label)
        info = {"format": 1, "source": f"import qemu-capture {src.name}", "vcpus": header_vcpus}
        with TraceWriter(output, meta=info) as writer:
            pending = b""
            while end is None:
                data = pending + stream.read(8 * _CHUNK_WORDS - len(pending))
                eof = len(data) < 8 * _CHUNK_WORDS
                whole = len(data) // 8 * 8
                words = np.frombuffer(data[:whole], dtype="<u8")
                # fresh arrays per chunk: the writer thread may still hold the previous ones
                bufs = {c: np.empty(len(words), k) for c, k in kinds.items()}
                used, r, recs, status, detail = _decode_capture(
                    words,
                    bufs["gpa"],
                    bufs["access"],
                    bufs["vcpu"],
                    bufs["insn"],
                    bufs["ip"],
                    cur_insn,
                    cur_ip,
                    user_pages,
                    kern_pages,
                    sym_addr,
                    sym_hit,
                )
                if r:
                    chunk = {c: b[:r] for c, b in bufs.items()}
                    chunk["insn"] = chunk["insn"].view(np.uint64)
                    if writing is not None:
                        writing.result()  # one chunk in flight: Parquet encodes while we decode
                    writing = pool.submit(writer.write, chunk)
                    if progress is not None:
                        progress.advance(r)
                rows += r
                records += recs
                where = f"{label}: byte {offset + 8 * used} (record {records + 1})"
                offset += 8 * used
                if status in (2, 3):
                    _drain(writing)
                if status == 2:
                    raise ImportFormatError(
                        f"{where}: expected a record type 1-5 or 14, found {detail}"
                    )
                if status == 3:
                    raise ImportFormatError(
                        f"{where}: expected an instruction record of vCPU {detail} "
                        f"before its first access record, found an access record"
                    )
                if status == 1:
                    tail = data[8 * used :] + stream.read(8 * END_WORDS)
                    if len(tail) < 8 * END_WORDS:
                        raise ImportFormatError(
                            f"{where}: the end record is cut short: expected "
                            f"{8 * END_WORDS} bytes, found {len(tail)}"
                        )
                    end = np.frombuffer(tail[: 8 * END_WORDS], dtype="<u8")
                    if len(tail) > 8 * END_WORDS or stream.read(1):
                        raise ImportFormatError(
                            f"{label}: byte {offset + 8 * END_WORDS}: expected the "
                            f"end of the stream after the end record, found more bytes"
                        )
                    break
                pending = data[8 * used :]
                if eof:
                    _drain(writing)
                    raise ImportFormatError(
                        f"{where}: the stream is truncated: expected "
                        f"{'the rest of a record' if pending else 'another record or the end record (type 14)'}"
                        f", found the end of the file"
                    )
            _drain(writing)
            stream.close()
            if int(end[1]) != rows:
                raise ImportFormatError(
                    f"{where}: the end record counts {int(end[1])} access records, found {rows}"
                )
            if rows == 0:
                raise ImportFormatError(f"{label}: no memory accesses found, expected at least one")
            sets = {
                "user_code": gfns_to_ranges(np.flatnonzero(user_pages)).tolist(),
                "kernel_code_executed": gfns_to_ranges(np.flatnonzero(kern_pages)).tolist(),
            }
            extra = dict(meta or {})
            sets.update(extra.pop("gfn_sets", {}))
            writer.meta.update(extra)
            writer.meta["gfn_sets"] = sets
            writer.meta["capture"] = {
                "end": END_REASONS.get(int(end[5]), f"code {int(end[5])}"),
                "unresolved_fetches": int(end[2]),
                "unresolved_data": int(end[3]),
                "unresolved_fetch_tails": int(end[4]),
            }
            if names:
                writer.meta["symbols"] = {
                    names[k]: int(sym_addr[k]) for k in np.flatnonzero(sym_hit)
                }
    except BaseException:
        stream.kill()
        raise
    finally:
        pool.shutdown(wait=True)
    return rows


def _drain(future) -> None:
    """Wait for a chunk being written (its error, if any, is raised here)."""
    if future is not None:
        future.result()
