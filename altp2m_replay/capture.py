"""``trace capture``: record a full-system trace of a small Linux guest under QEMU TCG.

The pieces (capture/README.md): the TCG plugin ``capture/altp2m_capture.c``, built with gcc
against the installed QEMU; a guest made from Debian packages alone (the kernel and
``busybox-static`` via ``apt-get download``, an initramfs written here with the init script
and workloads of ``capture/guest/``); a run of QEMU with the plugin writing its records
through a FIFO into ``zstd``; then ``import_qemu_capture`` turns the stream into a trace, with
metadata from the guest (its memory map, page-table pages, clocksource) and the kernel's
``System.map``.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from altp2m_replay.errors import ReplayError
from altp2m_replay.outdir import atomic_write_bytes

CAPTURE_DIR = Path(__file__).resolve().parent.parent / "capture"
PLUGIN_SRC = CAPTURE_DIR / "altp2m_capture.c"
GUEST_SRC = CAPTURE_DIR / "guest"
BUILD_DIR = CAPTURE_DIR / "build"
SUPPORTED_QEMU = ((7, 2),)  # plugin API v1 as Debian 12 ships it; the C file checks it too
KERNEL_TEXT_BASE = 0xFFFFFFFF80000000  # nokaslr: kernel text gpa = vaddr - this
MARK_START, MARK_STOP = 0x41324D53, 0x41324D45  # displacements of the plugin's marker NOPs
MAX_MEMORY_MIB = 3072  # one low RAM block: the pc machine puts RAM above 3.5 GiB at 4 GiB
TOOLS = {"qemu-system-x86_64": "qemu-system-x86", "gcc": "gcc", "zstd": "zstd"}
GUEST_TOOLS = {"apt-get": "apt", "dpkg-deb": "dpkg"}
NOT_RECORDED = (
    "CR3 writes (op 2 control rows) and tsc: QEMU 7.2's plugin API has no register "
    "reads (9.0 added them); hardware page-walk accesses, interrupt delivery, DMA, "
    "port I/O"
)
KERNEL_ARGS = (
    "console=ttyS0 quiet nokaslr clocksource=tsc tsc=reliable panic=-1 "
    "oops=panic random.trust_cpu=on"
)


class CaptureError(ReplayError):
    """A capture cannot run: a missing tool, an unsupported QEMU, a guest that failed."""


def workloads() -> list[str]:
    """Names of the guest workloads (capture/guest/workloads/NAME.sh; _NAME.sh are helpers)."""
    return sorted(
        p.stem for p in (GUEST_SRC / "workloads").glob("*.sh") if not p.stem.startswith("_")
    )


def require_tools(tools: dict[str, str]) -> None:
    """Raise CaptureError naming the Debian packages to install for every missing program."""
    missing = [(t, pkg) for t, pkg in tools.items() if shutil.which(t) is None]
    if missing:
        progs = ", ".join(t for t, _ in missing)
        pkgs = " ".join(dict.fromkeys(pkg for _, pkg in missing))
        raise CaptureError(
            f"{progs} not found: trace capture needs it; install with `apt-get install {pkgs}`"
        )


def _run(cmd: list[str], what: str, cwd=None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise CaptureError(
            f"{what} failed ({' '.join(cmd[:3])} ...): "
            f"{lines[-1] if lines else f'exit code {proc.returncode}'}"
        )
    return proc.stdout


def qemu_version() -> tuple[int, int, str]:
    """(major, minor, full version text) of the installed qemu-system-x86_64."""
    out = _run(["qemu-system-x86_64", "--version"], "qemu-system-x86_64 --version")
    m = re.search(r"version (\d+)\.(\d+)(\S*)", out)
    if not m:
        raise CaptureError(
            f'qemu-system-x86_64 --version: expected "version X.Y", found '
            f"{out.splitlines()[0] if out else 'nothing'!r}"
        )
    return int(m.group(1)), int(m.group(2)), f"{m.group(1)}.{m.group(2)}{m.group(3)}"


def build_plugin(build: Path = BUILD_DIR) -> Path:
    """Compile the plugin for the installed QEMU (rebuilt when the source or QEMU changes)."""
    require_tools({"qemu-system-x86_64": "qemu-system-x86", "gcc": "gcc"})
    major, minor, full = qemu_version()
    if (major, minor) not in SUPPORTED_QEMU:
        raise CaptureError(
            f"QEMU {full} is not supported: the capture plugin is written for "
            f"QEMU 7.2 (plugin API version 1, Debian 12); QEMU 9.0 and later "
            f"changed the API (register reads, insn data) and need a port"
        )
    build.mkdir(parents=True, exist_ok=True)
    so = build / "altp2m_capture.so"
    stamp = build / "altp2m_capture.stamp"
    key = f"{full} {PLUGIN_SRC.stat().st_mtime_ns} {PLUGIN_SRC.stat().st_size}"
    if so.exists() and stamp.exists() and stamp.read_text() == key:
        return so
    tmp = build / f".altp2m_capture.{os.getpid()}.so"
    _run(
        [
            "gcc",
            "-O2",
            "-shared",
            "-fPIC",
            "-fvisibility=hidden",
            "-Wall",
            "-Werror",
            f"-DCAP_QEMU_MAJOR={major}",
            f"-DCAP_QEMU_MINOR={minor}",
            "-o",
            str(tmp),
            str(PLUGIN_SRC),
        ],
        "building the capture plugin",
    )
    os.replace(tmp, so)
    stamp.write_text(key)
    return so


# --------------------------------------------------------------------------- guest
def marker_elf(displacement: int) -> bytes:
    """A minimal static x86-64 ELF executable: the 8-byte marker NOP, then exit(0)."""
    code = (
        bytes([0x0F, 0x1F, 0x84, 0x00])
        + struct.pack("<I", displacement)
        + bytes(
            [
                0xB8,
                0x3C,
                0,
                0,
                0,  # mov eax, 60 (exit)
                0x31,
                0xFF,  # xor edi, edi
                0x0F,
                0x05,
            ]
        )
    )  # syscall
    base, ehsize, phsize = 0x400000, 64, 56
    entry = base + ehsize + phsize
    size = ehsize + phsize + len(code)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr = ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, 0x3E, 1, entry, ehsize, 0, 0, ehsize, phsize, 1, 0, 0, 0
    )
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)
    return ehdr + phdr + code


def cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """An initramfs archive (cpio "newc") of (path, mode, data) entries; a character
    device's data is its b"major:minor"."""
    out = io.BytesIO()

    def pad():
        out.write(b"\0" * (-out.tell() % 4))

    for ino, (path, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], 1):
        rmaj = rmin = 0
        if mode & 0o170000 == 0o020000:
            rmaj, rmin = (int(x) for x in data.split(b":"))
            data = b""
        name = path.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rmaj, rmin, len(name), 0)
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + name)
        pad()
        out.write(data)
        pad()
    return out.getvalue()


