"""report.html: deterministic, self-contained, re-rendered by `report DIR`, and shown correctly
by a real headless Chromium."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from altp2m_replay.cli import main
from altp2m_replay.report import render_html, write_report

POLICIES = ("none", "baseline", "xen-access-altp2m-write")
HEADINGS = (
    "Setup warnings, crashes and livelocks",
    "Policy comparison",
    "Timeline",
    "Lazy population",
    "Per-vCPU",
    "Hotspots",
    "Run",
)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    """A replay of a 20k-row generated trace under three policies, HTML on."""
    root = tmp_path_factory.mktemp("report")
    trace = root / "kern.parquet"
    r = cli("trace", "generate", "kernel", "-n", 20_000, "--seed", 3, "--vcpus", 2, "-o", trace)
    assert r.exit_code == 0, r.output
    args = ["replay", trace, "-o", root / "out", "--jobs", 1]
    for p in POLICIES:
        args += ["-p", p]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    return root / "out"


@pytest.fixture
def copy_dir(out_dir, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(out_dir, dst)
    return dst


def test_replay_writes_the_same_page_that_render_returns(out_dir):
    page = render_html(out_dir)
    assert page == render_html(out_dir)
    assert (out_dir / "report.html").read_bytes() == page.encode("utf-8")


def test_report_command_rewrites_report_html(copy_dir):
    (copy_dir / "report.html").write_text("stale")
    r = cli("report", copy_dir)
    assert r.exit_code == 0, r.output
    assert (copy_dir / "report.html").read_text(encoding="utf-8") == render_html(copy_dir)
    assert not [p for p in copy_dir.iterdir() if p.name.startswith(".report.html")]


def test_page_is_self_contained(out_dir):
    page = (out_dir / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "@import" not in page and "url(" not in page


def test_page_shows_sections_and_readable_numbers(out_dir):
    page = render_html(out_dir)
    for h in HEADINGS:
        assert f"<h2>{h}</h2>" in page
    for p in POLICIES:
        assert p in page
    assert "20,000" in page  # thousands separators
    assert " µs" in page
    summary = pl.read_parquet(out_dir / "summary.parquet")
    total = summary.filter((pl.col("policy") == "xen-access-altp2m-write") & (pl.col("vcpu") == -1))
    assert f"{round(total['cycles_total'][0]):,}" in page
    assert "No crashes, no livelocks and no setup warnings" in page


def test_crashes_and_warnings_are_shown_before_the_results(copy_dir):
    summary = pl.read_parquet(copy_dir / "summary.parquet")
    hit = pl.col("policy") == "baseline"
    summary = summary.with_columns(
        pl.when(hit).then(1).otherwise(pl.col("crashed")).alias("crashed"),
        pl.when(hit).then(1234).otherwise(pl.col("crash_record")).alias("crash_record"),
    )
    summary.write_parquet(copy_dir / "summary.parquet")
    manifest = json.loads((copy_dir / "manifest.json").read_text())
    manifest["cells"][2]["warnings"] = ['setup: gfn set "page_tables" is empty <b>']
    manifest["files"]["summary.parquet"] = hashlib.sha256(
        (copy_dir / "summary.parquet").read_bytes()
    ).hexdigest()
    (copy_dir / "manifest.json").write_text(json.dumps(manifest))
    page = render_html(copy_dir)
    alerts = page.index('id="alerts"')
    assert alerts < page.index('id="comparison"')
    crash = page.index("crashed at record 1,234")
    warning = page.index("gfn set &#34;page_tables&#34; is empty &lt;b&gt;")  # escaped
    assert alerts < crash < page.index('id="comparison"')
    assert alerts < warning < page.index('id="comparison"')
    assert "No crashes" not in page


def _population_svgs(page: str) -> list[str]:
    """The per-policy population panels of the lazy section, in page order."""
    lazy = page[page.index('id="lazy"') : page.index('id="vcpus"')]
    figures = re.findall(r'<figure class="population">.*?</figure>', lazy, re.S)
    return [re.search(r"<svg\b.*?</svg>", f, re.S).group(0) for f in figures]


def _ip_section(page: str) -> str:
    hot = page[page.index('id="hotspots"') : page.index('id="run"')]
    return hot[hot.index("Top faulting instructions") :]


def test_population_has_one_curve_per_view_per_policy(out_dir):
    page = render_html(out_dir)
    pop = pl.read_parquet(out_dir / "population.parquet")
    views = {
        p: sorted(pop.filter(pl.col("policy") == p)["view"].unique().to_list()) for p in POLICIES
    }
    svgs = _population_svgs(page)
    assert len(svgs) == len(POLICIES)  # one panel per policy, in the report's policy order
    for p, svg in zip(POLICIES, svgs, strict=True):
        assert f'aria-label="pages mapped per view, {p}, kern"' in svg
        assert svg.count("<polyline") == len(views[p]) >= 1
    assert max(len(v) for v in views.values()) >= 2  # the write policy has a second view
    # y axis in sizes of 4 KiB pages; the legend and tooltips give each view's final size
    final = pop.filter((pl.col("policy") == "baseline") & (pl.col("view") == 0)).sort("window")
    pages = final["pages_mapped"][-1]
    assert re.search(r">\d+ (KiB|MiB|GiB)</text>", svgs[1])
    size = pages * 4096  # the legend's unit: the largest binary unit the size reaches
    div, unit = next(
        (d, u) for d, u in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")) if size >= d
    )
    assert f"{size / div:,.1f} {unit}" in page
    assert f"({pages:,} pages)</title>" in svgs[1]
    assert "view 1 · watch" in page
    assert "Lazy copies (cumulative)" not in page
    assert "Views at the end of the run" in page


def test_top_faulting_instructions(out_dir):
    page = render_html(out_dir)
    section = _ip_section(page)
    by_ip = pl.read_parquet(out_dir / "by_ip.parquet")
    assert by_ip.height > 0  # generated traces have an ip column
    for p in POLICIES[1:]:
        sub = by_ip.filter(pl.col("policy") == p)
        top = sub.sort(["ept_exits", "ve_delivered", "ip"], descending=[True, True, False])
        assert f"{p}<span>{sub['ept_exits'].sum():,} EPT exits" in section
        assert f"{top['ip'][0]:#x}</td>" in section  # hex, like the gfns
    tables = re.findall(r"<table>.*?</table>", section, re.S)
    assert len(tables) == by_ip["policy"].n_unique()
    assert all(1 <= t.count("<tr>") - 1 <= 20 for t in tables)
    assert "no ip column" not in page


def test_missing_optional_tables_still_render(copy_dir):
    for name in ("by_view.parquet", "by_gfn.parquet", "timeline.parquet", "manifest.json"):
        (copy_dir / name).unlink()
    page = render_html(copy_dir)
    assert "No timeline.parquet" in page and "No by_gfn.parquet" in page
    assert "Policy comparison" in page
    assert len(_population_svgs(page)) == len(POLICIES)  # population needs no timeline table
    for name in ("by_ip.parquet", "population.parquet"):
        (copy_dir / name).unlink()
    page = render_html(copy_dir)
    assert "No by_ip.parquet in this folder" in page
    assert not _population_svgs(page)


def test_older_folders_fall_back_to_the_cumulative_lazy_curve(copy_dir):
    manifest = json.loads((copy_dir / "manifest.json").read_text())
    del manifest["files"]  # older manifests did not list their files
    (copy_dir / "manifest.json").write_text(json.dumps(manifest))
    (copy_dir / "population.parquet").unlink()
    (copy_dir / "by_ip.parquet").unlink()
    page = render_html(copy_dir)
    lazy = page[page.index('id="lazy"') : page.index('id="vcpus"')]
    assert "Lazy copies (cumulative)" in lazy
    assert "No population.parquet in this folder" in lazy
    assert lazy.count("<polyline") == len(POLICIES)  # one cumulative curve per policy
    assert "Views at the end of the run" in lazy
    assert "No by_ip.parquet in this folder" in _ip_section(page)


def test_a_trace_without_ip_says_so(tmp_path):
    src = tmp_path / "src.parquet"
    r = cli("trace", "generate", "kernel", "-n", 3_000, "--seed", 2, "-o", src)
    assert r.exit_code == 0, r.output
    pl.read_parquet(src).drop("ip").write_parquet(tmp_path / "noip.parquet")
    r = cli(
        "replay",
        tmp_path / "noip.parquet",
        "-p",
        "none",
        "-p",
        "xen-access-altp2m-write",
        "--jobs",
        1,
        "-o",
        tmp_path / "out",
    )
    assert r.exit_code == 0, r.output
    assert pl.read_parquet(tmp_path / "out" / "by_ip.parquet").height == 0
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "the trace has no ip column" in _ip_section(page)
    assert len(_population_svgs(page)) == 2


def test_several_traces_and_merged_windows(tmp_path):
    for i in (1, 2):
        r = cli(
            "trace",
            "generate",
            "kernel",
            "-n",
            5_000,
            "--seed",
            i,
            "-o",
            tmp_path / f"t{i}.parquet",
        )
        assert r.exit_code == 0, r.output
    r = cli(
        "replay",
        tmp_path / "t1.parquet",
        tmp_path / "t2.parquet",
        "-p",
        "none",
        "-p",
        "codemon-flip",
        "--window",
        5,
        "--no-html",
        "-o",
        tmp_path / "out",
    )
    assert r.exit_code == 0, r.output
    page = render_html(tmp_path / "out")
    tags = [page.count(f'<span class="trace-tag">{t}</span>') for t in ("t1", "t2")]
    assert tags[0] == tags[1] > 1  # every section splits by trace
    assert "2 consecutive windows are summed" in page  # 1000 windows -> 500 points
    assert max(len(m.split()) for m in re.findall(r'points="([^"]*)"', page)) <= 512 + 1


def test_report_on_bad_folders_is_one_error_line(tmp_path, out_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "summary.parquet").write_bytes(b"not parquet")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for d in (tmp_path / "missing", empty, corrupt, a_file):
        r = CliRunner().invoke(main, ["report", str(d)])
        assert r.exit_code == 2, (d, r.output)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and str(d) in lines[0], r.stderr
        assert r.exception is None or isinstance(r.exception, SystemExit)
    assert not (empty / "report.html").exists()


# ----------------------------------------------------------------------------- Chromium
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium"
    pytest.fail(
        "chromium is not installed: the report must be checked in a real browser; "
        "install the Debian package (`apt-get install -y chromium`)"
    )


def _run_chromium(page: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--enable-logging=stderr",
        "--v=0",
        f"--user-data-dir={profile}",
        *args,
        page.resolve().as_uri(),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def _console_errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if "Uncaught" in ln or "ERROR:CONSOLE" in ln]


def _body_ok(dom: str) -> bool:
    return bool(re.search(r'<body[^>]*\bdata-ok="1"', dom)) and not re.search(
        r"<html[^>]*\bdata-errors=", dom
    )


def test_chromium_harness_sees_script_errors(tmp_path):
    """Negative control: a page with a failing script must not look clean to the checks."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><head><script>window.addEventListener("error", '
        'function (e) { document.documentElement.setAttribute("data-errors", "1"); }, '
        "true);</script></head><body><script>no_such_function();</script>"
        '<script>document.body.setAttribute("data-ok", "1");</script></body></html>'
    )
    r = _run_chromium(bad, tmp_path, "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    assert not _body_ok(r.stdout)
    assert _console_errors(r.stderr)


def test_chromium_renders_the_report(out_dir, tmp_path):
    page = out_dir / "report.html"
    r = _run_chromium(page, tmp_path, "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    assert _body_ok(dom), "the load marker is missing or a script error was recorded"
    assert not _console_errors(r.stderr), _console_errors(r.stderr)
    for h in HEADINGS:
        assert f"<h2>{h}</h2>" in dom
    svgs = re.findall(r"<svg\b.*?</svg>", dom, re.S)
    # per trace: 2 bar charts, 4 timeline panels, 1 population panel per policy
    assert len(svgs) >= 6 + len(POLICIES)
    for svg in svgs:
        assert re.search(r"<(rect|path|polyline)\b", svg), svg[:300]
    assert dom.count("<polyline") >= 5 * len(POLICIES)
    # the per-view population curves: every policy's panel draws one line per view
    pop = pl.read_parquet(out_dir / "population.parquet")
    panels = _population_svgs(dom)
    assert len(panels) == len(POLICIES)
    most_views = max(pop.group_by("policy").agg(pl.col("view").n_unique())["view"])
    assert sum(svg.count("<polyline") for svg in panels) >= most_views >= 2
    for p, svg in zip(POLICIES, panels, strict=True):
        assert svg.count("<polyline") == pop.filter(pl.col("policy") == p)["view"].n_unique()
    # the top-instructions table is in the rendered DOM, hex ips and all
    ips = _ip_section(dom)
    assert re.search(r"<th[^>]*>ip</th>", ips) and re.search(r">0x[0-9a-f]+</td>", ips)

    png = tmp_path / "report.png"
    r = _run_chromium(page, tmp_path, f"--screenshot={png}", "--window-size=1280,2400")
    assert r.returncode == 0, r.stderr[-2000:]
    assert not _console_errors(r.stderr), _console_errors(r.stderr)
    assert png.exists() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_returns_the_path(copy_dir):
    path = write_report(copy_dir)
    assert path == copy_dir / "report.html" and path.stat().st_size > 10_000


def test_a_broken_manifest_is_one_error_line(copy_dir):
    manifest = json.loads((copy_dir / "manifest.json").read_text())
    manifest["cells"][0]["costs"]["ept_exit"] = "lots"
    (copy_dir / "manifest.json").write_text(json.dumps(manifest))
    r = cli("report", copy_dir)
    assert r.exit_code == 2
    assert r.stderr.startswith("Error: ") and "ept_exit" in r.stderr
    (copy_dir / "manifest.json").write_text("{not json")
    r = cli("report", copy_dir)
    assert r.exit_code == 2 and "manifest.json: not readable JSON" in r.stderr
