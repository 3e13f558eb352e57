"""A ``replay`` output folder as one unit: a lock, a staged switch-over, a consistency check.

The files a run publishes (``FILES``: the tables, ``manifest.json``, ``report.html``) belong
together. A run writes its new set into a hidden staging folder inside the output folder;
once every file is there the staging folder is renamed to ``.switch`` (one atomic rename:
from then on the set is complete) and its files are moved over the old ones, the manifest
after the tables. A run killed in the middle of those renames leaves ``.switch`` behind; the
next ``replay`` or ``report`` into the folder finishes the move, and until then ``report``
and ``compare`` refuse the folder. The manifest records the SHA-256 of every table it was
written with, so a table from another run (copied in by hand, say) is refused by name
instead of being reported beside the wrong manifest.

Only one run writes into a folder at a time: ``OutputFolder`` holds an ``flock`` on
``.lock`` for the whole run. The kernel drops the lock when its holder dies, so a killed run
never blocks the next one; the file itself is removed when the holder finishes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import polars as pl

from altp2m_replay.errors import OutputError
from altp2m_replay.schema import TABLES

LOCK = ".lock"
SWITCH = ".switch"
STAGING = ".staging-"
TABLE_FILES = tuple(f"{t}.parquet" for t in TABLES)
FILES = (*TABLE_FILES, "manifest.json", "report.html")


# ----------------------------------------------------------------------------- files
def _umask_mode() -> int:
    # mkstemp creates 0600 files; published outputs get the usual 0666 & ~umask
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_checked(path: Path, write, shown: Path | None = None) -> None:
    """Call ``write(path)``; a failure to write (disk full, no permission) becomes one
    OutputError naming ``shown`` (the file the user knows about; ``path`` by default)."""
    try:
        write(path)
    except OSError as exc:
        raise OutputError(f"{shown or path}: cannot write: {exc.strerror or exc}") from None


def write_table(df: pl.DataFrame, path: Path, shown: Path | None = None) -> None:
    """``df`` as Parquet at ``path``. Encoded in memory first: polars reports a full disk
    met while writing a file as "Invalid thrift: transport error" or similar, Python's own
    write says "No space left on device"."""
    buf = io.BytesIO()
    df.write_parquet(buf)
    write_checked(path, lambda p: Path(p).write_bytes(buf.getbuffer()), shown)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place:
    readers never see half a file, and a failed write leaves the old file as it was."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        write_checked(tmp, lambda p: Path(p).write_bytes(data), shown=path)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- lock
class FolderLock:
    """An exclusive, non-blocking ``flock`` on ``folder/.lock``; OutputError when held."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_pid(fd)
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                who = f" (pid {holder})" if holder else ""
                raise OutputError(
                    f"{self.path.parent}: another run is writing into this folder"
                    f"{who}; wait for it to finish or choose another folder"
                ) from None
            # The previous holder may have removed the file between our open and our lock:
            # then we hold a lock on a file nobody else will open. Open it again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        with contextlib.suppress(OSError):  # the pid is a courtesy; a full disk must not stop us
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # still holding it: a waiter re-checks the inode (see acquire)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


# ----------------------------------------------------------------------------- switch-over
@contextlib.contextmanager
def interrupts_deferred():
    """Hold Ctrl-C (SIGINT) back until the block ends, so a few renames finish together."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if caught and callable(old):
            old(signal.SIGINT, None)  # the default handler raises KeyboardInterrupt here


def publish(folder: Path, write) -> None:
    """Replace the folder's published files with the set ``write(staging)`` writes.

    ``write`` gets an empty staging folder inside ``folder`` and must write every table and
    ``manifest.json``, and may write ``report.html``; whatever it raises leaves the folder's
    files as they were. A set without ``report.html`` (``--no-html``) removes the earlier one.
    """
    folder = Path(folder)
    try:
        staging = Path(tempfile.mkdtemp(prefix=STAGING, dir=folder))
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write: {exc.strerror or exc}") from None
    try:
        write(staging)
        missing = [n for n in FILES[:-1] if not (staging / n).is_file()]
        if missing:
            raise AssertionError(f"the new set of files lacks {', '.join(missing)}")
        os.rename(staging, folder / SWITCH)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finish_switch(folder)


def finish_switch(folder: Path) -> bool:
    """Move a complete staged set (``.switch``) into place; False when there is none.

    Safe to repeat after being killed at any point: each step is a rename of a file still in
    ``.switch``; the manifest moves after every table, and the earlier report goes before
    the first table, so an old report never stands beside new tables.
    """
    folder = Path(folder)
    staged_dir = folder / SWITCH
    if not staged_dir.is_dir():
        return False
    with interrupts_deferred():
        staged = set(os.listdir(staged_dir))
        if "manifest.json" in staged:  # the tables may not all have moved yet
            (folder / "report.html").unlink(missing_ok=True)
            for name in TABLE_FILES:
                if name in staged:
                    os.replace(staged_dir / name, folder / name)
            os.replace(staged_dir / "manifest.json", folder / "manifest.json")
        if "report.html" in staged:
            os.replace(staged_dir / "report.html", folder / "report.html")
        shutil.rmtree(staged_dir)
    return True


def clear_stale(folder: Path) -> None:
    """Remove staging folders a killed run left (call while holding the lock)."""
    for p in Path(folder).glob(f"{STAGING}*"):
        shutil.rmtree(p, ignore_errors=True)


def table_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of each table file in ``folder``: what the manifest records as its set."""
    return {name: sha256(Path(folder) / name) for name in TABLE_FILES}


