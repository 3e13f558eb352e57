"""report.html: deterministic, self-contained, re-rendered by `report DIR`, and shown correctly
by a real headless Chromium."""

from __future__ import annotations

import hashlib
import html
import itertools
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
from altp2m_replay.report.html import fmt_per_record, fmt_ratio

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


def _crash(folder: Path, hit: pl.Expr, record: int, warnings=None) -> None:
    """Mark the summary rows ``hit`` selects as crashed at ``record``; optionally give the
    third cell of the manifest setup ``warnings``. The manifest lists the new summary."""
    summary = pl.read_parquet(folder / "summary.parquet")
    summary = summary.with_columns(
        pl.when(hit).then(1).otherwise(pl.col("crashed")).alias("crashed"),
        pl.when(hit).then(record).otherwise(pl.col("crash_record")).alias("crash_record"),
    )
    summary.write_parquet(folder / "summary.parquet")
    manifest = json.loads((folder / "manifest.json").read_text())
    if warnings is not None:
        manifest["cells"][2]["warnings"] = warnings
    manifest["files"]["summary.parquet"] = hashlib.sha256(
        (folder / "summary.parquet").read_bytes()
    ).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_crashes_and_warnings_are_shown_before_the_results(copy_dir):
    warning = 'setup: gfn set "page_tables" is empty <b>'
    _crash(copy_dir, pl.col("policy") == "baseline", 1234, [warning])
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


# ----------------------------------------------------------------------------- corpora
# every built-in policy: the widest tables a run of the built-ins makes
CORPUS_POLICIES = (
    "none",
    "baseline",
    "codemon-flip",
    "drakvuf-hidden-breakpoints",
    "drakvuf-hidden-breakpoints-fast",
    "drakvuf-syscalls",
    "hvmi-ve-pagetables",
    "memaccess-write",
    "smartvmi-breakpoints-emulate",
    "split-rx",
    "split-rx-mtf",
    "xen-access-altp2m-exec",
    "xen-access-altp2m-write",
)
# (name, workload, rows, vCPUs); the last trace loses its tsc column
CORPUS_TRACES = (
    ("kern", "kernel", 3_000, 2),
    ("jit", "jit", 2_000, 1),
    ("sandbox", "sandbox", 2_000, 2),
    ("scan-notsc", "scan", 1_500, 1),
)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """Four small traces (one without tsc) × the 13 built-in policies, HTML on."""
    root = tmp_path_factory.mktemp("corpus")
    paths = []
    for name, workload, rows, vcpus in CORPUS_TRACES:
        path = root / f"{name}.parquet"
        r = cli(
            "trace", "generate", workload, "-n", rows, "--seed", 4, "--vcpus", vcpus, "-o", path
        )
        assert r.exit_code == 0, r.output
        paths.append(path)
    pl.read_parquet(paths[-1]).drop("tsc").write_parquet(paths[-1])
    args = ["replay", *paths, "-o", root / "out", "--jobs", 1]
    for p in CORPUS_POLICIES:
        args += ["-p", p]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    return root / "out"


def _overview(page: str) -> str:
    return page[page.index('<section class="card" id="overview">') : page.index('id="alerts"')]


def _matrix(page: str) -> tuple[list[tuple[str, str, str]], dict[str, list[dict]]]:
    """The overview's columns as (anchor, trace, measure) and its cells per policy row."""
    ov = _overview(page)
    columns = re.findall(
        r'<th class="n trace-col"[^>]*><a href="#([^"]+)">([^<]+)</a><span class="measure">([^<]+)',
        ov,
    )
    rows = {}
    for row in re.findall(r"<tr[^>]*>\s*<td class=\"strong\">.*?</tr>", ov, re.S):
        policy = re.search(r"</span>([^<]+)", row).group(1)
        rows[policy] = [
            {
                "cls": m.group(1),
                "bg": m.group(3),
                "fg": m.group(4),
                "body": m.group(5),
                "text": re.match(r'(?:<span class="tick"[^>]*>✓</span>)?([^<]*)', m.group(5)).group(
                    1
                ),
            }
            for m in re.finditer(
                r'<td class="n (heat[^"]*)"( style="background: (#[0-9a-f]{6}); '
                r'color: (#[0-9a-f]{6})" title="[^"]*")?>(.*?)</td>',
                row,
                re.S,
            )
        ]
    return columns, rows