@dataclass
class Guest:
    kernel: Path
    initrd: Path
    system_map: Path
    kernel_package: str
    busybox_package: str


def _deb_member(deb: Path, pattern: str) -> tuple[str, bytes]:
    """(name, bytes) of the first file in a .deb's data whose path matches ``pattern``."""
    proc = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True)
    if proc.returncode != 0:
        raise CaptureError(f"{deb.name}: dpkg-deb cannot read it: {proc.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        for m in tar.getmembers():
            if m.isfile() and re.fullmatch(pattern, m.name.lstrip("./")):
                return m.name, tar.extractfile(m).read()
    raise CaptureError(f"{deb.name}: no file matching {pattern}")


def _download(package: str, into: Path) -> Path:
    for old in into.glob(f"{package}_*.deb"):
        old.unlink()
    _run(
        ["apt-get", "download", package],
        f"apt-get download {package} (run apt-get update first if the package is unknown)",
        cwd=into,
    )
    debs = sorted(into.glob(f"{package}_*.deb"))
    if not debs:
        raise CaptureError(f"apt-get download {package}: no .deb appeared in {into}")
    return debs[-1]


def _kernel_package() -> str:
    """linux-image-amd64 is a metapackage: the kernel is in the package it depends on."""
    out = _run(["apt-cache", "depends", "linux-image-amd64"], "apt-cache depends linux-image-amd64")
    m = re.search(r"Depends:\s*(linux-image-\S+-amd64)", out)
    if not m:
        raise CaptureError("apt-cache depends linux-image-amd64: no linux-image-*-amd64 dependency")
    return m.group(1)


def build_guest(build: Path = BUILD_DIR, echo=None) -> Guest:
    """Download the kernel and busybox-static and write the initramfs (once; the initramfs is
    rewritten when the guest scripts change)."""
    build.mkdir(parents=True, exist_ok=True)
    info_path = build / "guest.json"
    kernel, sysmap, initrd = build / "vmlinuz", build / "System.map", build / "initramfs.cpio.gz"
    info = json.loads(info_path.read_text()) if info_path.exists() else None
    if info is None or not kernel.exists() or not (build / "busybox").exists():
        require_tools(GUEST_TOOLS)
        if echo:
            echo("capture: downloading the guest kernel and busybox-static with apt-get download")
        with tempfile.TemporaryDirectory(dir=build) as tmp:
            kdeb = _download(_kernel_package(), Path(tmp))
            bdeb = _download("busybox-static", Path(tmp))
            _, vmlinuz = _deb_member(kdeb, r"boot/vmlinuz-.*")
            _, busybox = _deb_member(bdeb, r"bin/busybox")
            versions = {
                d.name: _run(["dpkg-deb", "-f", str(d), "Package", "Version"], "dpkg-deb -f")
                for d in (kdeb, bdeb)
            }
        kernel.write_bytes(vmlinuz)
        sysmap.unlink(missing_ok=True)
        (build / "busybox").write_bytes(busybox)
        info = {
            k: " ".join(line.split(": ", 1)[1] for line in v.splitlines())
            for k, v in zip(("kernel", "busybox"), versions.values(), strict=True)
        }
        info_path.write_text(json.dumps(info))
    entries = [(d, 0o040755, b"") for d in ("bin", "dev", "proc", "sys", "tmp", "workloads")]
    entries += [
        ("dev/console", 0o020600, b"5:1"),
        ("bin/busybox", 0o100755, (build / "busybox").read_bytes()),
        ("bin/sh", 0o120777, b"busybox"),
        ("bin/a2m-start", 0o100755, marker_elf(MARK_START)),
        ("bin/a2m-stop", 0o100755, marker_elf(MARK_STOP)),
        ("init", 0o100755, (GUEST_SRC / "init").read_bytes()),
    ]
    entries += [
        (f"workloads/{p.name}", 0o100644, p.read_bytes())
        for p in sorted((GUEST_SRC / "workloads").glob("*.sh"))
    ]
    blob = gzip.compress(cpio_newc(entries), compresslevel=6, mtime=0)
    if not initrd.exists() or initrd.read_bytes() != blob:
        atomic_write_bytes(initrd, blob)
    guest = Guest(kernel, initrd, sysmap, info["kernel"], info["busybox"])
    if not sysmap.exists():
        _write_system_map(guest, echo)
    return guest


def _write_system_map(guest: Guest, echo=None) -> None:
    """Debian's kernel package ships a stub System.map (the real one is in the -dbg package,
    850 MB): boot the guest once with KASLR off and keep /proc/kallsyms' text symbols, which
    are the System.map's."""
    require_tools({"qemu-system-x86_64": "qemu-system-x86"})
    if echo:
        echo("capture: booting the guest once to read its kernel symbols")
    with tempfile.TemporaryDirectory() as tmp:
        console = Path(tmp) / "console.txt"
        rc, _ = _run_qemu(qemu_command(guest, "_kallsyms", 1, 256, None, console), 600)
        lines = [
            ln.split(" ", 2)[2]
            for ln in console.read_text(errors="replace").splitlines()
            if ln.startswith("A2M sym ")
        ]
    if rc != 0 or not lines:
        raise CaptureError(
            f"reading the guest kernel's symbols failed (QEMU exit code {rc}, {len(lines)} symbols)"
        )
    atomic_write_bytes(guest.system_map, ("\n".join(lines) + "\n").encode())


def read_system_map(path: Path) -> tuple[dict[str, int], tuple[int, int] | None]:
    """Function symbols (text, T/t; the first name of an address wins) and the kernel text
    range [_text, _etext) of a System.map."""
    symbols: dict[str, int] = {}
    seen: set[int] = set()
    text = etext = None
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        addr, kind, name = int(parts[0], 16), parts[1], parts[2]
        if name == "_text":
            text = addr
        elif name == "_etext":
            etext = addr
        if kind in "Tt" and addr not in seen and name not in symbols:
            symbols[name] = addr
            seen.add(addr)
    return symbols, (text, etext) if text is not None and etext is not None else None


# --------------------------------------------------------------------------- console
@dataclass
class GuestReport:
    """What the guest said on its console ("A2M ..." lines)."""

    kernel: str | None = None
    clocksource: str | None = None
    cpus: int | None = None
    memmap: list[tuple[int, int, str]] = field(default_factory=list)
    page_tables: set[tuple[int, int]] = field(default_factory=set)
    window: tuple[float, float] | None = None
    done: bool = False
    error: str | None = None


def parse_console(text: str) -> GuestReport:
    rep = GuestReport()
    for line in text.splitlines():
        parts = line.strip().split(" ", 2)
        if len(parts) < 2 or parts[0] != "A2M":
            continue
        key, rest = parts[1], parts[2] if len(parts) > 2 else ""
        if key == "kernel":
            rep.kernel = rest
        elif key == "clocksource":
            rep.clocksource = rest
        elif key == "cpus" and rest.isdigit():
            rep.cpus = int(rest)
        elif key == "memmap":
            f = rest.split(" ", 2)
            rep.memmap.append((int(f[0], 16), int(f[1], 16), f[2] if len(f) > 2 else ""))
        elif key == "pt":
            f = rest.split()
            rep.page_tables.add((int(f[1]), int(f[2])))
        elif key == "window":
            f = rest.split()
            rep.window = (float(f[0]), float(f[1]))
        elif key == "done":
            rep.done = True
        elif key == "error":
            rep.error = rest
    return rep


def ram_ranges(memmap: list[tuple[int, int, str]]) -> list[list[int]]:
    """Gfn ranges of the pages wholly inside "System RAM" entries of the memory map."""
    out = []
    for start, end, kind in sorted(memmap):
        if kind == "System RAM":
            first, last = (start + 0xFFF) >> 12, ((end + 1) >> 12) - 1
            if first <= last:
                out.append([first, last])
    return out


# --------------------------------------------------------------------------- run
@dataclass
class CaptureResult:
    rows: int
    output: Path
    raw_bytes: int
    window_seconds: float
    guest_window_seconds: float | None
    import_seconds: float
    clocksource: str | None
    end: str


def qemu_command(
    guest: Guest,
    workload: str,
    vcpus: int,
    memory: int,
    plugin: str | None,
    console: Path,
    scale: int = 100,
) -> list[str]:
    cmd = [
        "qemu-system-x86_64",
        "-accel",
        "tcg,thread=single",
        "-smp",
        str(vcpus),
        "-m",
        f"{memory}M",
        "-object",
        f"memory-backend-memfd,id=ram0,size={memory}M",
        "-machine",
        "pc,memory-backend=ram0",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        f"file:{console}",
        "-kernel",
        str(guest.kernel),
        "-initrd",
        str(guest.initrd),
        "-append",
        f"{KERNEL_ARGS} a2m.workload={workload} a2m.scale={scale}",
    ]
    if plugin:
        cmd += ["-plugin", plugin]
    return cmd


def _check_args(workload: str, vcpus: int, memory: int) -> None:
    if workload not in workloads():
        from altp2m_replay.errors import did_you_mean

        raise CaptureError(
            f'unknown workload "{workload}"{did_you_mean(workload, workloads())}; '
            f"expected one of {', '.join(workloads())}"
        )
    if not 1 <= vcpus <= 64:
        raise CaptureError(f"--vcpus must be in 1..64, found {vcpus}")
    if not 64 <= memory <= MAX_MEMORY_MIB:
        raise CaptureError(f"--memory must be in 64..{MAX_MEMORY_MIB} MiB, found {memory}")


def _run_qemu(
    cmd: list[str], timeout: float, on_line=None, pass_fds=(), tick=None
) -> tuple[int, list[str]]:
    """Run QEMU, collecting its stderr lines (the plugin's messages); kill it at the timeout.
    ``tick()`` is called about twice a second while it runs."""
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        pass_fds=pass_fds,
    )
    lines: list[str] = []

    def pump():
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if on_line:
                on_line(lines[-1])

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                rc = proc.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    raise
                if tick:
                    tick()
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        t.join(5)
        raise CaptureError(
            f"the guest did not power off within {timeout:.0f} s (QEMU stopped); "
            f"last messages: {' | '.join(lines[-3:]) or 'none'}"
        ) from None
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    t.join(5)
    return rc, lines


