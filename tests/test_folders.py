"""Output folders stay consistent (issue 12, docs/reliability.md "Folders and processes"):
an error leaves a new folder absent and an existing one as it was; the published files are one
set; one run at a time; disk full; cell folder names; tampered cells on --resume."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from altp2m_replay import cells, outdir, run
from altp2m_replay.cli import main
from altp2m_replay.outdir import FILES, TABLES, FolderLock
from altp2m_replay.traces import write_trace

POLICIES = ("xen-access-altp2m-write", "codemon-flip")


# --------------------------------------------------------------------------- helpers
def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args):
    r = cli(*args)
    assert r.exit_code == 0, (r.exit_code, r.output)
    return r


def one_error(r, code: int = 2) -> str:
    """Exit ``code`` and exactly one ``Error:`` line on stderr, no traceback."""
    assert r.exit_code == code, (r.exit_code, r.output)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


def pargs(*names) -> list[str]:
    return [a for n in names for a in ("-p", n)]


def snapshot(d: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and folder under ``d``, hidden ones included."""
    if not d.exists():
        return {}
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), d) + "/"] = None
        for name in files:
            p = os.path.join(root, name)
            out[os.path.relpath(p, d)] = Path(p).read_bytes()
    return out


def same_tables(a: Path, b: Path) -> None:
    """The tables are equal (the manifests' timings differ between runs)."""
    for t in TABLES:
        assert pl.read_parquet(a / f"{t}.parquet").equals(pl.read_parquet(b / f"{t}.parquet")), t


def bad_trace(path: Path, n: int = 300) -> Path:
    """A valid schema with a gfn past 2^36 in its last row: found only while replaying."""
    gfn = np.arange(n, dtype=np.uint64) + 0x200
    gfn[-1] = 1 << 40
    return write_trace({"gfn": gfn, "access": np.ones(n, np.uint8)}, path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, small_kernel_trace) -> Path:
    """Two good traces, ``a`` and ``b``."""
    d = tmp_path_factory.mktemp("corpus")
    shutil.copyfile(small_kernel_trace, d / "a.parquet")
    r = cli(
        "trace", "generate", "jit", "-n", 3000, "--seed", 3, "--vcpus", 2, "-o", d / "b.parquet"
    )
    assert r.exit_code == 0, r.output
    return d


# --------------------------------------------------------------------------- errors put folders back
@pytest.mark.parametrize("jobs", [1, 2])
def test_an_error_in_a_new_folder_leaves_no_folder_nor_parents(corpus, tmp_path, jobs):
    inputs = tmp_path / "in"
    shutil.copytree(corpus, inputs)
    bad_trace(inputs / "z.parquet")  # sorted last: the good traces' cells finish first
    out = tmp_path / "new" / "deeper" / "out"
    line = one_error(cli("replay", inputs, *pargs(*POLICIES), "--jobs", jobs, "-o", out))
    assert "z.parquet" in line
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("jobs", [1, 2])
def test_an_error_in_an_existing_folder_leaves_it_as_it_was(corpus, tmp_path, jobs):
    out = tmp_path / "out"
    ok("replay", corpus, *pargs(*POLICIES), "--jobs", 1, "-o", out)
    before = snapshot(out)
    assert "report.html" in before and any(k.startswith(".cells/") for k in before)
    inputs = tmp_path / "in"
    shutil.copytree(corpus, inputs)
    bad_trace(inputs / "z.parquet")
    for extra in ([], ["--resume"], ["--no-html"]):
        one_error(
            cli("replay", inputs, *pargs(*POLICIES, "split-rx"), "--jobs", jobs, "-o", out, *extra)
        )
        assert snapshot(out) == before, extra