def _wcag_contrast(a: str, b: str) -> float:
    """WCAG 2 contrast of two '#rrggbb' colours, written out here independently of charts."""

    def lum(h: str) -> float:
        chans = [int(h[i : i + 2], 16) / 255 for i in (1, 3, 5)]
        r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in chans)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    hi, lo = sorted((lum(a), lum(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_overview_matrix_answers_which_policy_is_cheapest(corpus_dir):
    page = render_html(corpus_dir)
    ov = _overview(page)
    assert page.index('id="overview"') < page.index('id="alerts"') < page.index('id="comparison"')
    assert '<a href="#overview">Overview</a>' in page  # first in the navigation
    columns, rows = _matrix(page)
    names = [name for name, *_ in CORPUS_TRACES]
    assert [c[1] for c in columns] == names  # traces as columns, in the run's order
    assert list(rows) == list(CORPUS_POLICIES)  # policies as rows, references first
    # the trace without tsc has no slowdown: its column shows cycles per record
    assert [c[2] for c in columns] == ["slowdown"] * 3 + ["cycles / record"]
    summary = pl.read_parquet(corpus_dir / "summary.parquet").filter(pl.col("vcpu") == -1)
    for j, (anchor, trace, measure) in enumerate(columns):
        assert page.count(f'id="{anchor}"') == 1  # the link lands on the trace's section
        sect = page[page.index(f'id="{anchor}"') :]
        assert sect.index(f'<span class="trace-tag">{trace}</span>') < 200
        col = "slowdown" if measure == "slowdown" else "cycles_per_record"
        fmt = fmt_ratio if col == "slowdown" else fmt_per_record
        by_policy = {r["policy"]: r for r in summary.filter(pl.col("trace") == trace).to_dicts()}
        for p in CORPUS_POLICIES:
            assert rows[p][j]["text"] == fmt(by_policy[p][col]), (trace, p)
        # the cheapest: lowest value among policies that are no reference and did not stop
        fair = {
            p: r[col]
            for p, r in by_policy.items()
            if p not in ("none", "baseline") and not r["crashed"] and not r["livelocked"]
        }
        cheapest = {p for p, v in fair.items() if v == min(fair.values())}
        marked = {p for p in CORPUS_POLICIES if "best" in rows[p][j]["cls"].split()}
        assert marked == cheapest, (trace, marked, cheapest)
        for p in CORPUS_POLICIES:  # a mark, not only an outline: the tick in the cell
            ticked = rows[p][j]["body"].startswith(
                '<span class="tick" role="img" aria-label="cheapest">✓'
            )
            assert ticked == (p in marked), (trace, p)
        # stopped runs carry a label, not only a colour
        for p, r in by_policy.items():
            stopped = "✕ livelock @ " in rows[p][j]["body"]
            assert stopped == bool(r["livelocked"]), (trace, p)
            if stopped:
                assert f"livelock @ {r['livelock_record']:,}<" in rows[p][j]["body"]
    assert "✕ livelock @" in ov  # split-rx livelocks on these traces
    # each policy's row says on how many traces it is the cheapest
    for p in CORPUS_POLICIES:
        wins = sum("best" in cell["cls"].split() for cell in rows[p])
        said = re.search(rf"</span>{re.escape(p)}(<span[^>]*>[^<]*</span>)*</td>", ov).group(0)
        claim = f"cheapest on {wins} of {len(names)} traces"
        assert (claim in said) == (wins > 0), (p, said)
    assert 'href="#trace-kern"' in ov and 'id="timeline-trace-kern"' in page


@pytest.mark.parametrize("folder", ["corpus_dir", "out_dir"])
def test_every_link_inside_the_page_has_a_target(folder, request):
    page = render_html(request.getfixturevalue(folder))
    targets = re.findall(r'href="#([^"]+)"', page)
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))  # ids are unique
    assert targets and not set(targets) - set(ids), set(targets) - set(ids)
    # in a corpus, each trace's comparison links to its part of the other sections
    multi = folder == "corpus_dir"
    assert ("hotspots-trace-sandbox" in targets) == multi


def test_overview_colours_are_sequential_and_readable(corpus_dir):
    columns, rows = _matrix(render_html(corpus_dir))
    summary = pl.read_parquet(corpus_dir / "summary.parquet").filter(pl.col("vcpu") == -1)
    for measure in ("slowdown", "cycles / record"):
        col = "slowdown" if measure == "slowdown" else "cycles_per_record"
        cells = []
        for j, (_, trace, m) in enumerate(columns):
            if m != measure:
                continue
            for p in CORPUS_POLICIES:
                v = summary.filter((pl.col("trace") == trace) & (pl.col("policy") == p))[col][0]
                cells.append((v, rows[p][j]["bg"], rows[p][j]["fg"]))
        assert len({bg for _, bg, _ in cells}) >= 4  # the scale is used, not one colour
        # a costlier cell is never lighter than a cheaper one of the same measure
        cells.sort(key=lambda c: c[0])
        lights = [_wcag_contrast(bg, "#000000") for _, bg, _ in cells]
        assert all(a >= b - 1e-9 for a, b in itertools.pairwise(lights)), measure
        for _, bg, fg in cells:
            assert _wcag_contrast(bg, fg) >= 4.5, (bg, fg)


def test_heat_scale_ends_and_contrast():
    from altp2m_replay.report import charts

    assert charts.heat(0.0)[0] == charts.HEAT_STOPS[0]
    assert charts.heat(1.0)[0] == charts.HEAT_STOPS[-1]
    assert charts.heat(-3.0) == charts.heat(0.0) and charts.heat(7.0) == charts.heat(1.0)
    for i in range(101):
        bg, fg = charts.heat(i / 100)
        assert _wcag_contrast(bg, fg) >= 4.5, (i, bg, fg)


def test_overview_of_one_trace_is_one_column(out_dir):
    page = render_html(out_dir)
    columns, rows = _matrix(page)
    assert columns == [("trace-kern", "kern", "slowdown")]
    assert page.count('id="trace-kern"') == 1
    assert list(rows) == list(POLICIES) and all(len(c) == 1 for c in rows.values())
    marked = [p for p in POLICIES if "best" in rows[p][0]["cls"].split()]
    assert marked == ["xen-access-altp2m-write"]  # the only policy that is no reference


def test_overview_labels_crashes(corpus_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(corpus_dir, copy)
    _crash(copy, (pl.col("policy") == "hvmi-ve-pagetables") & (pl.col("trace") == "jit"), 1234)
    columns, rows = _matrix(render_html(copy))
    j = [c[1] for c in columns].index("jit")
    cell = rows["hvmi-ve-pagetables"][j]
    assert "✕ crashed @ 1,234" in cell["body"] and "best" not in cell["cls"]
    assert "tick" not in cell["body"]
    assert any("best" in rows[p][j]["cls"] for p in CORPUS_POLICIES)  # another one now


# Injected before </body> of a copy of the page: opens every <details> (a table must fit
# when its section is opened too), then records per table its width, its card's inner
# width and whether the box around it has to scroll sideways.
FIT_PROBE = """<script>
(function () {
  document.querySelectorAll("details").forEach(function (d) { d.open = true; });
  var out = [];
  document.querySelectorAll("table").forEach(function (t) {
    var card = t.closest("section.card");
    var cs = getComputedStyle(card);
    var inner = card.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
    var box = t.parentElement;
    out.push([card.id, Math.ceil(t.getBoundingClientRect().width), t.scrollWidth,
              Math.floor(inner), box.scrollWidth, box.clientWidth,
              (t.querySelector("th") || {}).textContent].join("|"));
  });
  document.body.setAttribute("data-fit", out.join(";"));
  var matrix = document.querySelector("table.matrix");
  if (matrix) {
    document.body.setAttribute("data-matrix-bottom", Math.ceil(matrix.getBoundingClientRect().bottom));
  }
})();
</script>
"""


def _table_fit(page: Path, tmp_path: Path, width: int) -> tuple[list[list[str]], int | None]:
    probe = tmp_path / f"fit-{width}.html"
    probe.write_text(
        page.read_text(encoding="utf-8").replace("</body>", FIT_PROBE + "</body>"),
        encoding="utf-8",
    )
    r = _run_chromium(probe, tmp_path, "--dump-dom", f"--window-size={width},1000")
    assert r.returncode == 0, r.stderr[-2000:]
    assert _body_ok(r.stdout) and not _console_errors(r.stderr)
    found = re.search(r'<body[^>]*\bdata-fit="([^"]*)"', r.stdout)
    assert found, "the fit probe did not run"
    bottom = re.search(r'<body[^>]*\bdata-matrix-bottom="(\d+)"', r.stdout)
    rows = [row.split("|") for row in html.unescape(found.group(1)).split(";")]
    return rows, int(bottom.group(1)) if bottom else None


def _overflowing(rows: list[list[str]]) -> list[list[str]]:
    """Tables wider than their card, or whose box scrolls sideways."""
    return [
        r for r in rows if int(r[1]) > int(r[3]) or int(r[2]) > int(r[3]) or int(r[4]) > int(r[5])
    ]


def test_chromium_fit_probe_sees_a_table_wider_than_its_card(tmp_path):
    """Negative control: the probe flags a table that cannot fit."""
    wide = tmp_path / "wide.html"
    cells = "".join(f"<td>{'x' * 40}</td>" for _ in range(12))
    wide.write_text(
        "<!DOCTYPE html><html><head><style>td { white-space: nowrap; } .scroll { overflow-x: auto; }"
        "</style></head><body>"
        '<section class="card" id="c"><div class="scroll"><table><tr><th>h</th>'
        f"{cells}</tr></table></div></section>"
        '<script>document.body.setAttribute("data-ok", "1");</script></body></html>'
    )
    rows, bottom = _table_fit(wide, tmp_path, 1280)
    assert len(rows) == 1 and _overflowing(rows) == rows and bottom is None


@pytest.mark.parametrize("width", [1280, 1920])
def test_chromium_every_table_fits_its_card(corpus_dir, tmp_path, width):
    page = corpus_dir / "report.html"
    rows, bottom = _table_fit(page, tmp_path, width)
    assert len(rows) == page.read_text(encoding="utf-8").count("<table")  # every table measured
    assert {r[0] for r in rows} >= {"overview", "comparison", "lazy", "vcpus", "hotspots", "run"}
    assert not _overflowing(rows), "\n".join("|".join(r) for r in _overflowing(rows))
    # the whole overview of 4 traces × 13 policies is on the first screen of a 1080-pixel
    # display (less about 130 px of browser toolbars), whatever the width
    assert bottom is not None and bottom <= 950, bottom


def test_trace_anchors_are_stable_and_unique():
    from altp2m_replay.report.html import _anchors

    names = ["Kern 2vcpu", "kern-2vcpu", "kern_2vcpu", "☃", "kern-2vcpu-2"]
    first = _anchors(names)
    assert first == _anchors(names)  # same names, same ids
    assert first["Kern 2vcpu"] == "trace-kern-2vcpu"
    assert first["kern-2vcpu"] == "trace-kern-2vcpu-2"  # taken: numbered
    assert first["kern_2vcpu"] == "trace-kern_2vcpu" and first["☃"] == "trace-unnamed"
    assert len(set(first.values())) == len(names)
    assert all(re.fullmatch(r"trace-[a-z0-9_-]+", a) for a in first.values())