def capture(
    workload: str,
    output,
    vcpus: int = 2,
    memory: int = 256,
    rows: int | None = None,
    timeout: float = 1800,
    echo=None,
    progress=None,
    keep_raw=None,
    scale: int = 100,
) -> CaptureResult:
    """Boot the guest under QEMU with the plugin, run ``workload`` between the markers, and
    import the window into a trace at ``output`` (written atomically); ``keep_raw`` keeps
    the zstd record stream there (for `trace import qemu-capture`); ``scale`` sizes the
    workload in percent."""
    _check_args(workload, vcpus, memory)
    if rows is not None and rows < 1:
        raise CaptureError(f"--rows must be at least 1, found {rows}")
    require_tools(TOOLS)
    plugin = build_plugin()
    guest = build_guest(echo=echo)
    qemu_full = qemu_version()[2]
    output = Path(output)
    if echo:
        echo(f"capture: QEMU {qemu_full} cannot record {NOT_RECORDED}")
    with tempfile.TemporaryDirectory(
        prefix=".capture-", dir=output.parent if output.parent.is_dir() else None
    ) as tmp:
        raw, console = Path(tmp) / "stream.zst", Path(tmp) / "console.txt"
        # The plugin writes into a pipe whose write end QEMU inherits; zstd compresses on the
        # other core, so the raw stream never reaches the disk.
        rfd, wfd = os.pipe()
        # a 1 MiB pipe (the default ceiling for users): fewer context switches to zstd
        with contextlib.suppress(OSError):
            fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, 1 << 20)
        with open(raw, "wb") as raw_fh:
            zstd = subprocess.Popen(
                ["zstd", "-q", "-1", "-T1", "-c"], stdin=rfd, stdout=raw_fh, stderr=subprocess.PIPE
            )
        os.close(rfd)
        arg = f"{plugin},out=/dev/fd/{wfd}" + (f",rows={rows}" if rows else "")
        times: dict[str, float] = {}
        recorded = [0]

        def on_line(line: str) -> None:
            if "window opened" in line:
                times["open"] = time.perf_counter()
                if echo and progress is None:
                    echo(f"capture: recording {workload} on {vcpus} vCPUs")
            elif "window closed" in line:
                times["close"] = time.perf_counter()
                m = re.search(r": (\d+) records", line)
                recorded[0] = int(m.group(1)) if m else 0

        t_start = time.perf_counter()

        def tick() -> None:  # the progress line while QEMU runs (terminal only)
            if progress is None:
                return
            state = (
                "recording"
                if "open" in times and "close" not in times
                else "recorded"
                if "close" in times
                else "booting"
            )
            progress.stream.write(
                f"\rcapture {workload}: {state}, {time.perf_counter() - t_start:.0f} s, "
                f"{raw.stat().st_size / 1e6:,.1f} MB of zstd records   "
            )
            progress.stream.flush()

        try:
            rc, lines = _run_qemu(
                qemu_command(guest, workload, vcpus, memory, arg, console, scale),
                timeout,
                on_line,
                pass_fds=(wfd,),
                tick=tick,
            )
            if progress is not None:
                progress.stream.write("\n")
        finally:
            os.close(wfd)
            zerr = zstd.communicate()[1].decode(errors="replace").strip()
        report = parse_console(console.read_text(errors="replace") if console.exists() else "")
        plugin_errors = [
            ln for ln in lines if ln.startswith("altp2m-capture:") and "window" not in ln
        ]
        if rc != 0 or "close" not in times:
            why = (
                report.error
                or " | ".join(plugin_errors + [ln for ln in lines if ln][-2:])
                or f"QEMU exit code {rc}"
            )
            raise CaptureError(f"capture of {workload} failed: {why}")
        if zstd.returncode != 0:
            raise CaptureError(f"zstd failed while compressing the stream: {zerr}")
        symbols, text = read_system_map(guest.system_map)
        gfn_sets = {}
        if text:
            gfn_sets["kernel_code"] = [
                [(text[0] - KERNEL_TEXT_BASE) >> 12, (text[1] - 1 - KERNEL_TEXT_BASE) >> 12]
            ]
        if report.page_tables:
            from altp2m_replay.ranges import merge_ranges

            gfn_sets["page_tables"] = merge_ranges(report.page_tables).tolist()
        source = (
            f"qemu-capture: QEMU {qemu_full} TCG (thread=single), {vcpus} vCPUs, "
            f"{memory} MiB; kernel {report.kernel or guest.kernel_package} "
            f"({guest.kernel_package}), {guest.busybox_package}; workload {workload}; "
            f"clocksource {report.clocksource or 'unknown'}; nokaslr"
        )
        meta = {
            "source": source,
            "vcpus": vcpus,
            "gfn_sets": gfn_sets,
            "processes": {},  # CR3 values need QEMU >= 9.0 register reads
            "not_recorded": NOT_RECORDED,
            "guest": {
                "clocksource": report.clocksource,
                "kernel": report.kernel,
                "workload": workload,
                "memory_mib": memory,
                "row_limit": rows,
            },
        }
        ram = ram_ranges(report.memmap)
        if ram:
            meta["ram"] = ram
        from altp2m_replay.importers import import_qemu_capture

        if progress is not None:
            progress.start(recorded[0])
        t0 = time.perf_counter()
        n = import_qemu_capture(
            raw,
            output,
            symbols=symbols,
            meta=meta,
            ram_pages=(memory << 8) + (1 << 18),
            progress=progress,
        )
        if progress is not None:
            progress.done()
        import_s = time.perf_counter() - t0
        if keep_raw:
            shutil.move(raw, keep_raw)
            raw = Path(keep_raw)
        win = report.window
        return CaptureResult(
            rows=n,
            output=output,
            raw_bytes=raw.stat().st_size,
            window_seconds=times["close"] - times["open"],
            guest_window_seconds=(win[1] - win[0]) if win else None,
            import_seconds=import_s,
            clocksource=report.clocksource,
            end="row limit" if rows and n >= rows else "stop marker",
        )