# --------------------------------------------------------------------------- one set of files
def _switch_killed_after(monkeypatch, renames: int):
    """Make the switch-over stop (as if killed) after ``renames`` renames into the folder."""
    real = os.replace
    count = [0]

    class Killed(BaseException):
        pass

    def replace(src, dst):
        if Path(src).parent.name == outdir.SWITCH:
            if count[0] == renames:
                raise Killed
            count[0] += 1
        return real(src, dst)

    monkeypatch.setattr(outdir.os, "replace", replace)
    return Killed


@pytest.mark.parametrize(
    ("renames", "html"), [(n, False) for n in range(len(FILES) - 1)] + [(len(FILES) - 1, True)]
)
def test_a_run_stopped_while_switching_never_shows_two_runs(
    corpus, tmp_path, monkeypatch, renames, html
):
    """Run A (HTML), then run B (another policy) stopped after each possible number of
    renames: `compare` refuses the folder; `report` finishes the switch to B's set, and A's
    report never stands beside B's tables."""
    out = tmp_path / "out"
    run.replay([corpus], ["xen-access-altp2m-write"], out, jobs=1)
    fresh_b = tmp_path / "b"
    run.replay([corpus], ["codemon-flip"], fresh_b, jobs=1, html=False)
    killed = _switch_killed_after(monkeypatch, renames)
    with pytest.raises(killed):
        run.replay([corpus], ["codemon-flip"], out, jobs=1, html=html)
    monkeypatch.undo()
    assert (out / outdir.SWITCH).is_dir()
    assert not (out / "report.html").exists()  # A's went before B's first table moved
    r = cli("compare", out, out)
    assert "a replay was stopped while replacing its files" in one_error(r)
    r = ok("report", out)
    assert not (out / outdir.SWITCH).exists()
    same_tables(out, fresh_b)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [p["name"] for p in manifest["policies"]] == ["codemon-flip"]
    assert "codemon-flip" in (out / "report.html").read_text(encoding="utf-8")
    ok("compare", out, fresh_b)