def check_output_set(folder: Path, manifest: dict) -> None:
    """OutputError unless the tables in ``folder`` are the ones ``manifest`` was written with.

    Manifests written before they listed their files (no ``files`` key) are not checked.
    """
    folder = Path(folder)
    mpath = folder / "manifest.json"
    if (folder / SWITCH).exists():
        raise OutputError(
            f"{folder}: a replay was stopped while replacing its files; "
            f"`altp2m-replay report {folder}` finishes the switch to the new set"
        )
    files = manifest.get("files")
    if files is None:
        return
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise OutputError(f'{mpath}: "files" must map file names to SHA-256 digests')
    unknown = sorted(set(files) - set(TABLE_FILES))
    if unknown:
        raise OutputError(
            f'{mpath}: "files" names {unknown[0]!r}; expected only {", ".join(TABLE_FILES)}'
        )
    for name in TABLE_FILES:
        path = folder / name
        if name not in files:
            if path.exists():
                raise OutputError(
                    f"{path}: not one of the files {mpath} lists; the folder mixes "
                    f"files of two runs (replay into it again)"
                )
            continue
        if not path.is_file():
            raise OutputError(f"{path}: missing; {mpath} lists it as part of its run")
        if sha256(path) != files[name]:
            raise OutputError(
                f"{path}: not the file {mpath} was written with (SHA-256 differs); "
                f"the folder mixes files of two runs (replay into it again)"
            )


# ----------------------------------------------------------------------------- one run's folder
class OutputFolder:
    """The output folder of one run: created if needed, locked, and put back on failure.

    ``with OutputFolder(path, keep_on=...) as f:`` makes the folder (and missing parents),
    takes the lock, finishes a switch a killed run left and clears its staging folders. On
    an exception of a type in ``keep_on`` (an interruption) the paths registered with
    ``added`` stay, so a later run can resume from them; on any other exception they are
    removed, the ``(old, new)`` pairs registered with ``replaced`` are swapped back, and a
    folder this run made is removed with its parents: the folder is as it was before the run.
    """

    def __init__(self, path, keep_on: tuple[type[BaseException], ...] = ()):
        self.path = Path(path)
        self.keep_on = keep_on
        self.created: list[Path] = []  # folders this run made, deepest first
        self.added: list[Path] = []  # paths this run added inside the folder
        self.replaced: list[tuple[Path, Path]] = []  # (moved-aside old path, its new one)
        self.lock = FolderLock(self.path)

    def __enter__(self) -> OutputFolder:
        self._make()
        try:
            self.lock.acquire()
        except BaseException:
            self._remove_created()
            raise
        try:
            finish_switch(self.path)
            clear_stale(self.path)
        except BaseException:
            self.lock.release()
            raise
        return self

    def _make(self) -> None:
        missing = []
        p = self.path
        while not p.exists():
            missing.append(p)
            if p.parent == p:
                break
            p = p.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue  # another run made it first: it is not ours to remove
            except OSError as exc:
                self._remove_created()
                raise OutputError(f"{d}: cannot create the folder: {exc.strerror or exc}") from None
            self.created.insert(0, d)
        if not self.path.is_dir():
            raise OutputError(f"{self.path}: exists and is not a folder")

    def _remove_created(self) -> None:
        if self.created:
            shutil.rmtree(self.created[0], ignore_errors=True)
            for d in self.created[1:]:
                with contextlib.suppress(OSError):
                    d.rmdir()  # only if still empty
        self.created = []

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            keep = exc_type is None or issubclass(exc_type, self.keep_on)
            for old, new in self.replaced:
                if not keep:
                    shutil.rmtree(new, ignore_errors=True)
                    os.rename(old, new)
                shutil.rmtree(old.parent, ignore_errors=True)
            if exc_type is None:
                return
            for p in reversed(self.added):
                if not keep:
                    shutil.rmtree(p, ignore_errors=True)
                elif p.is_dir():
                    with contextlib.suppress(OSError):
                        p.rmdir()  # kept only when it holds something
            if self.created and not any(p.exists() for p in self.added):
                self._remove_created()  # made by this run, and nothing kept to resume from
        finally:
            self.lock.release()