def summary_text(res: CaptureResult) -> str:
    """The line `trace capture` prints."""
    guest = f", guest clock {res.guest_window_seconds:.2f} s" if res.guest_window_seconds else ""
    return (
        f"wrote {res.output}: {res.rows:,} rows ({res.end}); recorded in "
        f"{res.window_seconds:.2f} s ({res.rows / max(res.window_seconds, 1e-9) / 1e6:.1f} M rows/s"
        f"{guest}), {res.raw_bytes / 1e6:.1f} MB of zstd records, imported in "
        f"{res.import_seconds:.2f} s ({res.rows / max(res.import_seconds, 1e-9) / 1e6:.1f} M rows/s); "
        f"clocksource {res.clocksource or 'unknown'}"
    )


def plain_run(
    workload: str, vcpus: int = 2, memory: int = 256, timeout: float = 1800, scale: int = 100
) -> GuestReport:
    """Run the workload without the plugin (for the slowdown figure): the guest's report."""
    _check_args(workload, vcpus, memory)
    require_tools({"qemu-system-x86_64": "qemu-system-x86"})
    guest = build_guest()
    with tempfile.TemporaryDirectory() as tmp:
        console = Path(tmp) / "console.txt"
        rc, _lines = _run_qemu(
            qemu_command(guest, workload, vcpus, memory, None, console, scale), timeout
        )
        report = parse_console(console.read_text(errors="replace"))
    if rc != 0 or not report.done:
        raise CaptureError(f"plain run of {workload} failed: QEMU exit code {rc}")
    return report


def setup(echo=print) -> tuple[Path, Guest]:
    """``make guest``: check the tools, build the plugin and the guest."""
    require_tools({**TOOLS, **GUEST_TOOLS})
    plugin = build_plugin()
    guest = build_guest(echo=echo)
    return plugin, guest


if __name__ == "__main__":  # pragma: no cover - used by `make guest`
    try:
        p, g = setup()
    except ReplayError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    print(f"plugin {p}\nguest {g.kernel_package}, {g.busybox_package}: {g.kernel}, {g.initrd}")