def test_the_next_replay_finishes_a_stopped_switch(corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run.replay([corpus], ["xen-access-altp2m-write"], out, jobs=1)
    killed = _switch_killed_after(monkeypatch, 3)
    with pytest.raises(killed):
        run.replay([corpus], ["codemon-flip"], out, jobs=1, html=False)
    monkeypatch.undo()
    # a replay that fails on bad input still leaves the folder consistent (B's finished set)
    inputs = tmp_path / "in"
    inputs.mkdir()
    bad_trace(inputs / "z.parquet")
    one_error(cli("replay", inputs, "-p", "baseline", "--jobs", 1, "-o", out))
    assert not (out / outdir.SWITCH).exists() and not (out / "report.html").exists()
    assert [p["name"] for p in json.loads((out / "manifest.json").read_text())["policies"]] == [
        "codemon-flip"
    ]
    ok("compare", out, out)


@pytest.fixture
def two_runs(corpus, tmp_path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    ok("replay", corpus, "-p", "xen-access-altp2m-write", "--jobs", 1, "-o", a)
    ok("replay", corpus / "a.parquet", "-p", "xen-access-altp2m-write", "--jobs", 1, "-o", b)
    return a, b


@pytest.mark.parametrize("name", ["summary.parquet", "by_gfn.parquet", "population.parquet"])
def test_a_table_from_another_run_is_refused(two_runs, name):
    a, b = two_runs
    assert (b / name).read_bytes() != (a / name).read_bytes()
    shutil.copyfile(b / name, a / name)
    for r in (cli("report", a), cli("compare", a, b), cli("compare", b, a)):
        line = one_error(r)
        assert f"{a / name}: not the file {a / 'manifest.json'} was written with" in line
    assert "replay into it again" in line


def test_a_missing_table_is_refused(two_runs):
    a, _b = two_runs
    (a / "timeline.parquet").unlink()
    line = one_error(cli("report", a))
    assert f"{a / 'timeline.parquet'}: missing" in line


def test_no_html_removes_the_earlier_report(corpus, tmp_path):
    out = tmp_path / "out"
    ok("replay", corpus, *pargs(*POLICIES), "--jobs", 1, "-o", out)
    assert (out / "report.html").is_file()
    ok("replay", corpus, "-p", "split-rx", "--jobs", 1, "--no-html", "-o", out)
    assert not (out / "report.html").exists()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(FILES[:-1])
    # and a later run with HTML writes the report of that run
    ok("replay", corpus, "-p", "baseline", "--jobs", 1, "-o", out)
    assert "split-rx" not in (out / "report.html").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- one run at a time
def test_a_second_run_into_a_locked_folder_is_refused(corpus, tmp_path):
    out = tmp_path / "out"
    ok("replay", corpus, "-p", "baseline", "--jobs", 1, "-o", out)
    before = snapshot(out)
    with FolderLock(out):
        line = one_error(cli("replay", corpus, "-p", "split-rx", "--jobs", 1, "-o", out))
        assert f"{out}: another run is writing into this folder (pid {os.getpid()})" in line
        assert "another run is writing" in one_error(cli("report", out))
        before_lock = {k: v for k, v in snapshot(out).items() if k != outdir.LOCK}
    assert before_lock == before
    assert snapshot(out) == before  # the holder removes the lock file when it is done
    ok("replay", corpus, "-p", "split-rx", "--jobs", 1, "-o", out)


def test_a_run_into_a_new_folder_another_run_holds_removes_nothing(corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with FolderLock(out):
        one_error(cli("replay", corpus, "-p", "baseline", "--jobs", 1, "-o", out))
        assert (out / outdir.LOCK).is_file()  # the holder's lock is untouched


def test_a_lock_left_by_a_killed_run_does_not_block(corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time\nfrom altp2m_replay.outdir import FolderLock\n"
                "FolderLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"
            ),
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert "another run is writing" in one_error(
            cli("replay", corpus, "-p", "baseline", "-o", out)
        )
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (out / outdir.LOCK).is_file()  # left behind, but nobody holds it
    ok("replay", corpus, "-p", "baseline", "--jobs", 1, "-o", out)
    assert not (out / outdir.LOCK).exists()


# --------------------------------------------------------------------------- disk full
@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A real tmpfs of ``size`` mounted at ``path`` (needs root, as in CI)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_gives_one_error_and_keeps_the_folder(corpus, tmp_path):
    with small_disk(tmp_path / "disk", "400k") as disk:
        out = disk / "out"
        ok("replay", corpus / "a.parquet", "-p", "baseline", "--jobs", 1, "--no-html", "-o", out)
        before = snapshot(out)
        # many policies over both traces, with the report: does not fit in what is left
        r = cli(
            "replay",
            corpus,
            *pargs(
                *POLICIES,
                "split-rx",
                "hvmi-ve-pagetables",
                "baseline",
                "drakvuf-hidden-breakpoints",
            ),
            "--jobs",
            1,
            "-o",
            out,
        )
        line = one_error(r)
        assert "No space left on device" in line, line
        assert line.startswith(f"Error: {out}/") and ": cannot write: " in line, line
        assert snapshot(out) == before
        # the same run into a new folder: the disk fills again, and nothing is left behind
        r = cli(
            "replay",
            corpus,
            *pargs(
                *POLICIES,
                "split-rx",
                "hvmi-ve-pagetables",
                "baseline",
                "drakvuf-hidden-breakpoints",
            ),
            "--jobs",
            1,
            "-o",
            disk / "new" / "out",
        )
        assert "No space left on device" in one_error(r)
        assert not (disk / "new").exists()
        assert sorted(p.name for p in disk.iterdir()) == ["out"]


@pytest.mark.parametrize("victim", ["summary.parquet", "by_gfn.parquet", "cell", "report.html"])
def test_enospc_at_each_write_names_the_file(corpus, tmp_path, monkeypatch, victim):
    """ENOSPC raised where each kind of file is written (a cell table, a published table,
    the report): one Error line naming it, and the folder as it was."""
    out = tmp_path / "out"
    ok("replay", corpus, "-p", "baseline", "--jobs", 1, "-o", out)
    before = snapshot(out)
    real = outdir.write_checked

    def no_space(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full(path, write, shown=None):
        hit = shown.parent.parent == out / ".cells" if victim == "cell" else shown == out / victim
        return real(path, no_space if hit else write, shown)

    monkeypatch.setattr(outdir, "write_checked", full)  # tables
    monkeypatch.setattr(run, "write_checked", full)  # manifest, report
    monkeypatch.setattr(cells, "write_checked", full)  # cell.json
    line = one_error(cli("replay", corpus, *pargs(*POLICIES), "--jobs", 1, "-o", out))
    want = f"{out}/.cells/" if victim == "cell" else f"{out / victim}: "
    assert line.startswith(f"Error: {want}") and "No space left on device" in line, line
    assert snapshot(out) == before


# --------------------------------------------------------------------------- cell folders
def test_cell_folder_names_never_collide(corpus, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    names = ["run 1", "run_1", ".run_1", "run%201", "ärger"]
    for n in names:
        shutil.copyfile(corpus / "a.parquet", inputs / f"{n}.parquet")  # same bytes, same key
    long_a, long_b = "p" * 300, "p" * 299 + "q"
    pols = []
    for i, name in enumerate((long_a, long_b, "x.y", "x_y")):
        p = tmp_path / f"pol{i}.toml"
        p.write_text(f'name = "{name}"\n', encoding="utf-8")
        pols.append(p)
    args = [
        "replay",
        *[inputs / f"{n}.parquet" for n in names],
        *pargs(*pols),
        "--jobs",
        2,
        "--no-html",
        "-o",
        tmp_path / "out",
    ]
    ok(*args)
    cells = sorted((tmp_path / "out" / ".cells").iterdir())
    assert len(cells) == len(names) * len(pols)
    assert all(not c.name.startswith(".") and len(c.name.encode()) < 200 for c in cells)
    summary = pl.read_parquet(tmp_path / "out" / "summary.parquet").filter(pl.col("vcpu") == -1)
    assert sorted(summary["trace"].unique()) == sorted(names)
    assert sorted(summary["policy"].unique()) == sorted([long_a, long_b, "x.y", "x_y"])
    ok(*args, "--resume")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["timings"]["resumed_cells"] == len(names) * len(pols)


def _one_cell(out: Path) -> Path:
    return sorted(p for p in (out / ".cells").iterdir() if "codemon" in p.name)[0]


def _edit_meta(cell: Path, **changes) -> None:
    meta = json.loads((cell / "cell.json").read_text())
    meta.update(changes)
    (cell / "cell.json").write_text(json.dumps(meta))


TAMPER = {
    "not json": lambda c: (c / "cell.json").write_text("{not json"),
    "deeply nested": lambda c: (c / "cell.json").write_text("[" * 100_000 + "]" * 100_000),
    "a list": lambda c: (c / "cell.json").write_text("[]"),
    "records a string": lambda c: _edit_meta(c, records="many"),
    "seconds negative": lambda c: _edit_meta(c, seconds=-1),
    "warnings not strings": lambda c: _edit_meta(c, warnings=[{"a": 1}]),
    "costs not numbers": lambda c: _edit_meta(c, costs={"ept_exit": "x"}),
    "other key": lambda c: _edit_meta(c, key="0" * 24),
    "older format": lambda c: _edit_meta(c, format=0),
    "no files": lambda c: _edit_meta(c, files=None),
    "no cell.json": lambda c: (c / "cell.json").unlink(),
    "table truncated": lambda c: (c / "summary.parquet").write_bytes(
        (c / "summary.parquet").read_bytes()[:50]
    ),
    "table from another cell": lambda c: shutil.copyfile(
        next(p for p in c.parent.iterdir() if p != c and not p.name.startswith("."))
        / "by_gfn.parquet",
        c / "by_gfn.parquet",
    ),
    "table removed": lambda c: (c / "timeline.parquet").unlink(),
}


@pytest.mark.parametrize("how", sorted(TAMPER))
def test_a_tampered_cell_is_computed_again_with_a_warning(corpus, tmp_path, how):
    out = tmp_path / "out"
    ok("replay", corpus / "a.parquet", *pargs(*POLICIES), "--jobs", 1, "--no-html", "-o", out)
    fresh = tmp_path / "fresh"
    shutil.copytree(out, fresh)
    cell = _one_cell(out)
    TAMPER[how](cell)
    r = cli(
        "replay",
        corpus / "a.parquet",
        *pargs(*POLICIES),
        "--jobs",
        1,
        "--no-html",
        "-o",
        out,
        "--resume",
    )
    assert r.exit_code == 0, r.output
    warnings = r.stderr.splitlines()
    assert len(warnings) == 1, r.stderr
    assert warnings[0].startswith(f"warning: {cell}: stored cell not usable (") and warnings[
        0
    ].endswith("computing it again"), warnings[0]
    assert json.loads((out / "manifest.json").read_text())["timings"]["resumed_cells"] == 1
    same_tables(out, fresh)
    # the cell was stored again: the next resume uses it without a word
    r = ok(
        "replay",
        corpus / "a.parquet",
        *pargs(*POLICIES),
        "--jobs",
        1,
        "--no-html",
        "-o",
        out,
        "--resume",
    )
    assert r.stderr == ""
    assert json.loads((out / "manifest.json").read_text())["timings"]["resumed_cells"] == 2


def test_cells_of_an_earlier_key_are_pruned_after_a_run(corpus, tmp_path):
    out = tmp_path / "out"
    ok("replay", corpus / "a.parquet", "-p", "baseline", "--jobs", 1, "--no-html", "-o", out)
    first = sorted(p.name for p in (out / ".cells").iterdir())
    ok(
        "replay",
        corpus / "a.parquet",
        "-p",
        "baseline",
        "--cost",
        "ept_exit=1",
        "--jobs",
        1,
        "--no-html",
        "-o",
        out,
    )
    second = sorted(p.name for p in (out / ".cells").iterdir())
    assert len(first) == len(second) == 1 and first != second


def test_cell_folders_of_older_versions_are_pruned(corpus, tmp_path):
    out = tmp_path / "out"
    old = out / ".cells" / "a__baseline"  # how cells were named before
    old.mkdir(parents=True)
    (old / "cell.json").write_text("{}")
    ok(
        "replay",
        corpus / "a.parquet",
        "-p",
        "baseline",
        "--jobs",
        1,
        "--no-html",
        "-o",
        out,
        "--resume",
    )
    assert not old.exists() and len(list((out / ".cells").iterdir())) == 1


def test_a_resigned_cell_with_other_columns_is_one_error(corpus, tmp_path):
    """Hand-edited tables whose digests were recorded again pass the cell's checks; that they
    no longer fit the other cells is still one Error line, not a traceback."""
    out = tmp_path / "out"
    args = ["replay", corpus / "a.parquet", *pargs(*POLICIES), "--jobs", 1, "--no-html", "-o", out]
    ok(*args)
    cell = _one_cell(out)
    pl.read_parquet(cell / "by_gfn.parquet").drop("viol_x").write_parquet(cell / "by_gfn.parquet")
    meta = json.loads((cell / "cell.json").read_text())
    meta["files"]["by_gfn.parquet"] = outdir.sha256(cell / "by_gfn.parquet")
    (cell / "cell.json").write_text(json.dumps(meta))
    before = snapshot(out)
    line = one_error(cli(*args, "--resume"))
    assert "by_gfn tables of the stored cells do not fit together" in line
    assert snapshot(out) == before
